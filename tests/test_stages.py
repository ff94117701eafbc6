"""Stage scheduler: which leaves train, upcycling, and what a step may touch."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_llava_jax import freeze, metrics_log, param_tree, train_step, upcycling
from tests.helpers import first_batch, make_stage


def fresh_state(stage):
    params = stage.fresh_params()
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": stage.tx.init(params)}


def test_presets_select_expected_leaves(micro_config):
    stage, _, _ = make_stage(micro_config, "stage3")
    canonical = stage.canonical(stage.abstract_params)  # rules name `layers_{i}` paths
    flat = param_tree.flatten(canonical)

    def trained(preset):
        mask = param_tree.flatten(freeze.trainable_mask(canonical, preset))
        return {k for k in flat if mask[k]}

    assert trained("stage1") == {k for k in flat if k.startswith("projector/")}
    assert trained("stage3_paper") == {k for k in flat if "/moe/" in k}
    assert any("/moe/router/" in k for k in trained("stage3_paper"))
    original = trained("stage3_original")
    assert original == {
        k
        for k in flat
        if "/moe/" in k or "/mlp/" in k and k.startswith("decoder") or k.startswith("projector/")
    }
    assert not any(k.startswith("vision/") for k in trained("stage2"))


def test_rules_selecting_nothing_fail(micro_config):
    stage, _, _ = make_stage(micro_config, "stage2")  # dense: has no MoE layers
    with pytest.raises(ValueError, match="select no parameter"):
        freeze.trainable_mask(stage.canonical(stage.abstract_params), "stage3_paper")


def test_upcycled_moe_logits_equal_dense_logits(micro_config):
    dense, data, tokenizer = make_stage(micro_config, "stage2")
    moe_stage, _, _ = make_stage(micro_config, "stage3")
    batch = first_batch(moe_stage, data, tokenizer)
    dense_params = jax.tree.map(
        lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape), dense.fresh_params()
    )
    moe_params = moe_stage.assemble(dense.canonical(dense_params), upcycle=True)
    dense_logits, _ = dense.model.apply(
        {"params": dense_params}, batch["input_ids"], batch["images"], deterministic=True
    )
    moe_logits, moe_stats = moe_stage.model.apply(
        {"params": moe_params}, batch["input_ids"], batch["images"], deterministic=True
    )
    assert float(moe_stats["dropped_fraction"].max()) == 0.0  # eval capacity: C = tokens
    np.testing.assert_allclose(moe_logits, dense_logits, atol=1e-5, rtol=1e-5)


def test_upcycle_copies_ffn_into_every_expert(micro_config):
    dense, _, _ = make_stage(micro_config, "stage2")
    moe_stage, _, _ = make_stage(micro_config, "stage3")
    dense_params = dense.canonical(dense.fresh_params())
    init = moe_stage.canonical(moe_stage.fresh_params())
    up = param_tree.flatten(upcycling.upcycle(dense_params, init))
    flat_dense = param_tree.flatten(dense_params)
    kernel = up["decoder/layers_0/moe/experts/wi_gate/kernel"]
    for e in range(kernel.shape[0]):
        np.testing.assert_array_equal(kernel[e], flat_dense["decoder/layers_0/mlp/wi_gate/kernel"])
    np.testing.assert_array_equal(
        up["decoder/layers_0/moe/router/kernel"],
        param_tree.flatten(init)["decoder/layers_0/moe/router/kernel"],
    )
    np.testing.assert_array_equal(
        up["decoder/layers_1/mlp/wo/kernel"], flat_dense["decoder/layers_1/mlp/wo/kernel"]
    )


def test_stage_upcycles_as_config_says(micro_config):
    micro_config.upcycle.update(mode="drop_upcycle", drop_fraction=0.25, seed=3)
    dense, _, _ = make_stage(micro_config, "stage2")
    moe_stage, _, _ = make_stage(micro_config, "stage3")
    dense_params = dense.canonical(dense.fresh_params())
    init = moe_stage.canonical(moe_stage.random_params())
    # Jitted, the MoE init traced in: its routers must equal `random_params`'.
    up = param_tree.flatten(moe_stage.canonical(moe_stage.assemble(dense_params, upcycle=True)))
    source = np.asarray(param_tree.flatten(dense_params)["decoder/layers_0/mlp/wo/kernel"])
    experts = np.asarray(up["decoder/layers_0/moe/experts/wo/kernel"])  # [E, F, d]
    rows_changed = (experts != source).all(axis=2).sum(axis=1)
    np.testing.assert_array_equal(rows_changed, [64 // 4] * experts.shape[0])  # F = 64
    np.testing.assert_array_equal(
        up["decoder/layers_0/moe/router/kernel"],
        param_tree.flatten(init)["decoder/layers_0/moe/router/kernel"],
    )


def test_z_loss_enters_the_loss_with_its_coefficient(micro_config):
    stage, data, tokenizer = make_stage(micro_config, "stage3")
    batch = first_batch(stage, data, tokenizer)
    params = stage.fresh_params()

    def loss(coef):
        return train_step.compute_loss(
            stage.model, params, batch, jax.random.key(0), 0.01, z_loss_coef=coef
        )

    base, metrics = loss(0.0)
    with_z, _ = loss(0.5)
    num_moe_layers = len(stage.model_cfg.decoder.moe_layers)
    assert metrics["router_z_loss"].shape == metrics["router_entropy"].shape == (num_moe_layers,)
    assert float(metrics["z_loss"]) == pytest.approx(float(metrics["router_z_loss"].sum()))
    assert float(metrics["z_loss"]) > 0
    assert float(with_z - base) == pytest.approx(0.5 * float(metrics["z_loss"]), rel=1e-4)


def test_log_metrics_writes_router_stats_per_moe_layer(tmp_path):
    class Writer:
        def __init__(self):
            self.tags = {}

        def add_scalar(self, tag, value, step):
            self.tags[tag] = value

    metrics = {
        "loss": jnp.float32(1.0),
        "z_loss": jnp.float32(3.0),
        "expert_load": jnp.full((2, 4), 0.25),
        "dropped_fraction": jnp.array([0.0, 0.1]),
        "router_entropy": jnp.array([1.2, 1.3]),
        "router_z_loss": jnp.array([1.0, 2.0]),
    }
    writer = Writer()
    with open(tmp_path / "metrics.jsonl", "w") as log_file:
        metrics_log.log_metrics(writer, log_file, 7, metrics)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["router_entropy"] == pytest.approx([1.2, 1.3])
    assert record["router_z_loss"] == [1.0, 2.0]
    assert record["z_loss"] == 3.0
    assert writer.tags["moe/layer1/router_entropy"] == pytest.approx(1.3)
    assert writer.tags["moe/layer0/router_z_loss"] == 1.0
    assert writer.tags["train/z_loss"] == 3.0


def count_arrays(tree):
    return len([x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and x.ndim > 0])


@pytest.mark.parametrize(
    "name,is_trained",
    [
        ("stage3", lambda path: "/moe/" in path),
        ("stage1", lambda path: path.startswith("projector/")),
    ],
)
def test_step_touches_only_trainable_leaves(micro_config, name, is_trained):
    stage, data, tokenizer = make_stage(micro_config, name)
    state = fresh_state(stage)
    before = param_tree.flatten(jax.device_get(state["params"]))
    num_trainable = sum(is_trained(k) for k in before)
    # Adam keeps mu and nu for trainable leaves only; frozen slots are MaskedNodes.
    assert count_arrays(state["opt_state"]) == 2 * num_trainable
    masked = [
        x
        for x in jax.tree.leaves(
            state["opt_state"], is_leaf=lambda x: isinstance(x, optax.MaskedNode)
        )
        if isinstance(x, optax.MaskedNode)
    ]
    assert len(masked) == 2 * (len(before) - num_trainable)
    batch = first_batch(stage, data, tokenizer)
    state, metrics = stage.train_step(state, batch)
    state, metrics = stage.train_step(state, batch)  # step 0 has lr 0 (warmup)
    after = param_tree.flatten(jax.device_get(state["params"]))
    for path in before:
        if is_trained(path):
            if "/moe/" in path or "kernel" in path:
                assert not np.array_equal(before[path], after[path]), f"{path} did not train"
        else:
            assert before[path].tobytes() == after[path].tobytes(), f"frozen {path} changed"
    assert int(state["step"]) == 2
    assert np.isfinite(float(metrics["loss"]))
