"""Router and dispatch on a hand-worked example (MoE-LLaVA / DeepSpeed top-2 semantics)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_llava_jax.models import moe
from moe_llava_jax.models.mlp import FFNConfig

# 4 tokens, 3 experts. Choices (1st, 2nd): t0 (e0, e1), t1 (e0, e2), t2 (e0, e1), t3 (e2, e1).
PROBS = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)


def hand_routing(capacity=2):
    return moe.route_top_k(jnp.log(PROBS)[None], top_k=2, capacity=capacity)


def test_capacity_formula():
    assert moe.expert_capacity(4, 3, 2, 0.75, 0) == 2  # ceil(2 * 0.75 * 4 / 3)
    assert moe.expert_capacity(4, 3, 2, 0.75, 5) == 5  # min_capacity wins
    assert moe.expert_capacity(10, 4, 2, 1.5, 0) == 8  # ceil(7.5)
    # DeepSpeed's float32 rounding: 25 * float32(2.2) is 55 in float32 (56 in float64)
    assert moe.expert_capacity(50, 2, 2, 1.1, 0) == 55


def test_selection_slots_and_drops():
    r = hand_routing()
    np.testing.assert_array_equal(r.expert_index[0], [[0, 1], [0, 2], [0, 1], [2, 1]])
    # e0 queue: t0, t1, t2(full -> dropped); e2: t3 (1st choice), then t1 (2nd choice);
    # e1: t0, t2, t3(full -> dropped). Dropped slots read `capacity` (= 2).
    np.testing.assert_array_equal(r.slot[0], [[0, 0], [1, 1], [2, 1], [0, 2]])
    assert float(r.dropped_fraction) == pytest.approx(2 / 8)
    np.testing.assert_allclose(r.expert_load, [3 / 8, 3 / 8, 2 / 8], rtol=1e-6)


def test_pads_take_no_capacity_and_stay_out_of_every_statistic():
    """The hand example with pads put between its tokens (as a packed row has them) routes its
    tokens as without the pads: same choices, slots, gates, aux / z loss, entropy, load and
    dropped fraction; the pads take no slot and get gate 0."""
    pad = np.log(np.array([[0.9, 0.05, 0.05]], np.float32))  # pads would all want e0
    shift = 0.5  # logsumexp 0.5: a z-loss far from 0
    logits = shift + np.concatenate([pad, np.log(PROBS[:2]), pad, pad, np.log(PROBS[2:])])[None]
    real = np.array([[False, True, True, False, False, True, True]])
    padded = moe.route_top_k(jnp.asarray(logits), 2, capacity=2, real=jnp.asarray(real))
    alone = moe.route_top_k(shift + jnp.log(PROBS)[None], top_k=2, capacity=2)
    np.testing.assert_array_equal(alone.slot, hand_routing().slot)
    for name in ("expert_index", "slot", "gate"):
        np.testing.assert_array_equal(getattr(padded, name)[real], getattr(alone, name)[0])
    np.testing.assert_array_equal(padded.gate[~real], 0.0)
    np.testing.assert_array_equal(padded.slot[~real], 2)
    for name in ("aux_loss", "z_loss", "entropy", "expert_load", "dropped_fraction"):
        np.testing.assert_allclose(getattr(padded, name), getattr(alone, name), rtol=1e-6)


def test_gates_renormalise_over_kept_choices():
    r = hand_routing()
    np.testing.assert_allclose(
        r.gate[0],
        [[0.5 / 0.8, 0.3 / 0.8], [0.6 / 0.9, 0.3 / 0.9], [0.0, 1.0], [1.0, 0.0]],
        rtol=1e-6,
    )


def test_both_choices_dropped_gives_zero_gates():
    r = moe.route_top_k(jnp.log(PROBS)[None], top_k=2, capacity=1)
    # capacity 1: t0 takes e0's and e1's only slots; t3's 1st choice takes e2's, so t1 loses both.
    np.testing.assert_allclose(r.gate[0, 1], [0.0, 0.0])
    np.testing.assert_allclose(r.gate[0, 0], [0.5 / 0.8, 0.3 / 0.8], rtol=1e-6)


def test_aux_loss_value():
    # f = top-1 fractions (3/4, 0, 1/4); P = mean probs (1.9/4, 0.9/4, 1.2/4); E * sum(f * P).
    expected = 3 * (0.75 * 1.9 / 4 + 0.25 * 1.2 / 4)
    assert float(hand_routing().aux_loss) == pytest.approx(expected, rel=1e-6)
    # Drops do not change the loss: f counts top-1 choices before capacity.
    assert float(moe.route_top_k(jnp.log(PROBS)[None], 2, 1).aux_loss) == pytest.approx(
        expected, rel=1e-6
    )


def test_dispatch_then_combine_is_gate_weighted_expert_sum():
    r = hand_routing()
    x = jnp.arange(4 * 5, dtype=jnp.float32).reshape(1, 4, 5) + 1.0
    buffers = moe.dispatch(x, r, num_experts=3, capacity=2)  # [1, 3, 2, 5]
    np.testing.assert_array_equal(buffers[0, 0], x[0, [0, 1]])  # e0 holds t0, t1
    np.testing.assert_array_equal(buffers[0, 2], x[0, [3, 1]])  # e2 holds t3, then t1
    scale = jnp.array([1.0, 10.0, 100.0])  # "expert e" multiplies by scale[e]
    out = moe.combine(buffers * scale[None, :, None, None], r)
    gates = np.asarray(r.gate[0])
    index = np.asarray(r.expert_index[0])
    expected = np.stack(
        [sum(gates[t, j] * float(scale[index[t, j]]) for j in range(2)) * x[0, t] for t in range(4)]
    )
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_second_expert_noise_changes_only_later_choices():
    logits = jax.random.normal(jax.random.key(0), (1, 64, 4))
    clean = moe.route_top_k(logits, 2, capacity=128)
    noisy = moe.route_top_k(logits, 2, capacity=128, noise_rng=jax.random.key(1))
    np.testing.assert_array_equal(clean.expert_index[..., 0], noisy.expert_index[..., 0])
    assert np.any(clean.expert_index[..., 1] != noisy.expert_index[..., 1])
    assert np.all(noisy.expert_index[..., 1] != noisy.expert_index[..., 0])


def test_z_loss_and_entropy_values():
    # logsumexp per token: ln 2 and ln 4, so z = ((ln 2)^2 + (ln 4)^2) / 2. Softmaxes (1/2, 1/2)
    # and (3/4, 1/4): entropies ln 2 = 0.693147 and 0.562335 nats, mean 0.627741.
    r = moe.route_top_k(jnp.array([[[0.0, 0.0], [np.log(3.0), 0.0]]]), top_k=1, capacity=2)
    assert float(r.z_loss) == pytest.approx(1.2011325, rel=1e-6)
    assert float(r.entropy) == pytest.approx(0.6277412, rel=1e-6)


def test_top1_gate_is_the_raw_router_probability():
    # Switch / DeepSpeed top1gating: no renormalisation. All tokens pick e0 but t3 (e2); with
    # capacity 2, t2 finds e0 full and is dropped.
    r = moe.route_top_k(jnp.log(PROBS)[None], top_k=1, capacity=2)
    np.testing.assert_array_equal(r.expert_index[0, :, 0], [0, 0, 0, 2])
    np.testing.assert_allclose(r.gate[0, :, 0], [0.5, 0.6, 0.0, 0.6], rtol=1e-6)
    np.testing.assert_allclose(r.expert_load, [3 / 4, 0, 1 / 4], rtol=1e-6)


@pytest.mark.slow
def test_top1_layer_trains_its_router_without_gating_noise():
    config = moe.MoEConfig(num_experts=4, top_k=1)
    ffn = FFNConfig(8, 16, "silu", gated=True, use_bias=False)
    layer = moe.MoELayer(config, ffn)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = layer.init(jax.random.key(1), x, deterministic=False)["params"]

    def output_sum(p):  # no "gating" rng: top-1 draws no noise
        return layer.apply({"params": p}, x, deterministic=False)[0].sum()

    grads = nn.unbox(jax.grad(output_sum)(params))
    # A gate renormalised to 1 would leave the router only rounding noise (~1e-8 relative).
    router, expert = (
        float(jnp.abs(g).max())
        for g in (grads["router"]["kernel"], grads["experts"]["wo"]["kernel"])
    )
    assert router > 1e-3 * expert


@pytest.mark.parametrize(
    "placement,expected",
    [
        ("sparse", (0, 2, 4)),
        ("first_half", (0, 1, 2)),
        ("second_half", (3, 4, 5)),
        ("dense", (0, 1, 2, 3, 4, 5)),
        ("1,4", (1, 4)),
    ],
)
def test_placement(placement, expected):
    assert moe.moe_layer_indices(placement, 6) == expected


@pytest.mark.parametrize("bad", ["sprase", "0,6", ""])
def test_bad_placement_names_config_key(bad):
    with pytest.raises(ValueError, match="model.moe.layers"):
        moe.moe_layer_indices(bad, 6)


def test_torch_router_init_is_uniform_within_one_over_sqrt_d():
    """router_init="torch": PyTorch's nn.Linear default, U(+-1/sqrt(d)), as the original's
    gate starts; "normal" keeps N(0, router_init_std)."""

    def router(init):  # a [d = 64, E = 64] router kernel
        initializer = moe.router_initializer(moe.MoEConfig(router_init=init))
        return np.asarray(initializer(jax.random.key(0), (64, 64), jnp.float32))

    kernel, bound = router("torch"), 1 / np.sqrt(64)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.98 * bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.05)
    np.testing.assert_allclose(router("normal").std(), 0.02, rtol=0.05)
    with pytest.raises(ValueError, match="model.moe.router_init='kaiming'"):
        router("kaiming")
