"""Dropless expert parallelism (shard_map + all-to-all over `expert`) on 8 simulated CPU devices
equals the layer on one device: outputs, losses and gradients (XLA must see the devices before
jax starts, so the checks run in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # several processes / whole stages: `-m slow`

SCRIPT = textwrap.dedent("""
    import json
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from moe_llava_jax import sharding, trainer
    from moe_llava_jax.models import moe
    from tests import micro_config
    from moe_llava_jax.models.mlp import FFNConfig

    def layer(num_experts, top_k, gated, num_groups=1):
      config = moe.MoEConfig(num_experts=num_experts, top_k=top_k, router_init_std=1.0,
                             dispatch="dropless", num_groups=num_groups)
      ffn = FFNConfig(16, 24, "silu" if gated else "gelu", gated, use_bias=True)
      return moe.MoELayer(config, ffn)

    def check(mesh_axes, num_experts=8, top_k=2, gated=True, batch=8,
              rules=sharding.DEFAULT_LOGICAL_AXIS_RULES):
      model = layer(num_experts, top_k, gated)
      mesh = sharding.make_mesh(mesh_axes)
      batch_devices = mesh.size // mesh.shape["tensor"]
      splits = batch % batch_devices == 0
      # Routing groups are each device's rows (moe.groups="local"): one device routes the
      # same groups with num_groups = the batch's devices (the aux loss and the gating
      # noise are per group).
      reference = layer(num_experts, top_k, gated, batch_devices if splits else 1)
      x = jax.random.normal(jax.random.key(0), (batch, 6, 16))  # [b, t, d]
      boxed = model.init(jax.random.key(1), x, deterministic=True)["params"]
      keys = iter(jax.random.split(jax.random.key(2), 100))
      # Random biases too: a bias added on the wrong device's rows would show.
      params = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape) * 0.5,
                            nn.unbox(boxed))
      cotangent = jax.random.normal(jax.random.key(3), x.shape)

      def loss(params, x, model=model):
        out, stats = model.apply({"params": params}, x, False, rngs={"gating": jax.random.key(4)})
        return jnp.sum(out * cotangent) + stats["aux_loss"], out

      step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
      reference_step = jax.value_and_grad(
          lambda p, x: loss(p, x, reference), argnums=(0, 1), has_aux=True)
      (loss1, out1), grads1 = jax.jit(reference_step)(params, x)  # no mesh: one device
      with sharding.mesh_context(mesh, rules):
        x_sharding = sharding.batch_sharding(mesh) if splits else sharding.replicated(mesh)
        sharded = (jax.device_put(params, sharding.logical_shardings(boxed, mesh, rules)),
                   jax.device_put(x, x_sharding))
        jitted = jax.jit(step)
        lowered = jitted.lower(*sharded).as_text()  # before GSPMD adds collectives
        (loss8, out8), grads8 = jitted(*sharded)
      ref = jax.tree.leaves((out1, grads1))
      got = jax.tree.leaves((out8, grads8))
      relative = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
                     for a, b in zip(got, ref))
      return {"all_to_all": "all_to_all" in lowered, "relative": relative,
              "loss_relative": abs(float(loss8 - loss1)) / abs(float(loss1)),
              "kernel_shard_experts": sharded[0]["experts"]["wo"]["kernel"]
                  .addressable_shards[0].data.shape[0]}

    results = {
      "expert8": check({"expert": 8}),
      "data2_expert4": check({"data": 2, "expert": 4}),
      "fsdp2_expert2_tensor2": check({"fsdp": 2, "expert": 2, "tensor": 2}),
      "top1_ungated": check({"data": 2, "expert": 4}, top_k=1, gated=False),
      "batch2_falls_back": check({"data": 2, "expert": 4}, batch=2),
      "experts_unsharded_by_rules": check(
          {"data": 2, "expert": 4},
          rules=tuple((name, None if name == "expert" else axes)
                      for name, axes in sharding.DEFAULT_LOGICAL_AXIS_RULES)),
    }
    def error_of(run):
      try:
        run()
        return ""
      except ValueError as error:
        return str(error)

    def uneven_layer():  # params not placed: the layer itself finds E=6 over 4 devices
      model = layer(6, 2, True)
      x = jnp.zeros((8, 6, 16))
      params = model.init(jax.random.key(1), x, deterministic=True)
      mesh = sharding.make_mesh({"data": 2, "expert": 4})
      with sharding.mesh_context(mesh, sharding.DEFAULT_LOGICAL_AXIS_RULES):
        jax.jit(lambda p, x: model.apply(p, x, True))(params, x)

    def uneven_stage():
      config = micro_config.get_config("workdir=/nonexistent,data_root=/nonexistent")
      config.model.moe.num_experts = 6
      trainer.Stage(config, "stage3", sharding.make_mesh({"data": 2, "expert": 4}), 300)

    results["uneven_layer_error"] = error_of(uneven_layer)
    results["uneven_stage_error"] = error_of(uneven_stage)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def results():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(Path.cwd()),
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "case, experts_per_device",
    [
        ("expert8", 1),
        ("data2_expert4", 2),
        ("fsdp2_expert2_tensor2", 4),
        ("top1_ungated", 2),
    ],
)
def test_all_to_all_layer_equals_one_device(results, case, experts_per_device):
    result = results[case]
    assert result["all_to_all"], result  # the shard_map path ran, not GSPMD's
    assert result["kernel_shard_experts"] == experts_per_device
    assert result["relative"] <= 1e-5, result  # outputs and every gradient (params, input)
    assert result["loss_relative"] <= 1e-5, result  # a sum of 768 products: fp32 order


def test_a_batch_that_does_not_split_runs_unsharded(results):
    """A decoding batch of 2 on data x expert = 8 devices: the global path, same numbers."""
    result = results["batch2_falls_back"]
    assert not result["all_to_all"]
    assert result["relative"] <= 1e-5, result


def test_rules_without_an_expert_axis_keep_the_experts_whole(results):
    """The layer reads the placement from the rules in context, not from the mesh's names:
    `expert` mapped to no mesh axis -> every device holds all experts, no all-to-all."""
    result = results["experts_unsharded_by_rules"]
    assert not result["all_to_all"]
    assert result["kernel_shard_experts"] == 8
    assert result["relative"] <= 1e-5, result


def test_experts_that_do_not_split_over_the_mesh_name_the_key(results):
    assert "model.moe.num_experts=6" in results["uneven_layer_error"]
    assert "model.moe.num_experts=6" in results["uneven_stage_error"]
    assert "mesh.expert" in results["uneven_stage_error"]
