"""Batched greedy decoding (full recompute per step; the KV-cache decoder is a later issue).

Prompts are right-padded into one [batch, prompt_len + max_new_tokens] buffer so every step
runs the same compiled program; row b's next token is read at its own last position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# (input_ids [b, t], images [b, H, W, 3]) -> logits [b, t, vocab]
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


@jax.jit
def _greedy_step(
    logits: jax.Array, ids: jax.Array, lengths: jax.Array, done: jax.Array, eos_id: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    next_token = jnp.argmax(logits[jnp.arange(ids.shape[0]), lengths - 1], axis=-1)
    next_token = jnp.where(done, ids[jnp.arange(ids.shape[0]), lengths - 1], next_token)
    ids = ids.at[jnp.arange(ids.shape[0]), lengths].set(
        jnp.where(done, ids[jnp.arange(ids.shape[0]), lengths], next_token)
    )
    lengths = lengths + (~done)
    return ids, lengths, done | (next_token == eos_id)


def greedy_generate(
    logits_fn: LogitsFn,
    prompts: Sequence[np.ndarray],
    images: np.ndarray,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> list[list[int]]:
    """Greedy continuation of each prompt; stops per row at EOS (excluded from the output)."""
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
    outputs = []
    for row, prompt in enumerate(prompts):
        new = ids[row, len(prompt) : lengths[row]].tolist()
        outputs.append(new[: new.index(eos_id)] if eos_id in new else new)
    return outputs
