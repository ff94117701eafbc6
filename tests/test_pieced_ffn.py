"""The experts' backward over pieces of the mlp axis gives the plain FFN's numbers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_llava_jax.models import moe
from moe_llava_jax.models.mlp import FFNConfig
from moe_llava_jax.models.pieced_ffn import pieced_ffn


def stacked_project(h, params, names):
    return jnp.concatenate([moe.stacked_linear(h, params[n]) for n in names], axis=-1)


def expert_params(config: FFNConfig, experts: int, key: jax.Array) -> dict:
    names = ("wi_gate", "wi_up", "wo") if config.gated else ("wi", "wo")
    d, f = config.hidden_size, config.intermediate_size
    params = {}
    for name, k in zip(names, jax.random.split(key, len(names))):
        shape = (experts, f, d) if name == "wo" else (experts, d, f)
        params[name] = {"kernel": jax.random.normal(k, shape)}
        if config.use_bias:
            params[name]["bias"] = jax.random.normal(jax.random.fold_in(k, 1), shape[::2])
    return params


@pytest.mark.parametrize(
    "gated,use_bias,activation",
    [(True, False, "silu"), (False, True, "gelu_new")],
    ids=["swiglu", "gelu-with-biases"],
)
@pytest.mark.parametrize("pieces", [2, 3])
def test_pieced_backward_equals_the_plain_ffn(gated, use_bias, activation, pieces):
    # In float64: the pieces sum the hidden units in another order, which in float32 moves
    # some gradients by ~1e-5 depending on the CPU's kernels; float64 keeps that at ~1e-14,
    # so the comparison can be tight everywhere.
    with jax.enable_x64(True):
        config = FFNConfig(8, 12, activation, gated=gated, use_bias=use_bias)
        params = jax.tree.map(
            lambda p: p.astype(jnp.float64), expert_params(config, experts=3, key=jax.random.key(0))
        )
        x = jax.random.normal(jax.random.key(1), (3, 10, 8), jnp.float64)  # [E, rows, d]
        probe = jax.random.normal(jax.random.key(2), x.shape, jnp.float64)  # weights every output

        def loss(pieces):
            return lambda x, p: jnp.sum(
                probe * jnp.tanh(pieced_ffn(x, p, config, stacked_project, pieces))
            )

        expected = jax.value_and_grad(loss(1), argnums=(0, 1))(x, params)
        actual = jax.jit(jax.value_and_grad(loss(pieces), argnums=(0, 1)))(x, params)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)
    # The bias of the out-projection is counted once, not once per piece.
    if use_bias:
        np.testing.assert_allclose(
            actual[1][1]["wo"]["bias"], expected[1][1]["wo"]["bias"], rtol=1e-11, atol=1e-11
        )


def test_pieced_backward_holds_no_full_width_gradient():
    """The backward's hidden-unit products are [..., F / pieces] wide: the only full-width
    one in the program is the forward's (gate and up) pre-activations."""
    config = FFNConfig(8, 64, "silu", gated=True, use_bias=False)
    params = expert_params(config, experts=2, key=jax.random.key(0))
    x = jnp.ones((2, 16, 8))  # [E, rows, d]

    def products(pieces: int, width: int) -> int:
        loss = lambda x, p: pieced_ffn(x, p, config, stacked_project, pieces).sum()
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, params).as_text()
        shape = f"tensor<2x16x{width}xf32>"  # [E, rows, width]
        return sum(1 for line in hlo.splitlines() if "dot_general" in line and f"-> {shape}" in line)

    assert products(1, 64) > 2  # the plain backward: the activation's gradient at full width
    assert products(4, 64) == 0
    assert products(4, 128) == 1  # the forward's gate and up, one product of joined kernels
    assert products(4, 16) > 0  # the pieces'


def test_moe_layer_with_pieced_backward_trains_the_same():
    ffn = FFNConfig(8, 16, "silu", gated=True, use_bias=False)
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    plain = moe.MoELayer(moe.MoEConfig(num_experts=4, second_expert_noise=False), ffn)
    pieced = moe.MoELayer(dataclasses.replace(plain.config, backward_pieces=4), ffn)
    params = plain.init(jax.random.key(1), x, deterministic=False)["params"]

    def loss(layer):
        def of(p, x):
            out, stats = layer.apply({"params": p}, x, deterministic=False)
            return jnp.sum(out**2) + stats["aux_loss"]

        return jax.jit(jax.value_and_grad(of, argnums=(0, 1)))

    for got, want in zip(jax.tree.leaves(loss(pieced)(params, x)), jax.tree.leaves(loss(plain)(params, x))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"backward_pieces": 3}, r"model.moe.backward_pieces=3 must be >= 1 and divide.* 16"),
        ({"backward_pieces": 0}, r"model.moe.backward_pieces=0"),
        ({"backward_pieces": 2, "dispatch": "dropless"}, r"backward_pieces=2: only capacity"),
    ],
    ids=["not-a-divisor", "zero", "dropless"],
)
def test_bad_pieces_fail_naming_the_key(fields, match):
    ffn = FFNConfig(8, 16, "silu", gated=True, use_bias=False)
    layer = moe.MoELayer(moe.MoEConfig(**fields), ffn)
    with pytest.raises(ValueError, match=match):
        layer.init(jax.random.key(0), jnp.ones((2, 3, 8)), deterministic=True)
