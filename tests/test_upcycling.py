"""Dense FFN -> MoE upcycling modes and the shared expert, on one tiny MoE layer."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_llava_jax import build, param_tree, sharding, trainer, upcycling
from moe_llava_jax.models.mlp import MLP, FFNConfig
from moe_llava_jax.models.moe import MoEConfig, MoELayer

NUM_EXPERTS = 4
X = jax.random.normal(jax.random.key(9), (2, 6, 32))  # [batch, tokens, embed]


def ffn_config(gated: bool = True, intermediate: int = 64) -> FFNConfig:
    return FFNConfig(32, intermediate, "silu" if gated else "gelu", gated, use_bias=True)


def moe_layer(ffn: FFNConfig, shared_expert: bool = False) -> MoELayer:
    # top-2 at eval capacity 2.0 with 4 experts: C = tokens, so no choice is dropped.
    config = MoEConfig(NUM_EXPERTS, top_k=2, router_init_std=1.0, shared_expert=shared_expert)
    return MoELayer(config, ffn)


def dense_params(ffn: FFNConfig) -> dict:
    """A 'trained' dense FFN: every leaf (biases too) random, with its own mean (2.5 of its
    stds away from 0, so a re-init that ignored it would show) and scale."""
    init = nn.unbox(MLP(ffn).init(jax.random.key(0), X)["params"])
    flat = param_tree.flatten(init)
    keys = jax.random.split(jax.random.key(1), len(flat))
    return param_tree.unflatten(
        {
            path: (i + 1) * (0.5 + 0.2 * jax.random.normal(key, value.shape))
            for i, ((path, value), key) in enumerate(zip(flat.items(), keys))
        }
    )


def trees(ffn: FFNConfig, shared_expert: bool = False) -> tuple[dict, dict]:
    """(dense tree, MoE init tree) shaped like the decoder's: `layers_0/{mlp|moe}`, plus a
    non-FFN leaf that upcycling must copy."""
    norm = {"scale": jnp.arange(32.0)}
    moe_init = moe_layer(ffn, shared_expert).init(
        {"params": jax.random.key(2)}, X, deterministic=True
    )["params"]
    dense = {"layers_0": {"mlp": dense_params(ffn), "norm": norm}}
    moe = {"layers_0": {"moe": nn.unbox(moe_init), "norm": {"scale": jnp.zeros(32)}}}
    return dense, moe


def up(ffn: FFNConfig, mode: str, shared_expert: bool = False, **kwargs) -> tuple[dict, dict]:
    """(flat dense, flat upcycled) params of layer 0."""
    dense, moe_init = trees(ffn, shared_expert)
    upcycled = upcycling.upcycle(dense, moe_init, jax.random.key(5), mode=mode, **kwargs)
    return param_tree.flatten(dense), param_tree.flatten(upcycled)


def expert_pairs(dense: dict, upcycled: dict):
    """(param name, dense [...], experts [E, ...]) for every expert param."""
    prefix = "layers_0/moe/experts/"
    for path, experts in upcycled.items():
        if path.startswith(prefix):
            name = path.removeprefix(prefix)
            yield name, np.asarray(dense[f"layers_0/mlp/{name}"]), np.asarray(experts)


@pytest.mark.parametrize("gated", [True, False])
def test_copy_keeps_the_layer_equal_to_the_dense_ffn(gated):
    ffn = ffn_config(gated)
    dense, moe_init = trees(ffn)
    params = upcycling.upcycle(dense, moe_init)["layers_0"]["moe"]
    out, stats = moe_layer(ffn).apply({"params": params}, X, deterministic=True)
    assert float(stats["dropped_fraction"]) == 0.0
    assert int((stats["expert_load"] > 0).sum()) >= 3  # tokens really spread over experts
    expected = MLP(ffn).apply({"params": dense["layers_0"]["mlp"]}, X)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_copy_noise_has_the_requested_relative_std():
    dense, upcycled = up(ffn_config(), "copy_noise", noise_scale=0.1)
    for name, source, experts in expert_pairs(dense, upcycled):
        noise = (experts - source) / (0.1 * source.std())  # [E, ...], ~ N(0, 1) each
        for e in range(NUM_EXPERTS):
            assert abs(noise[e].std() - 1.0) < 0.2, name
            assert abs(noise[e].mean()) < 0.3, name
        assert not np.allclose(noise[0], noise[1]), f"{name}: experts share their noise"
    assert upcycled["layers_0/norm/scale"].tolist() == list(range(32))


# intermediate 32: embed == mlp, where shapes cannot tell input from output projections.
@pytest.mark.parametrize("gated,intermediate", [(True, 64), (True, 32), (False, 64)])
def test_drop_upcycle_reinitialises_floor_r_f_channels_per_expert(gated, intermediate):
    ffn = ffn_config(gated, intermediate)
    dense, upcycled = up(ffn, "drop_upcycle", drop_fraction=0.3)
    count = math.floor(0.3 * intermediate)
    # Channel axis in [E, ...] experts: input kernels [E, d, F] and biases [E, F] by the
    # last axis, the output kernel [E, F, d] by axis 1; the output bias has none.
    channel_axis = {
        "wi_gate/kernel": 2,
        "wi_gate/bias": 1,
        "wi_up/kernel": 2,
        "wi_up/bias": 1,
        "wi/kernel": 2,
        "wi/bias": 1,
        "wo/kernel": 1,
    }
    dropped = {}  # param -> [E, F] bool: channels with any changed entry
    for name, source, experts in expert_pairs(dense, upcycled):
        changed = experts != source  # [E, ...]
        if name == "wo/bias":
            assert not changed.any()
            continue
        axis = channel_axis[name]
        other = tuple(a for a in range(1, experts.ndim) if a != axis)
        dropped[name] = changed.any(axis=other) if other else changed
        # A re-initialised channel is re-drawn entirely; the others are exact copies.
        assert np.array_equal(dropped[name], changed.all(axis=other) if other else changed)
        fresh = np.moveaxis(experts, axis, 1)[dropped[name]].ravel()  # E * count * (d or 1)
        # Within 4 standard errors of the dense tensor's mean and std.
        assert abs(fresh.mean() - source.mean()) < 4 * source.std() / math.sqrt(fresh.size), name
        assert abs(fresh.std() / source.std() - 1.0) < 4 / math.sqrt(2 * fresh.size), name
    first = dropped["wo/kernel"]
    np.testing.assert_array_equal(first.sum(axis=1), [count] * NUM_EXPERTS)
    for name, channels in dropped.items():
        np.testing.assert_array_equal(channels, first, err_msg=f"{name}: other channels")
    assert len({tuple(np.flatnonzero(row)) for row in first}) == NUM_EXPERTS


def test_random_keeps_the_fresh_moe_init():
    dense, moe_init = trees(ffn_config(), shared_expert=True)
    upcycled = param_tree.flatten(upcycling.upcycle(dense, moe_init, mode="random"))
    for path, value in param_tree.flatten(moe_init).items():
        if "/moe/" in path:
            np.testing.assert_array_equal(upcycled[path], value, err_msg=path)


@pytest.mark.parametrize("mode", ["copy", "copy_noise", "drop_upcycle"])
def test_router_from_init_and_shared_expert_copied_exactly(mode):
    ffn = ffn_config()
    dense, moe_init = trees(ffn, shared_expert=True)
    upcycled = param_tree.flatten(upcycling.upcycle(dense, moe_init, jax.random.key(5), mode=mode))
    init = param_tree.flatten(moe_init)
    for path, value in param_tree.flatten(dense).items():
        if "/mlp/" in path:
            shared = path.replace("/mlp/", "/moe/shared_expert/")
            np.testing.assert_array_equal(upcycled[shared], value, err_msg=shared)
    router = "layers_0/moe/router/kernel"
    np.testing.assert_array_equal(upcycled[router], init[router])


def test_shared_expert_output_is_routed_plus_dense():
    ffn = ffn_config()
    # Upcycled, so routed and shared outputs have the same scale; noisy, so they differ.
    _, upcycled = up(ffn, "copy_noise", shared_expert=True, noise_scale=0.3)
    params = param_tree.unflatten(upcycled)["layers_0"]["moe"]
    out, _ = moe_layer(ffn, shared_expert=True).apply({"params": params}, X, deterministic=True)
    routed_params = {k: v for k, v in params.items() if k != "shared_expert"}
    routed, _ = moe_layer(ffn).apply({"params": routed_params}, X, deterministic=True)
    dense = MLP(ffn).apply({"params": params["shared_expert"]}, X)
    assert not np.allclose(routed, dense, rtol=0.05)
    np.testing.assert_allclose(out, routed + dense, rtol=1e-5, atol=1e-5)


def test_modes_that_draw_need_an_rng():
    dense, moe_init = trees(ffn_config())
    with pytest.raises(ValueError, match="needs an rng"):
        upcycling.upcycle(dense, moe_init, mode="drop_upcycle")


def test_upcycle_jits_with_static_mode():
    ffn = ffn_config()
    dense, moe_init = trees(ffn)
    jitted = jax.jit(functools.partial(upcycling.upcycle, mode="drop_upcycle"))
    eager = upcycling.upcycle(dense, moe_init, jax.random.key(5), mode="drop_upcycle")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),  # XLA fuses
        jitted(dense, moe_init, jax.random.key(5)),
        eager,
    )


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("upcycle.mode", "noisy", "upcycle.mode='noisy'"),
        ("upcycle.drop_fraction", 1.5, "upcycle.drop_fraction=1.5"),
        ("upcycle.noise_scale", -0.1, "upcycle.noise_scale=-0.1"),
        ("router_z_loss_coef", -1.0, "router_z_loss_coef=-1.0"),
    ],
)
def test_bad_upcycle_and_router_settings_name_the_key(micro_config, key, value, match):
    node, _, leaf = key.rpartition(".")
    (micro_config[node] if node else micro_config)[leaf] = value
    with pytest.raises(ValueError, match=match):
        trainer.validate_config(micro_config)


def test_stage3_assembly_computes_no_random_experts(micro_config):
    """Upcycling a stage-2 model into stage 3 traces the MoE model's init in the same program
    (`StageModel.assembly`): the random experts it would draw are never computed, so the
    program's temporaries stay far below one copy of the experts (a separate random MoE
    tree, as `init_from` used to build, is at least that)."""
    micro_config.model.decoder.update(hidden_size=128, intermediate_size=512)
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    dense = build.StageModel(micro_config, "stage2", mesh, 512)
    moe = build.StageModel(micro_config, "stage3", mesh, 512)
    abstract_dense = jax.eval_shape(dense.canonical, dense.abstract_params)
    memory = moe.assembly(upcycle=True).lower(abstract_dense).compile().memory_analysis()
    experts = sum(
        x.size * x.dtype.itemsize
        for path, x in param_tree.flatten(moe.abstract_params).items()
        if "/moe/experts/" in path
    )
    assert memory.temp_size_in_bytes < experts / 8, (memory.temp_size_in_bytes, experts)
    assert memory.output_size_in_bytes >= experts
