"""Compute knobs: gradient accumulation, remat, bf16, the FLOP counter and throughput logs."""

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_llava_jax import answer_loss, flops, freeze, metrics_log, param_tree, sharding, train_step, trainer
from moe_llava_jax.data import from_config
from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
from moe_llava_jax.models import scan
from moe_llava_jax.models.lvlm import MoELLaVA, layer_plans
from moe_llava_jax.models.moe import MoEConfig
from tests.tiny_models import tiny_lvlm_config
from tests.helpers import first_batch, make_stage


def sgd_step(stage, grad_accum_steps):
    """The stage's step with SGD at learning rate 1: new params = params - gradient, so
    comparing params compares gradients (Adam's first step is ~lr * sign(g) whatever
    the gradient's scale, which would hide a wrongly weighted sum)."""
    tx = optax.apply_if_finite(optax.sgd(1.0), 10)
    step = train_step.make_train_step(
        stage.model,
        tx,
        stage.mask,
        stage.schedule,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,  # exercises the z-loss's split too
        seed=0,
        grad_accum_steps=grad_accum_steps,
    )

    def run(params, batch):
        state = {"step": jnp.ones((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        new_state, metrics = jax.jit(step)(state, batch)
        return param_tree.flatten(new_state["params"]), metrics

    return run


def assert_trees_close(actual, expected, **tolerance):
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], err_msg=key, **tolerance)


def test_grad_accumulation_equals_the_full_batch_step(micro_config):
    stage, data, tokenizer = make_stage(micro_config, "stage2")  # dense, decoder trains
    batch = first_batch(stage, data, tokenizer)
    # The micro-batches (rows 0, 2, .. and 1, 3, ..) must hold different answer-token
    # counts, or a mean of per-micro-batch means would pass too.
    counts = [int(answer_loss.answer_targets(batch["labels"][i::2])[1].sum()) for i in (0, 1)]
    assert counts[0] != counts[1]
    params = stage.fresh_params()
    full, full_metrics = sgd_step(stage, 1)(params, batch)
    accumulated, metrics = sgd_step(stage, 2)(params, batch)
    assert_trees_close(accumulated, full, atol=1e-5, rtol=1e-5)
    for key in ("loss", "ce", "answer_tokens", "grad_norm"):
        np.testing.assert_allclose(metrics[key], full_metrics[key], rtol=1e-5, err_msg=key)
    changed = [k for k in full if not np.array_equal(full[k], param_tree.flatten(params)[k])]
    assert any(k.startswith("decoder/") for k in changed)


def test_moe_grad_accumulation_equals_full_batch_with_as_many_routing_groups(micro_config):
    """n micro-batches of G routing groups each = the full batch in n * G groups (the same
    tokens per group, so the same capacity and drops) when the groups hold the same rows:
    micro-batch i is rows i, i + n, ..., so the full batch is reordered to match."""
    micro_config.model.moe.second_expert_noise = False  # routing depends on params only
    micro_config.model.moe.capacity_factor = 1.0  # some choices drop: equal drops tested too
    accumulating, data, tokenizer = make_stage(micro_config, "stage3")
    micro_config.model.moe.num_groups = 2
    grouped, _, _ = make_stage(micro_config, "stage3")
    batch = first_batch(accumulating, data, tokenizer)
    reordered = {k: jnp.concatenate([v[0::2], v[1::2]]) for k, v in batch.items()}
    params = accumulating.fresh_params()
    accumulated, metrics = sgd_step(accumulating, 2)(params, batch)
    expected, expected_metrics = sgd_step(grouped, 1)(params, reordered)
    assert float(expected_metrics["dropped_fraction"].max()) > 0
    assert_trees_close(accumulated, expected, atol=1e-5, rtol=1e-5)
    for key in ("loss", "ce", "aux_loss", "z_loss", "expert_load", "dropped_fraction"):
        np.testing.assert_allclose(metrics[key], expected_metrics[key], rtol=1e-5, err_msg=key)


@pytest.fixture
def moe_stage_batch(micro_config):
    stage, data, tokenizer = make_stage(micro_config, "stage3")
    return micro_config, first_batch(stage, data, tokenizer), stage.fresh_params()


def loss_and_grads(config, name, params, batch):
    stage, _, _ = make_stage(config, name)

    def loss(p):
        return train_step.compute_loss(stage.model, p, batch, jax.random.key(1), 0.01)[0]

    fn = jax.value_and_grad(loss)
    return jax.jit(fn)(params), str(jax.make_jaxpr(fn)(params))


@pytest.mark.parametrize(
    "policy,shown_as,per_layer",
    [
        ("block", "policy=<function nothing_saveable", 1),
        ("unit", "policy=<function nothing_saveable", 1 / 2),  # a dense + an MoE block each
        pytest.param("dots", "only_if_no_batch_dims=True", 1, marks=pytest.mark.slow),
    ],
    ids=["block", "unit", "dots"],
)
def test_remat_gives_the_same_loss_and_gradients(moe_stage_batch, policy, shown_as, per_layer):
    config, batch, params = moe_stage_batch  # MoE with gating noise: the rng is replayed
    (loss, grads), plain_jaxpr = loss_and_grads(config, "stage3", params, batch)
    config.model.remat = policy
    (remat_loss, remat_grads), jaxpr = loss_and_grads(config, "stage3", params, batch)
    # (the plain program's only checkpoint is the answer loss's, per LM-head chunk)
    assert shown_as not in plain_jaxpr
    assert jaxpr.count(shown_as) == config.model.decoder.num_layers * per_layer
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    assert_trees_close(param_tree.flatten(remat_grads), param_tree.flatten(grads), atol=1e-6, rtol=1e-6)


def test_bfloat16_step_trains_float32_master_weights(micro_config):
    stage, data, tokenizer = make_stage(micro_config, "stage2")
    batch = first_batch(stage, data, tokenizer)
    params = stage.fresh_params()
    micro_config.model.dtype = "bfloat16"
    bf16_stage, _, _ = make_stage(micro_config, "stage2")

    def forward(s):
        return lambda p: s.model.apply({"params": p}, batch["input_ids"], batch["images"])[0]

    assert "bf16" in str(jax.make_jaxpr(forward(bf16_stage))(params))
    assert "bf16" not in str(jax.make_jaxpr(forward(stage))(params))
    assert jax.eval_shape(forward(bf16_stage), params).dtype == jnp.float32  # logits, for CE

    def one_step(s):
        state = {"step": jnp.ones((), jnp.int32), "params": params, "opt_state": s.tx.init(params)}
        return s.train_step(jax.tree.map(jnp.copy, state), batch)  # donates its copy

    _, fp32_metrics = one_step(stage)
    state, metrics = one_step(bf16_stage)
    loss, fp32_loss = float(metrics["loss"]), float(fp32_metrics["loss"])
    assert np.isfinite(loss) and loss != fp32_loss
    assert loss == pytest.approx(fp32_loss, rel=0.02)
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    adam_moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
    assert adam_moments and {x.dtype for x in adam_moments} == {jnp.dtype(jnp.float32)}


def test_frozen_params_and_adam_mu_stored_in_bfloat16(micro_config):
    """model.frozen_param_dtype / stageN.mu_dtype: the state keeps frozen params and Adam's
    first moment in bf16; computing in bf16 rounds frozen weights so anyway, so the step's
    loss is the one from float32 frozen params, and the frozen params come back untouched."""
    micro_config.model.dtype = "bfloat16"
    f32_stage, data, tokenizer = make_stage(micro_config, "stage2")  # the tower is frozen
    micro_config.model.frozen_param_dtype = "bfloat16"
    micro_config.stage2.mu_dtype = "bfloat16"
    stage, _, _ = make_stage(micro_config, "stage2")
    batch = first_batch(stage, data, tokenizer)
    flat_mask = param_tree.flatten(stage.mask)
    stored = param_tree.flatten(stage.abstract_state["params"])
    assert {p for p, x in stored.items() if x.dtype == jnp.bfloat16} == {
        p for p, train in flat_mask.items() if not train
    }
    params = f32_stage.fresh_params()
    # Frozen leaves rounded to bf16 first: the float32 stage then sees the same weights.
    rounded = jax.tree.map(
        lambda p, train: p if train else p.astype(jnp.bfloat16).astype(jnp.float32),
        params,
        stage.mask,
    )

    def one_step(s, p):
        p = jax.tree.map(jnp.copy, p)  # the step donates its state
        state = {"step": jnp.ones((), jnp.int32), "params": p, "opt_state": s.tx.init(p)}
        return s.train_step(state, batch)

    _, expected = one_step(f32_stage, rounded)
    state, metrics = one_step(stage, stage.stored(jax.tree.map(jnp.copy, params)))
    # Equal up to float32 op order (norms and embeddings add their bf16 params in f32):
    # ~4e-6 here, where bf16 compute itself moves the loss by ~1e-2 (test above).
    np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-5)
    new_params, rounded = param_tree.flatten(state["params"]), param_tree.flatten(rounded)
    for path, train in flat_mask.items():
        assert new_params[path].dtype == (jnp.float32 if train else jnp.bfloat16), path
        if not train:
            np.testing.assert_array_equal(new_params[path].astype(jnp.float32), rounded[path])
    (adam,) = [
        s
        for s in jax.tree.leaves(
            state["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_covers_the_vision_tower_and_projector(micro_config):
    """Image features (tower + projector) compute in bf16 too, from the same fp32 params."""
    stage, data, tokenizer = make_stage(micro_config, "stage2")
    images = first_batch(stage, data, tokenizer)["images"]
    params = stage.fresh_params()
    micro_config.model.dtype = "bfloat16"
    bf16_stage, _, _ = make_stage(micro_config, "stage2")

    def image_features(s):
        def towers(model, images):
            return model.projector(model.vision(images))

        return s.model.apply({"params": params}, images, method=towers)  # [b, n, d]

    fp32, bf16 = image_features(stage), image_features(bf16_stage)
    assert fp32.dtype == jnp.float32 and bf16.dtype == jnp.bfloat16
    scale = float(jnp.abs(fp32).max())
    np.testing.assert_allclose(np.asarray(bf16, np.float32), fp32, atol=0.03 * scale)
    assert not np.array_equal(np.asarray(bf16, np.float32), np.asarray(fp32))


# A hand-counted config: tiny_lvlm_config with a 1-layer decoder whose FFN is an MoE
# (E=4, k=2), batch b=2 rows of t=12 tokens. FLOPs = 2 x multiply-adds, matmuls only.
# Vision (16 px, 8 px patches: P=4 patches + CLS = 5 tokens, width 16, MLP 32; select_layer
# -2 of 2 layers runs 1 block):
#   patch embedding  2 b P (8*8*3) 16        = 2*2*4*192*16        =  49152
#   attention proj.  2 b 5 (16*16) * 4       = 2*2*5*256*4         =  20480
#   attention scores 2 * 2 b 5^2 16          = 4*2*25*16           =   3200
#   MLP              2 b 5 (16*32) * 2       = 2*2*5*512*2         =  20480
# Projector (mlp2x: 16 -> 32 -> 32 on the 4 patch tokens): 2 b 4 (16*32 + 32*32) = 24576
# Decoder (N = b t = 24 tokens, d=32, 4 heads of 8 (q, o: 32 wide), 2 kv heads (k, v: 16
# wide), F=48 gated, vocab 40):
#   attention proj.  2 N 32 (32 + 16 + 16 + 32) = 2*24*32*96        = 147456
#   attention scores 2 * 2 b t^2 (4*8)       = 4*2*144*32          =  36864
#   router           2 N d E                 = 2*24*32*4           =   6144
#   2 active experts 2 * 2 N (3 d F)         = 2*2*24*3*32*48      = 442368  (all 4: 884736)
#   LM head          2 N d V                 = 2*24*32*40          =  61440
VISION_FWD = 49152 + 20480 + 3200 + 20480
PROJECTOR_FWD = 24576
ATTN_W, ATTN_SCORES, MOE_FWD, HEAD_FWD = 147456, 36864, 6144 + 442368, 61440
FORWARD = VISION_FWD + PROJECTOR_FWD + ATTN_W + ATTN_SCORES + MOE_FWD + HEAD_FWD


def counted_model(preset, **moe_fields):
    config = tiny_lvlm_config(MoEConfig(num_experts=4, top_k=2, layers="dense"))
    config = dataclasses.replace(
        config,
        decoder=dataclasses.replace(
            config.decoder, num_layers=1, moe=dataclasses.replace(config.decoder.moe, **moe_fields)
        ),
    )
    ids = jnp.zeros((2, 12), jnp.int32)
    images = jnp.zeros((2, 16, 16, 3))
    abstract = jax.eval_shape(
        lambda: MoELLaVA(config).init({"params": jax.random.key(0)}, ids, images)
    )["params"]
    # Rules and FLOP units name canonical `layers_{i}` paths.
    canonical = scan.unstack_layers(nn.unbox(abstract), layer_plans(config))
    mask = freeze.trainable_mask(canonical, preset)
    return config, mask


def counted(preset, **moe_fields):
    return flops.train_step_flops(*counted_model(preset, **moe_fields), batch=2, seq=12)


# Output projections (the weight matmuls after each unit's first): o_proj 2 N 32 32, the
# 2 experts' down projections 2 x 2 N 48 32, the projector's second layer 2 b 4 32 32.
ATTN_OUT, MOE_OUT, PROJECTOR_OUT = 49152, 2 * 73728, 16384


@pytest.mark.parametrize(
    "preset,backward",
    [
        # Only the MoE FFN trains: its weight grads, the activation grads inside it that they
        # need (through its experts' down projections), and activation grads through the LM
        # head above it; nothing below it needs gradients, not even its own input.
        ("stage3_paper", MOE_FWD + MOE_OUT + HEAD_FWD),
        # Projector + decoder train: every decoder unit costs 2x its forward again (scores 2x
        # as well); the projector, lowest, its weights and its second layer's activations.
        (
            "stage2",
            PROJECTOR_FWD + PROJECTOR_OUT + 2 * (ATTN_W + ATTN_SCORES + MOE_FWD + HEAD_FWD),
        ),
        # Only the projector trains: its weight + inner activation grads, and activation
        # grads (1x weights, 2x scores) through the whole frozen decoder above it.
        (
            "stage1",
            PROJECTOR_FWD + PROJECTOR_OUT + ATTN_W + 2 * ATTN_SCORES + MOE_FWD + HEAD_FWD,
        ),
    ],
)
def test_flops_match_the_hand_count(preset, backward):
    step = counted(preset)
    assert step.forward == FORWARD == 812160
    assert step.backward == backward


def test_moe_flops_count_the_k_routed_experts_not_all():
    base = counted("stage3_paper")
    more_experts = counted("stage3_paper", num_experts=8)
    assert more_experts.forward - base.forward == 2 * 24 * 32 * 4  # the router's 4 new columns
    assert base.forward - counted("stage3_paper", top_k=1).forward == 442368 // 2
    assert counted("stage3_paper", shared_expert=True).forward - base.forward == 442368 // 2


DENSE_FFN = 2 * 24 * 3 * 32 * 48  # one expert on every token: MOE_FWD's routed half
DENSE_OUT = MOE_OUT // 2  # its down projection


@pytest.mark.parametrize(
    "preset,remat,recompute,padding",
    [
        # the MoE layer trains: forward, recompute, weight gradients, and the activation
        # gradients inside the experts (their down projections)
        ("stage3_paper", True, ATTN_W + ATTN_SCORES + MOE_FWD + HEAD_FWD, 3 * DENSE_FFN + DENSE_OUT),
        ("stage3_paper", False, HEAD_FWD, 2 * DENSE_FFN + DENSE_OUT),  # the LM head's chunks
        # only the projector trains: gradients flow through the frozen experts (activation
        # gradients, no weight gradients)
        ("stage1", True, ATTN_W + ATTN_SCORES + MOE_FWD + HEAD_FWD, 3 * DENSE_FFN),
    ],
)
def test_designed_overheads_match_the_hand_count(preset, remat, recompute, padding):
    overheads = flops.designed_overheads(
        *counted_model(preset), batch=2, seq=12, remat=remat, expert_slots_per_token=3.0
    )
    # 3 slots per token where top-2 routes 2: one expert FFN's worth of padding
    assert overheads == {
        "remat_recompute": recompute,
        "capacity_padding": padding,
        "attention_chunks": 0.0,
        "attention_kernel": 0.0,
    }


@pytest.mark.parametrize(
    "preset,scores_passes",
    [
        # layer 0's attention is below every trainable unit: forward and remat's recompute
        # only, over 15 padded queries instead of 12
        ("stage3_paper", 1.25 * 2 - 2),
        # gradients pass through it: forward, recompute, 2x backward, and the chunks'
        # recompute of q k^T (half the scores' FLOPs)
        ("stage1", 1.25 * 4.5 - 4),
    ],
)
def test_attention_chunks_pad_queries_and_recompute_scores(preset, scores_passes):
    overheads = flops.designed_overheads(
        *counted_model(preset), batch=2, seq=12, remat=True, expert_slots_per_token=2.0,
        query_chunk=5,
    )
    assert overheads["attention_chunks"] == pytest.approx(scores_passes * ATTN_SCORES)


@pytest.mark.parametrize(
    "preset,decoder_passes",
    [
        ("stage3_paper", 2),  # below every trainable unit: forward + remat's recompute
        ("stage1", 4),  # gradients pass through it: + 2x backward
    ],
)
def test_attention_in_a_fused_kernel_leaves_the_counted_program(preset, decoder_passes):
    """Splash / cuDNN run the scores as a custom call: every pass over them (the decoder's,
    and the tower's forward, 3200) is out of the program's matmul count, and nothing is
    chunked."""
    overheads = flops.designed_overheads(
        *counted_model(preset), batch=2, seq=12, remat=True, expert_slots_per_token=2.0,
        query_chunk=5, attention_kernel=True,
    )
    assert overheads["attention_chunks"] == 0.0
    assert overheads["attention_kernel"] == -(decoder_passes * ATTN_SCORES + 3200)


def test_flops_refuse_a_mask_with_params_no_unit_owns():
    config = tiny_lvlm_config(MoEConfig(layers="dense"))
    with pytest.raises(ValueError, match="decoder/extra/kernel"):
        flops.train_step_flops(config, {"decoder/extra/kernel": True}, batch=2, seq=12)


def test_throughput_times_steps_between_ticks_without_the_first():
    times = iter([100.0, 102.0, 104.0, 106.0, 109.0])
    meter = metrics_log.Throughput(peak_flops=1e10, clock=lambda: next(times))
    meter.tick(positions=4000, tokens=9, flops=1.0)  # step 1 (compilation): the clock only
    assert meter.rates() == {}
    for tokens in (1000, 800, 1200):
        meter.tick(positions=4000, tokens=tokens, flops=4e9)
    assert meter.rates() == pytest.approx(
        {"step_time_s": 2.0, "tokens_per_s": 500.0, "padding": 0.75, "mfu": 0.2}
    )
    assert meter.rates() == {}  # nothing new since
    meter.tick(positions=10, tokens=10, flops=0.0)
    assert meter.rates()["step_time_s"] == pytest.approx(3.0)
    unknown_peak = metrics_log.Throughput(peak_flops=0.0, clock=iter([0.0, 1.0]).__next__)
    unknown_peak.tick(1, 1, 1.0)
    unknown_peak.tick(1, 1, 1.0)
    assert set(unknown_peak.rates()) == {"step_time_s", "tokens_per_s", "padding"}


@pytest.mark.parametrize("preset", ["stage1", "stage2", "stage3_paper"])
def test_work_rates_give_the_padded_count_and_count_real_examples(preset):
    """rates.flops(b, b seq, b seq^2) = train_step_flops(b, seq); a batch's real work is
    its examples' (segments of packed rows, `length` of padded ones)."""
    config, mask = counted_model(preset)
    rates = flops.train_step_rates(config, mask, seq=12)
    assert rates.flops(2, 2 * 12, 2 * 12**2) == pytest.approx(
        flops.train_step_flops(config, mask, batch=2, seq=12).total, rel=1e-12
    )
    ids = np.zeros((2, 12), np.int32)
    ids[0, :4] = ids[1, 2:6] = IMAGE_TOKEN_INDEX  # two images of 4 tokens
    packed = {"input_ids": ids, "segments": np.array([[1] * 7 + [2] * 3 + [0] * 2, [1] * 12])}
    assert flops.batch_work(packed, num_image_tokens=4) == (2, 22, 7**2 + 3**2 + 12**2)
    padded = {"input_ids": ids, "length": np.array([5, 9], np.int32)}
    assert flops.batch_work(padded, num_image_tokens=4) == (2, 14, 5**2 + 9**2)


def test_stage_logs_throughput_and_trains_with_accumulation(micro_config):
    micro_config.peak_flops_per_device = 1e12
    micro_config.stage1.grad_accum_steps = 2
    stage, data, tokenizer = make_stage(micro_config, "stage1")
    trainer.train_stage(stage, from_config.stage_source(micro_config, "stage1", data), tokenizer)
    stage_dir = Path(micro_config.workdir) / "stage1"
    metrics, rates = (
        [json.loads(line) for line in (stage_dir / name).read_text().splitlines()]
        for name in ("metrics.jsonl", "throughput.jsonl")
    )
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and "step_time_s" not in r for r in metrics)
    assert [r["step"] for r in rates] == [2, 3, 4]  # step 1 compiles: not timed
    source = from_config.stage_source(micro_config, "stage1", data)
    skip_log = stage.skip_log(source, Path(micro_config.workdir) / "skipped-check.jsonl")
    batches = iter(stage.dataset(source, tokenizer, skip_log))
    next(batches)  # step 1's: not timed
    positions = micro_config.stage1.batch_size * micro_config.stage1.max_length
    for record, batch in zip(rates, batches):  # one record a step (log_every=1)
        images, tokens, pairs = flops.batch_work(batch, stage.model_cfg.vision.num_image_tokens)
        assert tokens < positions and record["padding"] == pytest.approx(1 - tokens / positions)
        assert record["tokens_per_s"] == pytest.approx(tokens / record["step_time_s"])
        expected_mfu = stage.work_rates.flops(images, tokens, pairs) / record["step_time_s"] / 1e12
        assert record["mfu"] == pytest.approx(expected_mfu / jax.device_count())


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("stage1.grad_accum_steps", 3, r"stage1.batch_size=8 is not a multiple.*grad_accum"),
        ("stage1.grad_accum_steps", 0, r"stage1.grad_accum_steps=0 must be >= 1"),
    ],
)
def test_bad_accumulation_fails_naming_the_key(micro_config, key, value, match):
    stage_name, leaf = key.split(".")
    micro_config[stage_name][leaf] = value
    with pytest.raises(ValueError, match=match):
        trainer.validate_config(micro_config)


@pytest.mark.parametrize(
    "key,value", [("remat", "everything"), ("dtype", "float16")], ids=["remat", "dtype"]
)
def test_bad_compute_knobs_fail_naming_the_key(micro_config, key, value):
    micro_config.model[key] = value
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    with pytest.raises(ValueError, match=f"model.{key}='{value}'"):
        trainer.Stage(micro_config, "stage1", mesh, 300)
