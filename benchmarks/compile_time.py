"""Compile time and program size of real-width train steps: looped vs scanned layers.

    python -m benchmarks.compile_time [--layers 2,8,24] [--stages stage2,stage3]
        [--seq 640] [--json out.json]

The trainer's own jitted step (`trainer.Stage.train_step`: shardings, donation, optimizer)
for CLIP-L/14-336 + StableLM-2-1.6B width (`configs/models.py` presets; the decoder's
depth set by `--layers`), bf16 compute, `remat=block`, one example of `--seq` positions
(576 of them image tokens), lowered and compiled from abstract shapes only: no weights
are ever made, so it runs on a laptop CPU. Stage 2 trains the dense LLM + projector;
stage 3 the MoE layers (4 experts, top 2, every other layer).

Per (stage, depth, layout): seconds to lower (trace + StableHLO), seconds to compile
(XLA:CPU), and the size of both programs in characters; then the deepest / shallowest
ratios side by side. Each (stage, layout) first compiles its shallowest step once, unreported,
so that no row pays for the process's first trace of that code. Compile time is XLA:CPU's, but what grows with depth (one copy of the
block per layer, or one for all of them) is the program, whatever the backend.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from configs import common, models
from moe_llava_jax import aot, sharding, trainer

LLM, TOWER = "stablelm-2-1.6b", "clip-l-14-336"


def real_width_config(num_layers: int, scan_layers: bool, seq: int):
    config = common.moe_tuning_config("stage2,stage3", "")
    config.model.decoder = models.decoder(LLM)
    config.model.decoder.num_layers = num_layers
    config.model.vision = models.vision(TOWER)
    config.model.update(dtype="bfloat16", remat="block", scan_layers=scan_layers)
    for name in ("stage2", "stage3"):
        config[name].update(batch_size=1, max_length=seq)
    return config


def measure(stage_name: str, num_layers: int, scan_layers: bool, seq: int) -> dict:
    config = real_width_config(num_layers, scan_layers, seq)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = sharding.rules_from_config(config.sharding_rules)
    with sharding.mesh_context(mesh, rules):
        stage = trainer.Stage(config, stage_name, mesh, config.model.decoder.vocab_size)
        state, batch = aot.abstract_train_inputs(stage)
        start = time.perf_counter()
        lowered = stage.train_step.lower(state, batch)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
    return {
        "stage": stage_name,
        "layers": num_layers,
        "layout": "scan" if scan_layers else "loop",
        "lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
        "stablehlo_chars": len(lowered.as_text()),
        "compiled_hlo_chars": len(compiled.as_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,8,24")
    parser.add_argument("--stages", default="stage2,stage3")
    parser.add_argument("--seq", type=int, default=640, help="positions (576 image tokens)")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args()
    depths = [int(n) for n in args.layers.split(",")]
    print(f"{LLM} width + {TOWER}, bf16, remat=block, 1 x {args.seq} positions, "
          f"{jax.default_backend()} compile")
    header = ("stage", "layers", "layout", "lower_s", "compile_s", "stablehlo_chars",
              "compiled_hlo_chars")
    print(" | ".join(header))
    rows = []
    for stage_name in args.stages.split(","):
        for scan_layers in (False, True):
            measure(stage_name, min(depths), scan_layers, args.seq)  # warm-up, not reported
            for depth in depths:
                row = measure(stage_name, depth, scan_layers, args.seq)
                rows.append(row)
                print(" | ".join(str(row[k]) for k in header), flush=True)
    print(f"\nratios {max(depths)} layers / {min(depths)} layers:")
    for stage_name in args.stages.split(","):
        for layout in ("loop", "scan"):
            by_depth = {
                r["layers"]: r for r in rows if r["stage"] == stage_name and r["layout"] == layout
            }
            deep, shallow = by_depth[max(depths)], by_depth[min(depths)]
            ratios = {
                k: round(deep[k] / shallow[k], 2)
                for k in ("lower_s", "compile_s", "stablehlo_chars", "compiled_hlo_chars")
            }
            print(f"  {stage_name} {layout}: {ratios}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
