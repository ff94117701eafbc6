"""Sharding from the config: the mesh, the `sharding_rules` key reaching the stage's param
shardings, and expert/data parallelism on 8 simulated CPU devices (XLA must see them before
jax starts, so that check runs in a subprocess)."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import pytest
from jax.sharding import PartitionSpec

from moe_llava_jax import sharding, trainer

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType
    import ml_collections
    from moe_llava_jax import sharding, trainer
    from moe_llava_jax.data import from_config
    sys.path.insert(0, ".")
    from tests.helpers import first_batch

    config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
    config1 = ml_collections.ConfigDict(json.loads(sys.argv[2]))  # the 1-device run's
    data, tokenizer = from_config.prepare_data(config)

    def one_step(mesh, config):
      # As trainer.run: dropless layers shard_map over the mesh axes the rules give `expert`.
      with sharding.mesh_context(mesh, sharding.rules_from_config(config.sharding_rules)):
        return one_step_in_mesh(mesh, config)

    def one_step_in_mesh(mesh, config):
      stage = trainer.Stage(config, "stage3", mesh, tokenizer.vocab_size)
      params = stage.fresh_params()
      state = {"step": jnp.ones((), jnp.int32), "params": params,
               "opt_state": jax.jit(stage.tx.init,
                                    out_shardings=stage.state_shardings["opt_state"])(params)}
      # Layer 0's experts: the first member of the scanned (MoE, dense) unit, [layers, E, ...].
      kernel = params["decoder"]["scan_0"]["block_0"]["moe"]["experts"]["wi_up"]["kernel"]
      layout = (str(kernel.sharding.spec), kernel.addressable_shards[0].data.shape[1])
      batch = first_batch(stage, data, tokenizer)
      batch = {k: jax.device_put(v, stage.batch_sharding) for k, v in batch.items()}
      # Explicit collectives in the traced program (GSPMD adds its own only when compiling).
      lowered = stage.train_step.lower(state, batch).as_text()
      state, metrics = stage.train_step(state, batch)
      kernel = state["params"]["decoder"]["scan_0"]["block_0"]["moe"]["experts"]["wi_up"]["kernel"]
      return float(metrics["loss"]), layout, np.asarray(kernel), "all_to_all" in lowered

    mesh8 = sharding.make_mesh({"data": 2, "expert": 4})
    mesh1 = jax.make_mesh((1, 1, 1, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4,
                          devices=jax.devices()[:1])
    loss8, (spec, experts_per_shard), kernel8, all_to_all = one_step(mesh8, config)
    loss1, _, kernel1, _ = one_step(mesh1, config1)
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


def test_sharding_rules_survive_the_checkpoint_config_round_trip(micro_config):
    """predict.py rebuilds the config from the checkpoint's JSON: the same rules come back."""
    restored = ml_collections.ConfigDict(json.loads(micro_config.to_json()))
    rules = sharding.rules_from_config(restored.sharding_rules)
    assert rules == sharding.DEFAULT_LOGICAL_AXIS_RULES


def test_sharding_rules_from_the_config_reach_the_param_shardings(micro_config):
    """`embed` mapped to no mesh axis in the config: the stage's embedding table is no longer
    split over fsdp (the vocab rule still applies)."""

    def embedding_spec(config):
        mesh = sharding.make_mesh(config.mesh.to_dict())
        stage = trainer.Stage(config, "stage1", mesh, 300)
        return stage.param_shardings["decoder"]["embed_tokens"]["embedding"].spec

    assert embedding_spec(micro_config) == PartitionSpec("tensor", "fsdp")
    micro_config.sharding_rules = [
        [name, None if name == "embed" else axes] for name, axes in micro_config.sharding_rules
    ]
    assert embedding_spec(micro_config) == PartitionSpec("tensor", None)


@pytest.mark.parametrize(
    "rules, message",
    [
        ([["embed", "pipeline"]], "entry ['embed', 'pipeline']: unknown mesh axis 'pipeline'"),
        ([["batch", ["data", "model"]]], "entry ['batch', ['data', 'model']]: unknown mesh axis"),
        ([["embed", "fsdp"], ["embed", None]], "logical names ['embed'] appear more than once"),
        ([["embed"]], "entry ['embed'] is not a [logical name, mesh axes] pair"),
    ],
)
def test_bad_sharding_rules_name_the_key_and_the_entry(micro_config, rules, message):
    micro_config.sharding_rules = rules
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    with pytest.raises(ValueError, match=re.escape(f"config key sharding_rules: {message}")):
        trainer.Stage(micro_config, "stage1", mesh, 300)


@pytest.mark.parametrize(
    "dispatch, groups",
    [
        ("capacity", "local"),
        pytest.param("dropless", "local", marks=pytest.mark.slow),
        pytest.param("capacity", "global", marks=pytest.mark.slow),
    ],
)
def test_expert_parallel_loss_equals_single_device(micro_config, dispatch, groups):
    """One stage-3 step on a data 2 x expert 4 mesh = on one device with as many routing
    groups: local groups are each device's rows (8 devices x 1 group = 1 device x 8 groups),
    global ones the whole batch's (1 group on both). Capacity mode leaves the expert
    placement to GSPMD; dropless runs under shard_map with explicit all-to-alls."""
    micro_config.stage3.batch_size = 8  # divisible by data x expert = 8
    micro_config.model.moe.update(dispatch=dispatch, groups=groups)
    one_device = micro_config.copy_and_resolve_references()
    one_device.model.moe.num_groups = 8 if groups == "local" else 1
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(Path.cwd()),
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, micro_config.to_json(), one_device.to_json()],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["spec"].startswith("P(None, 'expert'"), result["spec"]  # layers, experts
    assert result["experts_per_shard"] == 1  # 4 experts over expert=4
    # Dropless ran under shard_map with its own all-to-alls; capacity left them to GSPMD.
    assert result["all_to_all"] == (dispatch == "dropless")
    assert abs(result["loss8"] - result["loss1"]) <= 1e-5, result
    assert result["max_kernel_diff"] <= 1e-5, result
