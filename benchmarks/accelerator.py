"""Real-size step throughput on one accelerator, kernels and dispatch modes side by side.

    python -m benchmarks.accelerator [--repeats 5] [--peak-flops 989e12] [--json out.json]

StableLM-2-1.6B + CLIP-L/14-336 at the recipe's shapes (`configs/moe_llava.py`: bf16,
frozen weights in bf16, remat=unit, the experts' backward in 4 pieces, 2,624 positions, `--per-device-batch` examples per micro-batch, random
weights and a random batch whose second half is supervised), the trainer's own jitted
step, one device. Variants, each in its own process (XLA flags are read once per
process): stage 2 with `model.attention` xla and cudnn; stage 3 (top-2 of 4 experts in
every other layer) with capacity and dropless dispatch, dropless also with XLA's
`--xla_gpu_experimental_use_ragged_dot_fusion`. Per variant: compile seconds, median
seconds per step, tokens/s (every position) and MFU (analytic model FLOPs, `flops.py`,
over `--peak-flops`: H100/H200 SXM dense bf16 is 989e12). Made to finish in about
8 minutes on one H100/H200; a variant that fails (e.g. cuDNN missing) prints its error and
the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = {  # name -> (stage, config overrides, extra XLA flags)
    "stage2/xla": ("stage2", {"attention": "xla"}, ""),
    "stage2/cudnn": ("stage2", {"attention": "cudnn"}, ""),
    "stage3/capacity": ("stage3", {"attention": "auto", "dispatch": "capacity"}, ""),
    "stage3/dropless": ("stage3", {"attention": "auto", "dispatch": "dropless"}, ""),
    "stage3/dropless+ragged": (
        "stage3",
        {"attention": "auto", "dispatch": "dropless"},
        "--xla_gpu_experimental_use_ragged_dot_fusion=true",
    ),
}


def measure(variant: str, per_device_batch: int, repeats: int, peak_flops: float) -> dict:
    """One variant, in this process."""
    import jax  # noqa: PLC0415 (after the parent set XLA_FLAGS)

    from benchmarks.moe_layer import median_seconds  # noqa: PLC0415
    from benchmarks.train_step import StepRunner, random_batch  # noqa: PLC0415
    from configs import moe_llava  # noqa: PLC0415
    from moe_llava_jax import sharding, trainer  # noqa: PLC0415

    stage_name, overrides, _ = VARIANTS[variant]
    config = moe_llava.get_config("llm=stablelm")
    config.mesh = {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}
    config.model.attention = overrides["attention"]
    config.model.moe.dispatch = overrides.get("dispatch", "capacity")
    if config.model.moe.dispatch == "dropless":  # pieces are capacity dispatch's
        config.model.moe.backward_pieces = 1
    config[stage_name].update(batch_size=per_device_batch * jax.device_count(), grad_accum_steps=1)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    with sharding.mesh_context(mesh, sharding.rules_from_config(config.sharding_rules)):
        stage = trainer.Stage(config, stage_name, mesh, config.model.decoder.vocab_size)
        runner = StepRunner(stage, random_batch(stage, seed=0))
        start = time.perf_counter()
        jax.block_until_ready(runner())  # compiles
        compile_s = time.perf_counter() - start
        seconds = median_seconds({"step": runner}, repeats)["step"]
    tokens = stage.stage_cfg.batch_size * stage.stage_cfg.max_length
    flops = stage.step_flops.total
    return {
        "variant": variant,
        "device": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 1),
        "step_s": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds),
        "mfu": round(flops / seconds / (peak_flops * jax.device_count()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-device-batch", type=int, default=8)
    parser.add_argument("--peak-flops", type=float, default=989e12)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timeout", type=int, default=150, help="seconds per variant")
    parser.add_argument("--json", default="")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        row = measure(args.one, args.per_device_batch, args.repeats, args.peak_flops)
        print(json.dumps(row))
        return
    rows = []
    for variant in args.variants.split(","):
        flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), VARIANTS[variant][2]]))
        command = [sys.executable, "-m", "benchmarks.accelerator", "--one", variant,
                   "--per-device-batch", str(args.per_device_batch),
                   "--repeats", str(args.repeats), "--peak-flops", str(args.peak_flops)]
        try:
            out = subprocess.run(command, env={**os.environ, "XLA_FLAGS": flags},
                                 capture_output=True, text=True, timeout=args.timeout)
            row = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                   else {"variant": variant, "error": out.stderr.strip().splitlines()[-1:]})
        except subprocess.TimeoutExpired:
            row = {"variant": variant, "error": f"over {args.timeout} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
