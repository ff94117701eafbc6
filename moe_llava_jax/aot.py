"""Ahead-of-time compile report: what each stage's train step needs on a target topology,
from shapes alone, on any machine.

    pip install "jax[tpu]==<this jax>"   # libtpu: compiles for TPU without a TPU
    JAX_PLATFORMS=cpu python -m moe_llava_jax.aot --config=configs/moe_llava.py:llm=stablelm \\
        --topology=v5p-8 [--stages=stage2,stage3] [--json=report.json]

For each stage: the trainer's own jitted step (`trainer.Stage.train_step`: shardings,
donation, optimizer) lowered from `ShapeDtypeStruct`s and compiled for the topology's
devices (TPU devices from libtpu's topology description; `cpu:N` for N local CPU devices).
No weights are made and nothing runs. Per chip: argument, output and temporary bytes and
what they need together (arguments + outputs - donated aliases + temporaries, the sum XLA's
out-of-memory check guards) against the chip's HBM, the collectives in the program (kind,
ops, bytes of their results; a scanned body's ops once), compile seconds, and the program's
matmul FLOPs (loop bodies times their trip counts, `hlo_stats.py`) over the analytic model
FLOPs (`flops.py`; kernels XLA emits as custom calls, such as its fused attention on TPU,
are not in the count, so their share is missing), and over the FLOPs the design runs on
purpose (`flops.designed_overheads`: remat's recompute, capacity slots no token fills,
attention chunks' padding and recompute), so that a ratio above 1 there is work nobody asked
for; and the bytes a checkpoint save writes (whole arrays, from the state's shapes), lean and
with every param. A program that does not fit is reported with the bytes XLA's
out-of-memory check asked for.

Memory figures are XLA's for that backend: TPU's account for remat and scheduling,
XLA:CPU's ignore remat (use a TPU topology for memory claims). Why the mesh comes from the
config (`mesh`, one axis -1 = the remaining devices): the report is of the run the config
describes, not of a layout chosen here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import AxisType, Mesh
from ml_collections import config_flags

from moe_llava_jax import checkpoint, cli, flops, hlo_stats, sharding, trainer
from moe_llava_jax.models.moe import expert_capacity, routing_groups

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as libtpu describes it (`jax.experimental.topologies`), with the HBM one
    chip offers a program."""

    name: str  # libtpu's topology name, e.g. v5p:2x2x1
    chip_config: str  # "default"; "megacore" for v4 (one device per chip, not per core)
    chips_per_host: tuple[int, int, int]
    hbm_bytes: int


# HBM per chip: v5p as XLA's out-of-memory check states it ("available HBM (95.74G)"),
# the others the published per-chip capacity.
TOPOLOGIES = {
    "v4-8": Topology("v4:2x2x1", "megacore", (2, 2, 1), 32 * GiB),
    "v5p-8": Topology("v5p:2x2x1", "default", (2, 2, 1), int(95.74 * GiB)),
    "v5p-16": Topology("v5p:2x2x2", "default", (2, 2, 1), int(95.74 * GiB)),
    "v5e-8": Topology("v5e:2x4", "default", (2, 4, 1), 16 * GiB),
    "v6e-8": Topology("v6e:2x4", "default", (2, 4, 1), 32 * GiB),
}


def topology_devices(name: str) -> tuple[list, int | None]:
    """(devices, HBM bytes per device or None) for a TOPOLOGIES name or `cpu:N`."""
    if name.startswith("cpu:"):
        count = int(name.partition(":")[2])
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise ValueError(
                f"--topology={name}: {len(devices)} CPU devices here; run with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count}"
            )
        return devices[:count], None
    if name not in TOPOLOGIES:
        raise ValueError(f"--topology={name!r}: known: {sorted(TOPOLOGIES)} or cpu:N")
    from jax.experimental import topologies  # noqa: PLC0415 (needs libtpu only for TPU)

    # libtpu takes a lockfile per process; a compile-only client need not exclude others.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topo = TOPOLOGIES[name]
    try:
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topo.name,
            chip_config_name=topo.chip_config,
            chips_per_host_bounds=topo.chips_per_host,
            num_slices=1,
        )
    except Exception as error:  # libtpu missing or too old: say how to get it
        raise ValueError(
            f"--topology={name}: cannot describe TPU {topo.name} ({error}); install libtpu "
            f'for this jax: pip install "jax[tpu]=={jax.__version__}"'
        ) from error
    return list(description.devices), topo.hbm_bytes


def topology_mesh(config: ml_collections.ConfigDict, devices: Sequence) -> Mesh:
    """The config's `mesh` axes over `devices` (one axis may be -1: the rest)."""
    shape = sharding.mesh_shape(config.mesh.to_dict(), len(devices))
    return Mesh(
        np.array(devices).reshape(shape),
        sharding.MESH_AXES,
        axis_types=(AxisType.Auto,) * len(shape),
    )


def abstract_train_inputs(stage: trainer.Stage) -> tuple[dict, dict]:
    """(state, batch) of `stage`'s step as ShapeDtypeStructs carrying the step's shardings."""
    state = checkpoint.abstract_like(stage.abstract_state, stage.state_shardings)
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=stage.batch_sharding)
        for k, (shape, dtype) in stage.batch_shapes().items()
    }
    return state, batch


_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def expert_slots_per_token(stage: trainer.Stage) -> float:
    """Expert buffer slots (E x C) the stage's MoE layers compute per routed token (k for
    dropless; 0 without MoE), for the micro-batch's routing groups under the context mesh."""
    moe = stage.model_cfg.decoder.moe
    if moe is None:
        return 0.0
    if moe.dispatch == "dropless":
        return float(moe.top_k)
    cfg = stage.stage_cfg
    micro_batch = cfg.batch_size // cfg.grad_accum_steps
    groups, _ = routing_groups(moe, micro_batch)
    tokens = micro_batch * cfg.max_length // groups
    capacity = expert_capacity(
        tokens, moe.num_experts, moe.top_k, moe.capacity_factor, moe.min_capacity
    )
    return moe.num_experts * capacity / tokens


def training_attention(stage: trainer.Stage) -> str:
    """The attention kernel the stage's train step runs on its mesh's platform (xla, cudnn,
    splash: `AttentionKernel.choose` for training's uncached attention, with segment ids
    when the stage's rows are packed)."""
    cfg = stage.model_cfg
    return cfg.attention_kernel.choose(cfg.dtype, stage.packing.mode != "none", decode=False)


def train_step_report(stage: trainer.Stage, hbm_bytes: int | None) -> dict:
    """Compile `stage`'s train step from abstract inputs for its mesh's devices; the report
    described in the module docstring (a dict that `json.dumps` takes)."""
    state, batch = abstract_train_inputs(stage)
    cfg = stage.stage_cfg
    devices = stage.mesh.devices.size
    report = {
        "stage": stage.name,
        "devices": devices,
        "global_batch": cfg.batch_size,
        "per_device_batch": cfg.batch_size / devices,
        "seq": cfg.max_length,
        "grad_accum_steps": cfg.grad_accum_steps,
        "dtype": stage.config.model.dtype,
        "remat": stage.config.model.remat,
        "scan_layers": stage.config.model.scan_layers,
        "hbm_bytes": hbm_bytes,
        "analytic_flops": stage.step_flops.total,
        "checkpoint_bytes": checkpoint.saved_bytes(stage.abstract_state, stage.mask),
    }
    with sharding.mesh_context(stage.mesh, stage.rules):
        start = time.perf_counter()
        lowered = stage.train_step.lower(state, batch)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as error:
            needed = _OOM.search(str(error))
            if not needed:
                raise
            report.update(
                fits=False,
                compile_s=round(time.perf_counter() - start, 1),
                temp_bytes=int(float(needed.group(1)) * _UNIT[needed.group(2)]),
                hbm_bytes=int(float(needed.group(3)) * _UNIT[needed.group(4)]),
            )
            return report
        report["compile_s"] = round(time.perf_counter() - start, 1)
        attention = report["attention"] = training_attention(stage)
        overheads = flops.designed_overheads(
            stage.model_cfg,
            stage.canonical(stage.mask),
            cfg.batch_size,
            cfg.max_length,
            remat=stage.config.model.remat != "none",
            expert_slots_per_token=expert_slots_per_token(stage),
            query_chunk=stage.model_cfg.attention_chunk if attention == "xla" else 0,
            attention_kernel=attention != "xla",
        )
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    # Per device, weighted by loop trip counts (`hlo_stats`); x devices = the step's.
    program_flops = hlo_stats.matmul_flops(hlo)
    designed = report["analytic_flops"] + sum(overheads.values())
    needed = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    report.update(
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        needed_bytes=needed,
        matmul_flops=None if program_flops is None else program_flops * devices,
        xla_over_analytic_flops=None if program_flops is None else round(
            program_flops * devices / report["analytic_flops"], 3
        ),
        designed_overheads=overheads,
        designed_flops=designed,
        xla_over_designed_flops=None if program_flops is None else round(
            program_flops * devices / designed, 3
        ),
        custom_calls=hlo.count(" custom-call("),
        collectives=hlo_stats.collective_ops(hlo),
    )
    if hbm_bytes:
        report["fits"] = needed <= hbm_bytes
        report["hbm_share"] = round(needed / hbm_bytes, 3)
    return report


def format_report(report: dict) -> str:
    """A few human lines for one stage's report."""
    gb = lambda key: f"{report[key] / 1e9:.2f} GB"
    head = (
        f"{report['stage']}: {report['devices']} devices, batch {report['global_batch']} "
        f"({report['per_device_batch']:g}/device) x {report['seq']}, "
        f"{report['dtype']}, remat={report['remat']}, compile {report['compile_s']} s"
    )
    if "needed_bytes" not in report:
        return (
            f"{head}\n  does NOT fit: XLA needs {gb('temp_bytes')} of temporaries, the chip "
            f"offers {gb('hbm_bytes')}"
        )
    lines = [
        head,
        f"  per chip: arguments {gb('argument_bytes')} + outputs {gb('output_bytes')} "
        f"- aliased {gb('alias_bytes')} + temporaries {gb('temp_bytes')} "
        f"= {gb('needed_bytes')}",
    ]
    if report["hbm_bytes"]:
        verdict = "fits" if report["fits"] else "does NOT fit"
        lines.append(f"  {verdict}: {100 * report['hbm_share']:.1f}% of {gb('hbm_bytes')} HBM")
    if report["matmul_flops"] is not None:
        share = {k: v / report["analytic_flops"] for k, v in report["designed_overheads"].items()}
        in_kernels = (
            f", attention in {report['attention']} kernels {share['attention_kernel']:+.3f}"
            if report["attention"] != "xla"
            else ""
        )
        lines.append(
            f"  matmul FLOPs: program {report['matmul_flops']:.3e} / analytic "
            f"{report['analytic_flops']:.3e} = {report['xla_over_analytic_flops']} "
            f"({report['custom_calls']} custom-call kernels not counted); by design "
            f"{report['designed_flops'] / report['analytic_flops']:.3f} (remat recompute "
            f"+{share['remat_recompute']:.3f}, capacity padding +{share['capacity_padding']:.3f}"
            f", attention chunks +{share['attention_chunks']:.3f}{in_kernels}), program / "
            f"designed = {report['xla_over_designed_flops']}"
        )
    saved = report["checkpoint_bytes"]
    lines.append(
        f"  checkpoint per save: {saved['lean'] / 1e9:.2f} GB lean (trainable params + "
        f"optimizer state; frozen params {saved['frozen_once'] / 1e9:.2f} GB once), "
        f"{saved['every_save'] / 1e9:.2f} GB with checkpoints.frozen=every_save"
    )
    used = {k: v for k, v in report["collectives"].items() if v["ops"]}
    lines.append(
        "  collectives: "
        + (", ".join(f"{k} {v['ops']} ops {v['bytes'] / 1e9:.2f} GB" for k, v in used.items())
           or "none")
    )
    return "\n".join(lines)


def stage_reports(config: ml_collections.ConfigDict, topology: str, stages: Sequence[str]):
    """Yields each stage's report, compiled for `topology` under `config`'s mesh and rules."""
    vocab = config.model.decoder.vocab_size
    if vocab <= 0:
        raise ValueError("config key model.decoder.vocab_size must be set (> 0) for an AOT report")
    trainer.validate_config(config)
    devices, hbm = topology_devices(topology)
    mesh = topology_mesh(config, devices)
    for name in stages:
        # Built outside the mesh context: the stage makes its rng keys eagerly, on the local
        # (CPU) backend; only the step is traced for the topology's devices.
        yield train_step_report(trainer.Stage(config, name, mesh, vocab), hbm)


_CONFIG = config_flags.DEFINE_config_file("config", None, "an ml_collections config file")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", f"{sorted(TOPOLOGIES)} or cpu:N")
_STAGES = flags.DEFINE_string("stages", "", "comma-separated stages (default: run_stages)")
_JSON = flags.DEFINE_string("json", "", "also write the reports here")


def main(argv: Sequence[str]) -> None:
    del argv
    config = _CONFIG.value
    stages = [s for s in (_STAGES.value or config.run_stages).split(",") if s]
    reports = []
    for report in stage_reports(config, _TOPOLOGY.value, stages):
        report["topology"] = _TOPOLOGY.value
        print(format_report(report), flush=True)
        reports.append(report)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(reports, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
