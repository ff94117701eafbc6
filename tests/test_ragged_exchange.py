"""The ragged expert exchange (`model.moe.exchange="ragged"`) on 4 simulated CPU devices (the
collective emulated by dense all-to-all, as on every CPU mesh): with room for every row it
equals the dense exchange in outputs, aux loss and gradients; with receive buffers too small
it drops exactly the rows past each buffer's end and reports them (a subprocess: XLA must
see the devices before jax starts)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, math
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from moe_llava_jax import sharding
    from moe_llava_jax.models import moe
    from moe_llava_jax.models.mlp import FFNConfig

    E, K, DEVICES, BATCH, T, D = 8, 2, 4, 8, 6, 16
    mesh = sharding.make_mesh({"expert": DEVICES})
    rules = sharding.DEFAULT_LOGICAL_AXIS_RULES

    def layer(exchange, factor):
      config = moe.MoEConfig(num_experts=E, top_k=K, router_init_std=1.0, dispatch="dropless",
                             exchange=exchange, receive_factor=factor)
      return moe.MoELayer(config, FFNConfig(D, 24, "silu", True, use_bias=True))

    x = jax.random.normal(jax.random.key(0), (BATCH, T, D))
    boxed = layer("dense", 2.0).init(jax.random.key(1), x, deterministic=True)["params"]
    keys = iter(jax.random.split(jax.random.key(2), 100))
    params = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape) * 0.5, nn.unbox(boxed))
    cotangent = jax.random.normal(jax.random.key(3), x.shape)

    def run(model):
      def loss(params, x):
        (out, stats), state = model.apply({"params": params}, x, True, mutable=["intermediates"])
        return jnp.sum(out * cotangent) + stats["aux_loss"], (out, stats, state)
      with sharding.mesh_context(mesh, rules):
        placed = (jax.device_put(params, sharding.logical_shardings(boxed, mesh, rules)),
                  jax.device_put(x, sharding.batch_sharding(mesh)))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(*placed)

    (dense_loss, (dense_out, _, _)), dense_grads = run(layer("dense", 2.0))
    (loss, (out, stats, _)), grads = run(layer("ragged", float(DEVICES)))
    pairs = zip(jax.tree.leaves((out, grads)), jax.tree.leaves((dense_out, dense_grads)))
    relative = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
                   for a, b in pairs)

    factor = 0.6
    (_, (small_out, small_stats, state)), _ = run(layer("ragged", factor))
    choice = np.asarray(state["intermediates"]["expert_index"][0]).reshape(-1)  # [(b t) k]
    m = BATCH // DEVICES * T * K  # assignments per device
    capacity = math.ceil(factor * m)
    wanted = np.bincount(choice // (E // DEVICES), minlength=DEVICES)  # rows each device gets
    expected = np.maximum(wanted - capacity, 0).sum() / choice.size
    print(json.dumps({
        "relative": relative,
        "loss_relative": abs(float(loss - dense_loss)) / abs(float(dense_loss)),
        "dropped": float(stats["dropped_fraction"]),
        "small_dropped": float(small_stats["dropped_fraction"]),
        "expected_small_dropped": float(expected),
        "small_finite": bool(np.isfinite(np.asarray(small_out)).all()),
    }))
""")


@pytest.fixture(scope="module")
def results():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": str(Path.cwd()),
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ragged_with_room_for_every_row_equals_the_dense_exchange(results):
    assert results["relative"] <= 1e-5, results  # outputs and every gradient
    assert results["loss_relative"] <= 1e-5, results
    assert results["dropped"] == 0.0


def test_ragged_receive_buffers_drop_and_count_the_rows_past_their_end(results):
    assert results["expected_small_dropped"] > 0  # the case does overflow
    assert results["small_dropped"] == pytest.approx(results["expected_small_dropped"], abs=1e-7)
    assert results["small_finite"]
