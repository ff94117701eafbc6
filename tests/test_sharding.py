"""Expert/data parallelism on 8 simulated CPU devices (XLA must see them before jax starts,
so the check runs in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moe_llava_jax import sharding

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType
    import ml_collections
    from moe_llava_jax import sharding, stages, train
    sys.path.insert(0, ".")
    from tests.helpers import first_batch

    config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
    data, tokenizer = train.prepare_data(config)

    def one_step(mesh):
      with jax.set_mesh(mesh):  # as train.run: dropless layers shard_map over its expert axis
        return one_step_in_mesh(mesh)

    def one_step_in_mesh(mesh):
      stage = train.Stage(config, "stage3", mesh, tokenizer.vocab_size)
      params = stage.fresh_params()
      state = {"step": jnp.ones((), jnp.int32), "params": params,
               "opt_state": jax.jit(stage.tx.init,
                                    out_shardings=stage.state_shardings["opt_state"])(params)}
      kernel = params["decoder"]["layers_0"]["moe"]["experts"]["wi_up"]["kernel"]
      layout = (str(kernel.sharding.spec), kernel.addressable_shards[0].data.shape[0])
      batch = first_batch(stage, data, tokenizer)
      batch = {k: jax.device_put(v, stage.batch_sharding) for k, v in batch.items()}
      # Explicit collectives in the traced program (GSPMD adds its own only when compiling).
      lowered = stage.train_step.lower(state, batch).as_text()
      state, metrics = stage.train_step(state, batch)
      kernel = state["params"]["decoder"]["layers_0"]["moe"]["experts"]["wi_up"]["kernel"]
      return float(metrics["loss"]), layout, np.asarray(kernel), "all_to_all" in lowered

    mesh8 = sharding.make_mesh({"data": 2, "expert": 4})
    mesh1 = jax.make_mesh((1, 1, 1, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4,
                          devices=jax.devices()[:1])
    loss8, (spec, experts_per_shard), kernel8, all_to_all = one_step(mesh8)
    loss1, _, kernel1, _ = one_step(mesh1)
    print(json.dumps({"devices": jax.device_count(), "loss8": loss8, "loss1": loss1,
                      "all_to_all": all_to_all,
                      "spec": spec, "experts_per_shard": experts_per_shard,
                      "max_kernel_diff": float(np.abs(kernel8 - kernel1).max())}))
""")


def test_mesh_shape_fills_one_axis_and_names_bad_keys():
    assert sharding.mesh_shape({"data": -1, "expert": 4}, 8) == (2, 1, 4, 1)
    with pytest.raises(ValueError, match="mesh.pipeline"):
        sharding.mesh_shape({"pipeline": 2}, 8)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.mesh_shape({"data": 2, "expert": 3}, 8)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_expert_parallel_loss_equals_single_device(micro_config, dispatch):
    """One stage-3 step on a data 2 x expert 4 mesh = on one device. Capacity mode leaves the
    expert placement to GSPMD; dropless runs under shard_map with explicit all-to-alls."""
    micro_config.stage3.batch_size = 8  # divisible by data x expert = 8
    micro_config.model.moe.dispatch = dispatch
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(Path.cwd()),
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, micro_config.to_json()],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["spec"].startswith("P('expert'"), result["spec"]
    assert result["experts_per_shard"] == 1  # 4 experts over expert=4
    # Dropless ran under shard_map with its own all-to-alls; capacity left them to GSPMD.
    assert result["all_to_all"] == (dispatch == "dropless")
    assert abs(result["loss8"] - result["loss1"]) <= 1e-5, result
    assert result["max_kernel_diff"] <= 1e-5, result
