"""Scanned layers: the plans, the two param layouts, and scanned == looped models."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_llava_jax import freeze, param_tree
from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
from moe_llava_jax.generate import CachedDecoder
from moe_llava_jax.models import scan
from moe_llava_jax.models.lvlm import MoELLaVA, layer_plans
from moe_llava_jax.models.moe import MoEConfig
from tests.tiny_models import tiny_lvlm_config


def segments(plan):
    return [(s.start, s.kinds, s.repeats, s.scanned) for s in plan]


def test_plans_follow_the_placement():
    M, D = True, False
    assert segments(scan.plan_decoder(4, (0, 2), "sparse")) == [(0, (M, D), 2, True)]
    # An odd depth: the pairs, then the last MoE layer on its own.
    assert segments(scan.plan_decoder(5, (0, 2, 4), "sparse")) == [
        (0, (M, D), 2, True),
        (4, (M,), 1, False),
    ]
    assert segments(scan.plan_decoder(4, (0, 1), "first_half")) == [
        (0, (M,), 2, True),
        (2, (D,), 2, True),
    ]
    assert segments(scan.plan_decoder(3, (), None)) == [(0, (D,), 3, True)]
    assert segments(scan.plan_decoder(4, (0, 3), "0,3")) == [
        (i, (k,), 1, False) for i, k in enumerate((M, D, D, M))
    ]
    assert segments(scan.plan_uniform(3)) == [(0, (None,), 3, True)]


def lvlm(num_layers, placement, vision_layers=3, dispatch="capacity", moe=True):
    """Tiny MoE-LLaVA with `num_layers` decoder layers and vision_layers - 1 tower blocks run;
    no gating noise, so scanned and looped models route alike in training mode too."""
    moe_cfg = MoEConfig(
        num_experts=4, top_k=2, layers=placement, second_expert_noise=False, dispatch=dispatch
    )
    config = tiny_lvlm_config(moe_cfg if moe else None)
    return dataclasses.replace(
        config,
        decoder=dataclasses.replace(config.decoder, num_layers=num_layers),
        vision=dataclasses.replace(config.vision, num_layers=vision_layers),
    )


def inputs(batch=2, seq=12):
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 40, (batch, seq))
    ids[:, 1:5] = IMAGE_TOKEN_INDEX  # the tower's 4 patches
    images = rng.uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(images)


def looped_params(config):
    ids, images = inputs()
    looped = dataclasses.replace(config, scan_layers=False)
    return nn.unbox(MoELLaVA(looped).init(jax.random.key(0), ids, images)["params"])


CASES = {
    "sparse-odd": dict(num_layers=3, placement="sparse"),
    "sparse-dropless": pytest.param(
        dict(num_layers=4, placement="sparse", dispatch="dropless"), marks=pytest.mark.slow
    ),
    "first-half": dict(num_layers=4, placement="first_half"),
    "every-layer": dict(num_layers=3, placement="dense"),
    "index-list": dict(num_layers=4, placement="0,3"),
    "dense-model": dict(num_layers=3, placement="sparse", moe=False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_scanned_and_looped_models_give_the_same_logits_and_gradients(case):
    config = lvlm(**case)
    plans = layer_plans(config)
    canonical = looped_params(config)
    ids, images = inputs()
    weights = jax.random.normal(jax.random.key(1), (2, 12, 40))

    def loss(params, model_config):
        logits, stats = MoELLaVA(model_config).apply(
            {"params": params}, ids, images, deterministic=False
        )
        aux = jnp.sum(stats["aux_loss"]) if stats else 0.0
        return jnp.sum(logits * weights) + aux, (logits, stats)

    looped = dataclasses.replace(config, scan_layers=False)
    (_, (loop_logits, loop_stats)), loop_grads = jax.value_and_grad(loss, has_aux=True)(
        canonical, looped
    )
    stacked = scan.stack_layers(canonical, plans)
    (_, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(stacked, config)

    np.testing.assert_allclose(logits, loop_logits, rtol=1e-5, atol=1e-5)
    for name in loop_stats:  # per MoE layer, in layer order
        np.testing.assert_allclose(stats[name], loop_stats[name], rtol=1e-5, atol=1e-6)
    flat_grads = param_tree.flatten(scan.unstack_layers(grads, plans))
    flat_loop = param_tree.flatten(loop_grads)
    assert flat_grads.keys() == flat_loop.keys()
    for path, grad in flat_loop.items():
        np.testing.assert_allclose(flat_grads[path], grad, rtol=1e-4, atol=1e-5, err_msg=path)


def test_scanned_model_declares_the_stacked_layout():
    config = lvlm(num_layers=5, placement="sparse")
    ids, images = inputs()
    declared = jax.eval_shape(MoELLaVA(config).init, jax.random.key(0), ids, images)["params"]
    declared = nn.unbox(declared)
    stacked = scan.stack_layers(
        jax.eval_shape(lambda: looped_params(config)), layer_plans(config)
    )
    assert jax.tree.map(lambda x: (x.shape, x.dtype), declared) == jax.tree.map(
        lambda x: (x.shape, x.dtype), stacked
    )
    decoder = declared["decoder"]
    assert decoder["scan_0"]["block_0"]["moe"]["experts"]["wo"]["kernel"].shape == (2, 4, 48, 32)
    assert "mlp" in decoder["scan_0"]["block_1"] and "moe" in decoder["layers_4"]
    assert declared["vision"]["scan_0"]["block_0"]["attn"]["q_proj"]["kernel"].shape[0] == 2


def test_scanned_params_carry_the_layers_logical_axis():
    config = lvlm(num_layers=4, placement="sparse")
    ids, images = inputs()
    boxed = jax.eval_shape(MoELLaVA(config).init, jax.random.key(0), ids, images)["params"]
    specs = {k: tuple(v) for k, v in param_tree.flatten(nn.get_partition_spec(boxed)).items()}
    assert specs["decoder/scan_0/block_0/moe/experts/wo/kernel"] == (
        "layers",
        "expert",
        "mlp",
        "embed",
    )
    assert specs["decoder/scan_0/block_1/attn/q_proj/kernel"] == ("layers", "embed", "heads")


def test_layouts_round_trip():
    config = lvlm(num_layers=5, placement="sparse")
    canonical = looped_params(config)
    plans = layer_plans(config)
    again = scan.unstack_layers(scan.stack_layers(canonical, plans), plans)
    assert param_tree.flatten(again).keys() == param_tree.flatten(canonical).keys()
    for path, value in param_tree.flatten(canonical).items():
        np.testing.assert_array_equal(param_tree.flatten(again)[path], value)


def test_a_mask_must_treat_a_scanned_param_as_a_whole():
    config = lvlm(num_layers=4, placement="sparse")
    canonical = jax.eval_shape(lambda: looped_params(config))
    plans = layer_plans(config)
    whole = freeze.trainable_mask(canonical, "stage3_paper")
    stacked = param_tree.flatten(scan.stack_layers(whole, plans))
    assert stacked["decoder/scan_0/block_0/moe/router/kernel"] is True
    assert stacked["decoder/scan_0/block_1/mlp/wo/kernel"] is False
    part = freeze.trainable_mask(canonical, [(r"decoder/layers_0/moe/.*", True), (".*", False)])
    with pytest.raises(ValueError, match="model.scan_layers=False"):
        scan.stack_layers(part, plans)


def test_stacking_names_layers_that_do_not_match():
    config = lvlm(num_layers=4, placement="sparse")
    canonical = looped_params(config)
    del canonical["decoder"]["layers_2"]
    with pytest.raises(ValueError, match=r"decoder/scan_0.*missing layers: \[2\]"):
        scan.stack_layers(canonical, layer_plans(config))


def test_kv_cache_decoding_is_the_same_scanned_and_looped():
    config = lvlm(num_layers=4, placement="sparse")
    canonical = looped_params(config)
    ids, images = inputs()
    prompts = [np.asarray(ids[0]), np.asarray(ids[1, :9])]
    kwargs = dict(max_new_tokens=5, eos_id=39, pad_id=0)
    looped = CachedDecoder(dataclasses.replace(config, scan_layers=False))(
        canonical, prompts, np.asarray(images), **kwargs
    )
    scanned = CachedDecoder(config)(
        scan.stack_layers(canonical, layer_plans(config)), prompts, np.asarray(images), **kwargs
    )
    assert scanned == looped and all(len(row) == 5 for row in looped)


def program_size(num_layers: int, scan_layers: bool) -> int:
    """Characters of the lowered forward + backward program of the tiny model."""
    config = dataclasses.replace(lvlm(num_layers, "sparse"), scan_layers=scan_layers)
    model = MoELLaVA(config)
    ids, images = inputs()
    params = jax.eval_shape(model.init, jax.random.key(0), ids, images)["params"]

    def loss(p):
        logits, stats = model.apply({"params": p}, ids, images, deterministic=False)
        return jnp.sum(logits) + jnp.sum(stats["aux_loss"])

    return len(jax.jit(jax.grad(loss)).lower(nn.unbox(params)).as_text())


def test_the_scanned_program_does_not_grow_with_depth():
    scanned = program_size(8, True) / program_size(2, True)
    looped = program_size(8, False) / program_size(2, False)
    assert scanned <= 1.3, scanned
    assert looped >= 2.0, looped  # the loop traces every layer (measured: 2.24)
