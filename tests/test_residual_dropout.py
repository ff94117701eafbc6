"""Residual dropout (Phi-2's resid_pdrop, `DecoderConfig.residual_dropout`): on the attention
and FFN/MoE outputs in training only, drawn from the "dropout" stream, per layer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_llava_jax.models.decoder import Decoder, DecoderConfig
from moe_llava_jax.models.moe import MoEConfig

CONFIG = DecoderConfig(
    vocab_size=40, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
    intermediate_size=48, norm="layernorm", moe=MoEConfig(num_experts=2, layers="0,2"),
)
X = jax.random.normal(jax.random.key(1), (2, 6, 32))
POSITIONS = jnp.broadcast_to(jnp.arange(6), (2, 6))


def hidden(config, deterministic, rng=jax.random.key(3)):
    params = Decoder(config).init(jax.random.key(0), X, POSITIONS)["params"]
    out, _ = Decoder(config).apply(
        {"params": params}, X, POSITIONS, deterministic=deterministic, head=False,
        rngs={"gating": jax.random.key(2), "dropout": rng},
    )
    return out


def final_norm_only(config):
    """What the decoder computes when every block adds nothing to the residual stream."""
    params = Decoder(config).init(jax.random.key(0), X, POSITIONS)["params"]
    return Decoder(config).apply(
        {"params": params}, X, method=lambda m, x: m.final_norm(x)
    )


@pytest.mark.parametrize("parallel_block", [False, True])
def test_rate_one_drops_both_branches_of_every_block(parallel_block):
    """At rate 1 each block's attention and FFN/MoE outputs are zeroed: the residual stream
    reaches the final norm unchanged (a branch left undropped anywhere would show)."""
    config = dataclasses.replace(CONFIG, residual_dropout=1.0, parallel_block=parallel_block)
    np.testing.assert_allclose(hidden(config, False), final_norm_only(config), atol=1e-6)
    assert not np.allclose(hidden(config, True), final_norm_only(config), atol=1e-3)


def test_dropout_acts_in_training_only_and_follows_its_stream():
    config = dataclasses.replace(CONFIG, residual_dropout=0.3)
    plain = dataclasses.replace(CONFIG, residual_dropout=0.0)
    np.testing.assert_array_equal(hidden(config, True), hidden(plain, True))
    np.testing.assert_array_equal(hidden(plain, False), hidden(plain, False, jax.random.key(9)))
    trained = hidden(config, False)
    np.testing.assert_array_equal(trained, hidden(config, False))
    assert not np.allclose(trained, hidden(plain, False), atol=1e-3)
    assert not np.allclose(trained, hidden(config, False, jax.random.key(9)), atol=1e-3)

