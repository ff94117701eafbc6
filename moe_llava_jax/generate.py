"""Batched decoding: with a KV cache (`CachedDecoder`, what evaluation and `predict` use) and
by full recomputation (`greedy_generate`, the reference the cached decoder is tested against).

Cached: prompts are left-padded (positions restart at 0 on each row's first real token, pads
are masked as keys), the prompt is prefilled in one call, then one token per step; every call
is jitted with static shapes. The prompt length is rounded up to a bucket (`prompt_bucket`:
`buckets_per_octave` lengths per doubling: by default, past 32 tokens, under 1/4 of a prefill
is extra padding) and the cache is that bucket + `max_new_tokens` long, so a benchmark
compiles a prefill and a step per bucket, not per distinct longest-prompt length (prompts of
100 to 149 tokens: 3 buckets).
The next token is the argmax (temperature 0) or a temperature / top-p (nucleus) sample drawn
from a seeded key, so a sampled answer is reproducible. A row stops at EOS or when a
host-side `stop` predicate (template stop strings, `answering.stop_at_strings`) says so.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_llava_jax.models.lvlm import LVLMConfig, MoELLaVA

# (input_ids [b, t], images [b, H, W, 3]) -> logits [b, t, vocab]
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
# (prompts, images [b, H, W, 3], *, max_new_tokens, eos_id, pad_id, stop) -> ids per prompt
GenerateFn = Callable[..., list[list[int]]]
# generated ids of one row so far -> True when the row should stop (ids kept; text cut later)
StopFn = Callable[[Sequence[int]], bool]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked. temperature 0 = greedy (argmax; top_p and seed unused)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling()


def next_token(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [b, V] -> token ids [b].

    Top-p keeps the smallest set of most probable tokens whose probability reaches `top_p`
    (a token is kept when the mass strictly before it is < top_p, so the argmax always is),
    then samples from the renormalised softmax(logits / temperature) over that set.
    """
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)  # [b, V], most probable first
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < sampling.top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1)


def _cut_at_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


@jax.jit
def _greedy_step(
    logits: jax.Array, ids: jax.Array, lengths: jax.Array, done: jax.Array, eos_id: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    rows = jnp.arange(ids.shape[0])
    next_token = jnp.argmax(logits[rows, lengths - 1], axis=-1)
    ids = ids.at[rows, lengths].set(jnp.where(done, ids[rows, lengths], next_token))
    return ids, lengths + (~done), done | (next_token == eos_id)


def greedy_generate(
    logits_fn: LogitsFn,
    prompts: Sequence[np.ndarray],
    images: np.ndarray,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> list[list[int]]:
    """Reference decoder: right-padded buffer, the whole sequence recomputed every step."""
    prompt_len = max(len(p) for p in prompts)
    ids = np.full((len(prompts), prompt_len + max_new_tokens), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    ids = jnp.asarray(ids)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    done = jnp.zeros(len(prompts), bool)
    for _ in range(max_new_tokens):
        ids, lengths, done = _greedy_step(logits_fn(ids, images), ids, lengths, done, eos_id)
        if bool(done.all()):
            break
    ids, lengths = np.asarray(ids), np.asarray(lengths)
    return [
        _cut_at_eos(ids[row, len(prompt) : lengths[row]], eos_id)
        for row, prompt in enumerate(prompts)
    ]


def prompt_bucket(length: int, buckets_per_octave: int = 4, minimum: int = 32) -> int:
    """The padded prompt length decoding compiles for: `length` rounded up to the next of
    `buckets_per_octave` evenly spaced lengths between two powers of two (multiples of 8,
    at least `minimum`); e.g. 4 per octave: 512, 640, 768, 896, 1024, 1280, ..."""
    if length <= minimum:
        return minimum
    octave = 1 << (length.bit_length() - 1)  # the power of two <= length
    step = max(octave // buckets_per_octave, 8)
    return -(-length // step) * step


def left_pad(
    prompts: Sequence[np.ndarray], pad_id: int, length: int
) -> tuple[np.ndarray, ...]:
    """ids [b, P = length] (pads first), segments [b, P] (pads 0, the prompt 1: attention's
    segment ids), positions [b, P] (0 at each first real token); `length` >= the longest
    prompt."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    segments = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        segments[row, length - len(prompt) :] = 1
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
    return ids, segments, positions


class _RowEnds:
    """Host-side bookkeeping of where each row's answer ends: at its first EOS (excluded) or
    at the first step where `stop` fires on the ids so far (included). Checked once per new
    token, so a stop predicate costs O(new tokens) calls per row."""

    def __init__(self, batch: int, eos_id: int, stop: StopFn | None):
        self.rows: list[list[int]] = [[] for _ in range(batch)]
        self.ends: list[int | None] = [None] * batch
        self.eos_id, self.stop = eos_id, stop

    def add(self, tokens: np.ndarray) -> None:
        """tokens [b]: the next token of every row."""
        for row, token in enumerate(tokens.tolist()):
            if self.ends[row] is not None:
                continue
            self.rows[row].append(token)
            if token == self.eos_id:
                self.ends[row] = len(self.rows[row]) - 1
            elif self.stop is not None and self.stop(self.rows[row]):
                self.ends[row] = len(self.rows[row])

    @property
    def all_done(self) -> bool:
        return all(end is not None for end in self.ends)

    def answers(self) -> list[list[int]]:
        return [row[:end] for row, end in zip(self.rows, self.ends)]


class CachedDecoder:
    """KV-cache decoding for one model config (compiled functions are reused across calls
    with the same batch shape and sampling). MoE layers route with the eval capacity factor
    and no gating noise."""

    def __init__(self, config: LVLMConfig, buckets_per_octave: int = 4):
        self.model = MoELLaVA(config)
        self.buckets_per_octave = buckets_per_octave

    @functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
    def _empty_cache(self, batch: int, max_len: int, image_shape: tuple[int, ...]) -> dict:
        ids = jnp.zeros((batch, max_len), jnp.int32)
        images = jnp.zeros((batch, *image_shape), jnp.float32)
        variables = jax.eval_shape(
            lambda: self.model.init(jax.random.key(0), ids, images, decode=True)
        )
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def _forward(self, sampling, params, cache, ids, images, positions, segments, rng):
        (logits, _), mutated = self.model.apply(
            {"params": params, "cache": cache},
            ids,
            images,
            positions=positions,
            segments=segments,
            decode=True,
            mutable=["cache"],
        )
        return next_token(logits[:, -1], rng, sampling), mutated["cache"]

    def __call__(
        self,
        params: dict,
        prompts: Sequence[np.ndarray],
        images: np.ndarray,
        *,
        max_new_tokens: int,
        eos_id: int,
        pad_id: int,
        stop: StopFn | None = None,
        sampling: Sampling = GREEDY,
    ) -> list[list[int]]:
        """Continuation ids of each prompt, cut at EOS (excluded) or where `stop` fired."""
        longest = max(len(p) for p in prompts)
        ids, segments, positions = left_pad(
            prompts, pad_id, prompt_bucket(longest, self.buckets_per_octave)
        )
        batch = len(prompts)
        key = jax.random.key(sampling.seed)
        cache = self._empty_cache(batch, ids.shape[1] + max_new_tokens, tuple(images.shape[1:]))
        token, cache = self._forward(
            sampling, params, cache, ids, images, positions, segments, jax.random.fold_in(key, 0)
        )
        position = positions[:, -1:] + 1  # [b, 1]
        rows = _RowEnds(batch, eos_id, stop)
        rows.add(np.asarray(token))
        step_segments = np.ones((batch, 1), np.int32)
        for step in range(1, max_new_tokens):
            if rows.all_done:
                break
            token, cache = self._forward(
                sampling,
                params,
                cache,
                token[:, None],
                None,
                position,
                step_segments,
                jax.random.fold_in(key, step),
            )
            position = position + 1
            rows.add(np.asarray(token))
        return rows.answers()
