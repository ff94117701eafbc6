"""Batched greedy decoding: with a KV cache (`CachedGreedyDecoder`, what evaluation uses) and
by full recomputation (`greedy_generate`, the reference the cached decoder is tested against).

Cached: prompts are left-padded (positions restart at 0 on each row's first real token, pads
are masked as keys), the prompt is prefilled in one call, then one token per step; every call
is jitted with static shapes, so a batch compiles twice (prefill + step) and no more.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_llava_jax.models.lvlm import LVLMConfig, MoELLaVA

# (input_ids [b, t], images [b, H, W, 3]) -> logits [b, t, vocab]
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
# (prompts, images [b, H, W, 3], *, max_new_tokens, eos_id, pad_id) -> generated ids per prompt
GenerateFn = Callable[..., list[list[int]]]


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


def left_pad(prompts: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, ...]:
    """ids [b, P] (pads first), valid [b, P], positions [b, P] (0 at each first real token)."""
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        valid[row, length - len(prompt) :] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return ids, valid, positions


class CachedGreedyDecoder:
    """Greedy decoding with a KV cache for one model config (compiled functions are reused
    across calls with the same batch shape). MoE layers route with the eval capacity factor
    and no gating noise."""

    def __init__(self, config: LVLMConfig):
        self.model = MoELLaVA(config)

    @functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
    def _empty_cache(self, batch: int, max_len: int, image_shape: tuple[int, ...]) -> dict:
        ids = jnp.zeros((batch, max_len), jnp.int32)
        images = jnp.zeros((batch, *image_shape), jnp.float32)
        variables = jax.eval_shape(
            lambda: self.model.init(jax.random.key(0), ids, images, decode=True)
        )
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])

    @functools.partial(jax.jit, static_argnums=0)
    def _forward(self, params, cache, ids, images, positions, valid):
        (logits, _), mutated = self.model.apply(
            {"params": params, "cache": cache},
            ids,
            images,
            positions=positions,
            valid=valid,
            decode=True,
            mutable=["cache"],
        )
        return jnp.argmax(logits[:, -1], axis=-1), mutated["cache"]

    def __call__(
        self,
        params: dict,
        prompts: Sequence[np.ndarray],
        images: np.ndarray,
        *,
        max_new_tokens: int,
        eos_id: int,
        pad_id: int,
    ) -> list[list[int]]:
        """Greedy continuation of each prompt, cut at EOS (excluded)."""
        ids, valid, positions = left_pad(prompts, pad_id)
        batch = len(prompts)
        cache = self._empty_cache(batch, ids.shape[1] + max_new_tokens, tuple(images.shape[1:]))
        token, cache = self._forward(params, cache, ids, images, positions, valid)
        position = positions[:, -1:] + 1  # [b, 1]
        tokens = [np.asarray(token)]
        step_valid = np.ones((batch, 1), bool)
        while len(tokens) < max_new_tokens and not np.all(
            np.any(np.stack(tokens) == eos_id, axis=0)
        ):
            token, cache = self._forward(params, cache, token[:, None], None, position, step_valid)
            position = position + 1
            tokens.append(np.asarray(token))
        generated = np.stack(tokens, axis=1)  # [b, new]
        return [_cut_at_eos(row, eos_id) for row in generated]
