"""Batched greedy decoding with different prompt lengths."""

import jax.numpy as jnp
import numpy as np

from moe_llava_jax.generate import greedy_generate

VOCAB, EOS, PAD = 10, 9, 0


def successor_logits(ids, images):
    """A 'model' whose next token is (token + 1) mod 9, and EOS after a 5."""
    del images
    nxt = jnp.where(ids == 5, EOS, (ids + 1) % 9)
    return jnp.eye(VOCAB)[nxt] * 10.0


def test_greedy_stops_per_row_at_eos_and_excludes_it():
    prompts = [np.array([1, 2]), np.array([3]), np.array([7, 8, 6, 7])]
    out = greedy_generate(
        successor_logits, prompts, np.zeros((3, 1)), max_new_tokens=6, eos_id=EOS, pad_id=PAD
    )
    assert out[0] == [3, 4, 5]
    assert out[1] == [4, 5]
    assert out[2] == [8, 0, 1, 2, 3, 4]  # hits max_new_tokens before EOS
