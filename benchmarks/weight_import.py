"""Host memory of starting a stage from a Hugging Face checkpoint: the lazy, sharded import
(`StageModel.fresh_params`) beside the whole-file read it replaced, in one run.

    python -m benchmarks.weight_import [--layers 4] [--llm stablelm-2-1.6b] [--devices 8]
        [--workdir workdir/weight_import] [--json out.json]

Writes a bfloat16 checkpoint of the `--llm` preset's real width with `--layers` decoder
layers (the file a release ships, only shallower), then starts a stage-2 model from it
(`model.llm_from`, the demo's tower and projector, fsdp over `--devices` fake CPU devices)
in a fresh process per way:
- `lazy`: what `fresh_params` does now: each param read shard by shard from the memory-map
  in bf16, cast on its device, adopted by the init program;
- `eager`: the previous path: the whole checkpoint read into float32 numpy, then one jitted
  call that takes it over.
Each process resets its peak RSS once the model is built (imports, mesh, abstract params),
then reports the peak above that (`VmHWM`), the bytes its devices hold when done (the
local shard set: on CPU, device memory is host memory) and the file's size. Mapped file
pages count in RSS once read. The bound the lazy path keeps (issue 15): peak <= 1.3 x the
local shard set + the file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from configs import models

BOUND = 1.3  # peak <= BOUND x local shard set + file


def write_checkpoint(
    directory: Path,
    hf_config: dict,
    dtype=ml_dtypes.bfloat16,
    fill: Callable[[tuple[int, ...], int], np.ndarray] | None = None,
) -> int:
    """A Hugging Face decoder checkpoint (config.json + safetensors) of `hf_config` in
    `dtype`; its bytes. `fill(shape, index)` gives each param's values in our layout
    (default `pattern`: what is measured is memory, and a misplaced slice still shows)."""
    from moe_llava_jax import param_tree
    from moe_llava_jax.convert import families, hf

    fill = fill or pattern
    shapes = hf.decoder_shapes(families.decoder_config(hf_config))
    params = {path: fill(shape, k) for k, (path, shape) in enumerate(sorted(shapes.items()))}
    hf.export_decoder(param_tree.unflatten(params), hf_config["model_type"], directory, dtype)
    (directory / "config.json").write_text(json.dumps(hf_config))
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def pattern(shape: tuple[int, ...], index: int) -> np.ndarray:
    """A read-only [shape] float32 view: ramp(last axis) / size + index (no memory)."""
    ramp = np.arange(shape[-1], dtype=np.float32) / shape[-1] + index
    return np.broadcast_to(ramp, shape)


def reset_peak_rss() -> int:
    """Resets this process's peak RSS to its current RSS (Linux `clear_refs` 5); returns it."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss("VmRSS")


def rss(field: str) -> int:
    """`VmRSS` / `VmHWM` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def local_bytes(tree) -> int:
    """Bytes this process's devices hold of a tree of arrays (replicas counted)."""
    import jax

    return sum(
        shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
    )


def measure(checkpoint: Path, way: str) -> dict:
    """Runs in the measuring process: builds the stage, resets the peak, imports `way`."""
    import jax

    from configs import common
    from moe_llava_jax import build, sharding
    from moe_llava_jax.convert import hf

    config = common.moe_tuning_config("stage2", "")
    config.model.llm_from = str(checkpoint)
    config.mesh.update(data=1, fsdp=-1)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    with sharding.mesh_context(mesh, sharding.rules_from_config(config.sharding_rules)):
        stage = build.StageModel(config, "stage2", mesh, vocab_size=0)
        baseline = reset_peak_rss()
        if way == "lazy":
            params = stage.fresh_params()
        else:
            params = stage.assemble({"decoder": hf.load_decoder(checkpoint)[1]}, upcycle=False)
        jax.block_until_ready(params)
    peak = rss("VmHWM") - baseline
    # From the first device's shard: indexing the global array would gather it.
    embed = params["decoder"]["embed_tokens"]["embedding"].addressable_data(0)
    return {
        "way": way,
        "devices": jax.device_count(),
        "peak_above_baseline": peak,
        "local_shards": local_bytes(params),
        "file": sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")),
        "embed_corner": np.asarray(embed[:2, :4], np.float32).tolist(),
    }


def run_measurement(checkpoint: Path, way: str, devices: int) -> dict:
    """`measure` in a fresh process on `devices` fake CPU devices (its result as JSON)."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    command = [sys.executable, "-m", "benchmarks.weight_import", "--measure", way]
    command += ["--checkpoint", str(checkpoint)]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm", default="stablelm-2-1.6b", choices=sorted(models.LLMS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--workdir", default="workdir/weight_import")
    parser.add_argument("--json", default="")
    parser.add_argument("--measure", choices=("lazy", "eager"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.checkpoint), args.measure)))
        return
    directory = Path(args.workdir) / f"{args.llm}-{args.layers}layers-bf16"
    directory.mkdir(parents=True, exist_ok=True)
    size = write_checkpoint(directory, dict(models.LLMS[args.llm], num_hidden_layers=args.layers))
    print(f"{directory}: {gib(size)} of bf16 ({args.llm} width, {args.layers} layers)")
    results = [run_measurement(directory, way, args.devices) for way in ("eager", "lazy")]
    print(
        f"{'way':<6} {'peak above baseline':>20} {'local shards':>13} {'file':>10} "
        f"{'peak / (shards + file)':>23} {'(peak - file) / shards':>23}"
    )
    for r in results:
        shards, file, peak = r["local_shards"], r["file"], r["peak_above_baseline"]
        print(
            f"{r['way']:<6} {gib(peak):>20} {gib(shards):>13} {gib(file):>10} "
            f"{peak / (shards + file):>23.2f} {(peak - file) / shards:>23.2f}"
        )
    eager, lazy = results
    print(
        f"lazy / eager peak: {lazy['peak_above_baseline'] / eager['peak_above_baseline']:.2f}"
        f" (bound for lazy: (peak - file) / shards <= {BOUND})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
