"""Ahead-of-time per-chip memory of a real-size train step for TPU v5p-8 (4 chips), no TPU.

    pip install "jax[tpu]==<this jax>"   # libtpu, to compile for TPU on a CPU machine
    JAX_PLATFORMS=cpu python -m benchmarks.aot_memory stage3

StableLM-2-1.6B + CLIP-L/14-336, scanned layers, bf16, remat=block, fsdp 4, 16 examples
per chip x 2,624 positions (issue 14's setting). Prints compile seconds, argument / output /
temp bytes per chip and the collectives in the compiled program, or XLA's out-of-memory
message with the bytes it needed.
"""
import json
import re
import sys
import time

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import AxisType
from benchmarks.compile_time import abstract_inputs
from configs import common, models
from moe_llava_jax import sharding, trainer

stage_name = sys.argv[1]
devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1",
    chip_config_name="default", chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 4, 1, 1), sharding.MESH_AXES,
                         axis_types=(AxisType.Auto,) * 4)
config = common.moe_tuning_config("stage2,stage3", "")
config.model.decoder = models.decoder("stablelm-2-1.6b")
config.model.vision = models.vision("clip-l-14-336")
config.model.update(dtype="bfloat16", remat="block", scan_layers=True)
for name in ("stage2", "stage3"):
    config[name].update(batch_size=64, max_length=2624)
rules = sharding.rules_from_config(config.sharding_rules)
stage = trainer.Stage(config, stage_name, mesh, config.model.decoder.vocab_size)
state, batch = abstract_inputs(stage)
with sharding.mesh_context(mesh, rules):
    t = time.perf_counter(); lowered = stage.train_step.lower(state, batch)
    compiled = lowered.compile(); secs = time.perf_counter() - t
m = compiled.memory_analysis()
hlo = compiled.as_text()
coll = {k: len(re.findall(rf"= \S+ {k}[-(]", hlo)) for k in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")}
print(json.dumps({"stage": stage_name, "compile_s": round(secs, 1), "argument_GB": m.argument_size_in_bytes / 1e9,
    "output_GB": m.output_size_in_bytes / 1e9, "temp_GB": m.temp_size_in_bytes / 1e9,
    "alias_GB": m.alias_size_in_bytes / 1e9, "hlo_chars": len(hlo), "collectives": coll,
    "flops_per_chip": compiled.cost_analysis().get("flops") if isinstance(compiled.cost_analysis(), dict) else None}))
