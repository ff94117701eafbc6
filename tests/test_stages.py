"""Stage scheduler: which leaves train, upcycling, and what a step may touch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_llava_jax import sharding, stages, train


def make_stage(config, name):
    data, tokenizer = train.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    return train.Stage(config, name, mesh, tokenizer.vocab_size), data, tokenizer


def first_batch(stage, data, tokenizer):
    batches = stage.batches(train.stage_source(stage.config, stage.name, data), tokenizer)
    return {k: jnp.asarray(v) for k, v in batches[0].items()}


def fresh_state(stage):
    params = stage.fresh_params()
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": stage.tx.init(params)}


def test_presets_select_expected_leaves(micro_config):
    stage, _, _ = make_stage(micro_config, "stage3")
    flat = stages.flatten(stage.abstract_params)

    def trained(preset):
        mask = stages.flatten(stages.trainable_mask(stage.abstract_params, preset))
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
        stages.trainable_mask(stage.abstract_params, "stage3_paper")


def test_upcycled_moe_logits_equal_dense_logits(micro_config):
    dense, data, tokenizer = make_stage(micro_config, "stage2")
    moe_stage, _, _ = make_stage(micro_config, "stage3")
    batch = first_batch(moe_stage, data, tokenizer)
    dense_params = jax.tree.map(
        lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape), dense.fresh_params()
    )
    moe_params = stages.upcycle(dense_params, moe_stage.fresh_params())
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
    dense_params = dense.fresh_params()
    init = moe_stage.fresh_params()
    up = stages.flatten(stages.upcycle(dense_params, init))
    flat_dense = stages.flatten(dense_params)
    kernel = up["decoder/layers_0/moe/experts/wi_gate/kernel"]
    for e in range(kernel.shape[0]):
        np.testing.assert_array_equal(kernel[e], flat_dense["decoder/layers_0/mlp/wi_gate/kernel"])
    np.testing.assert_array_equal(
        up["decoder/layers_0/moe/router/kernel"],
        stages.flatten(init)["decoder/layers_0/moe/router/kernel"],
    )
    np.testing.assert_array_equal(
        up["decoder/layers_1/mlp/wo/kernel"], flat_dense["decoder/layers_1/mlp/wo/kernel"]
    )


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
    before = stages.flatten(jax.device_get(state["params"]))
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
    after = stages.flatten(jax.device_get(state["params"]))
    for path in before:
        if is_trained(path):
            if "/moe/" in path or "kernel" in path:
                assert not np.array_equal(before[path], after[path]), f"{path} did not train"
        else:
            assert before[path].tobytes() == after[path].tobytes(), f"frozen {path} changed"
    assert int(state["step"]) == 2
    assert np.isfinite(float(metrics["loss"]))
