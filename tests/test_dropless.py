"""Dropless dispatch: the grouped matmul against a loop, and the layer against capacity mode."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_llava_jax.models import moe
from moe_llava_jax.models.grouped_matmul import IMPLEMENTATIONS, grouped_matmul
from moe_llava_jax.models.mlp import FFNConfig

X = jax.random.normal(jax.random.key(0), (2, 12, 16))  # [batch, tokens, embed]


def reference_grouped(x, kernels, group_sizes, cotangent):
    """(y, dL/dx, dL/dkernels) of L = sum(y * cotangent), group by group in numpy; rows past
    the groups' total give 0 (and get gradient 0)."""
    x, kernels, cotangent = (np.asarray(a, np.float64) for a in (x, kernels, cotangent))
    y = np.zeros((x.shape[0], kernels.shape[2]))
    dx, dk = np.zeros_like(x), np.zeros_like(kernels)
    start = 0
    for e, size in enumerate(group_sizes):
        rows = slice(start, start + size)
        y[rows] = x[rows] @ kernels[e]
        dx[rows] = cotangent[rows] @ kernels[e].T
        dk[e] = x[rows].T @ cotangent[rows]
        start += size
    return y, dx, dk


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "group_sizes, trailing_rows",
    [
        ([0, 5, 0, 40, 3, 0], 0),  # empty groups, first and last included
        ([7, 0, 0, 0, 0, 0], 0),  # one group holds every row
        ([9, 8, 11, 6, 10, 9], 0),
        ([9, 8, 11, 6, 10, 9], 21),  # rows in no group (expert parallelism's buffers)
        ([0, 0, 3, 0, 0, 0], 30),
    ],
)
def test_grouped_matmul_equals_per_group_loop(implementation, group_sizes, trailing_rows):
    rows = sum(group_sizes) + trailing_rows
    keys = jax.random.split(jax.random.key(len(group_sizes) + rows), 3)
    x = jax.random.normal(keys[0], (rows, 8))
    kernels = jax.random.normal(keys[1], (len(group_sizes), 8, 5))
    cotangent = jax.random.normal(keys[2], (rows, 5))
    sizes = jnp.array(group_sizes)

    def loss(x, kernels):
        y = grouped_matmul(x, kernels, sizes, implementation=implementation, block_size=8)
        return jnp.sum(y * cotangent), y

    (_, y), (dx, dk) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernels)
    expected = reference_grouped(x, kernels, group_sizes, cotangent)
    for got, want in zip((y, dx, dk), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def layer(dispatch: str, gated: bool = True, **moe_kwargs) -> moe.MoELayer:
    config = moe.MoEConfig(num_experts=4, top_k=2, router_init_std=1.0, dispatch=dispatch)
    ffn = FFNConfig(16, 24, "silu" if gated else "gelu", gated, use_bias=True)
    return moe.MoELayer(dataclasses.replace(config, **moe_kwargs), ffn)


def random_params(dispatch: str, gated: bool) -> dict:
    """A random param tree; biases random too, so that a bias added to the wrong row shows."""
    init = nn.unbox(layer(dispatch, gated).init(jax.random.key(1), X, deterministic=True))
    keys = iter(jax.random.split(jax.random.key(2), 100))
    return jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape) * 0.5, init["params"])


@pytest.mark.slow
def test_both_modes_declare_the_same_params():
    """Same names, shapes, logical axes and init values: checkpoints fit either mode."""
    capacity, dropless = (
        layer(dispatch).init(jax.random.key(1), X, deterministic=True)["params"]
        for dispatch in moe.DISPATCH_MODES
    )
    assert jax.tree.structure(capacity) == jax.tree.structure(dropless)  # boxes' names too
    jax.tree.map(np.testing.assert_array_equal, capacity, dropless)
    assert dropless["experts"]["wo"]["kernel"].names == ("expert", "mlp", "embed")


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("deterministic", [True, False])
def test_dropless_equals_capacity_when_nothing_is_dropped(gated, deterministic):
    # C = k * cf * s / E = s: nothing can drop. Training mode draws the same gating noise.
    params = random_params("capacity", gated)
    rngs = {"gating": jax.random.key(3)}

    def run(dispatch):
        model = layer(dispatch, gated, capacity_factor=2.0, eval_capacity_factor=2.0)

        def loss(params, x):
            out, stats = model.apply({"params": params}, x, deterministic, rngs=rngs)
            return jnp.sum(out * jnp.cos(out)) + stats["aux_loss"], (out, stats)

        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, X)

    (capacity_grads, (capacity_out, capacity_stats)) = run("capacity")
    (dropless_grads, (dropless_out, dropless_stats)) = run("dropless")
    assert float(capacity_stats["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(dropless_out, capacity_out, rtol=1e-5, atol=1e-5)
    for name in ("aux_loss", "z_loss", "router_entropy", "expert_load", "dropped_fraction"):
        np.testing.assert_allclose(dropless_stats[name], capacity_stats[name], rtol=1e-6)
    assert jax.tree.structure(dropless_grads) == jax.tree.structure(capacity_grads)
    for got, want in zip(jax.tree.leaves(dropless_grads), jax.tree.leaves(capacity_grads)):
        # Sums over tokens in another order: f32 rounding relative to the leaf's scale.
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def test_tight_capacity_drops_and_dropless_does_not():
    params = random_params("capacity", gated=True)
    # Eval capacity ceil(2 * 0.5 * 24 / 4) = 6 slots per expert for 12 choices on average.
    outputs = {
        dispatch: layer(dispatch, eval_capacity_factor=0.5).apply(
            {"params": params}, X, deterministic=True
        )
        for dispatch in moe.DISPATCH_MODES
    }
    assert float(outputs["capacity"][1]["dropped_fraction"]) > 0.2
    assert float(outputs["dropless"][1]["dropped_fraction"]) == 0.0

    logits = X.reshape(1, 24, 16) @ params["router"]["kernel"]  # [g, s, E]
    capacity = moe.expert_capacity(24, 4, 2, 0.5, 0)
    routing = moe.route_top_k(logits, top_k=2, capacity=capacity)
    lost_a_choice = np.asarray((routing.slot[0] == capacity).any(-1)).reshape(2, 12)
    differs = ~np.isclose(outputs["capacity"][0], outputs["dropless"][0], atol=1e-5).all(-1)
    np.testing.assert_array_equal(differs, lost_a_choice)


def test_unknown_dispatch_names_the_config_key():
    with pytest.raises(ValueError, match="model.moe.dispatch"):
        layer("ragged").init(jax.random.key(1), X, deterministic=True)


@pytest.mark.slow
def test_jitted_lvlm_forward_with_dropless_matches_capacity():
    from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
    from moe_llava_jax.models.lvlm import MoELLaVA
    from tests.tiny_models import tiny_lvlm_config

    def model(dispatch: str) -> MoELLaVA:
        config = moe.MoEConfig(layers="0", router_init_std=1.0, dispatch=dispatch)
        return MoELLaVA(tiny_lvlm_config(config))

    vision = tiny_lvlm_config(moe.MoEConfig()).vision

    rng = np.random.default_rng(0)
    prompt = np.array([[3, 4] + [IMAGE_TOKEN_INDEX] * vision.num_image_tokens] * 2)
    ids = np.concatenate([prompt, rng.integers(1, 40, (2, 6))], axis=1)  # [2, 2 + n + 6]
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    params = nn.unbox(model("dropless").init(jax.random.key(0), ids, images)["params"])
    logits = {}
    for dispatch in moe.DISPATCH_MODES:
        forward = jax.jit(model(dispatch).apply)
        logits[dispatch] = forward({"params": params}, ids, images)[0]
        assert np.isfinite(logits[dispatch]).all()
    # Eval capacity factor 2.0 with E = 4, k = 2: C = tokens, nothing dropped in capacity mode.
    np.testing.assert_allclose(logits["dropless"], logits["capacity"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_moe_tuning_trains_and_analyses_routing_with_dropless(micro_config):
    """The whole recipe with `model.moe.dispatch=dropless`: stage 3 trains (finite losses,
    nothing dropped) and the routing analysis reads the dropless layers' choices."""
    import json
    from pathlib import Path

    from moe_llava_jax import trainer

    micro_config.model.moe.dispatch = "dropless"
    micro_config.routing.after = "stage3"
    trainer.run(micro_config)
    workdir = Path(micro_config.workdir)
    stage3 = [json.loads(line) for line in (workdir / "stage3" / "metrics.jsonl").open()]
    assert len(stage3) == 4 and all(np.isfinite(m["loss"]) for m in stage3)
    assert all(m["dropped_fraction"] == [0.0] for m in stage3)
    summary = json.loads((workdir / "stage3" / "routing" / "routing.json").read_text())
    counts = np.asarray(summary["top1_counts"])
    assert counts.sum(axis=-1).tolist() == [list(summary["tokens"].values())]
