"""Training-step throughput and MFU of the tiny config, stage by stage.

    python -m benchmarks.train_step [--repeats 5] [--matmul-size 2048]
        [--dtype float32] [--remat none] [--grad-accum-steps 1]

1. Peak: the median time of one [n, n] x [n, n] float32 `jnp.dot` (2 n^3 FLOPs) gives the
   FLOP/s this machine's matmuls reach, the MFU denominator here. It is a measured peak,
   not the data sheet's; on an accelerator give the data-sheet peak to the trainer as
   `config.peak_flops_per_device`.
2. Stages 1, 2, 3 of `configs/moe_tuning.py`'s tiny model (fresh random params, one fixed
   random batch per stage at its batch_size x max_length): the trainer's own jitted step
   (`trainer.Stage.train_step`: shardings, donation), medians after a compiling warm-up.
   Per stage: ms/step, tokens/s (every position of the padded batch), the analytic model
   FLOPs of a step (`moe_llava_jax.flops`), the FLOP/s achieved and MFU; then the stage-1 /
   stage-2 step-time ratio next to the ratio of their analytic FLOPs (stage 1 trains only
   the projector, but its gradient still flows back through the whole frozen decoder).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.moe_layer import median_seconds
from configs import moe_tuning
from moe_llava_jax import sharding, trainer
from moe_llava_jax.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from moe_llava_jax.train_step import Batch

STAGES = ("stage1", "stage2", "stage3")


def peak_matmul_flops(size: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    seconds = median_seconds({"dot": lambda: dot(a, b)}, repeats)["dot"]
    return 2 * size**3 / seconds


def random_batch(stage: trainer.Stage, seed: int) -> Batch:
    """Random tokens with the image placeholders after the first token; the second half of
    every row is supervised (an answer), as in a captioning / instruction example."""
    cfg = stage.stage_cfg
    vision = stage.model_cfg.vision
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, stage.model_cfg.decoder.vocab_size, (cfg.batch_size, cfg.max_length))
    ids[:, 1 : 1 + vision.num_image_tokens] = IMAGE_TOKEN_INDEX
    labels = np.where(np.arange(cfg.max_length) >= cfg.max_length // 2, ids, IGNORE_INDEX)
    size = (cfg.batch_size, vision.image_size, vision.image_size, 3)
    images = rng.integers(0, 256, size, dtype=np.uint8)  # pixels, as the data pipeline gives
    batch = {"input_ids": ids, "labels": labels, "images": images}
    return {k: jax.device_put(v, stage.batch_sharding) for k, v in batch.items()}


class StepRunner:
    """A zero-argument call running one step on the fixed batch (the state is donated to
    the next one, as in the trainer)."""

    def __init__(self, stage: trainer.Stage, batch: Batch):
        self.stage, self.batch = stage, batch
        params = stage.random_params()
        opt_state = jax.jit(stage.tx.init, out_shardings=stage.state_shardings["opt_state"])(params)
        step = jax.device_put(jnp.ones((), jnp.int32), stage.state_shardings["step"])
        self.state = {"step": step, "params": params, "opt_state": opt_state}

    def __call__(self) -> dict:
        self.state, _ = self.stage.train_step(self.state, self.batch)
        return self.state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", help="model.dtype")
    parser.add_argument("--remat", default="none", help="model.remat")
    parser.add_argument("--grad-accum-steps", type=int, default=1, help="stageN.grad_accum_steps")
    args = parser.parse_args()

    config = moe_tuning.get_config()
    config.model.update(dtype=args.dtype, remat=args.remat)
    for name in STAGES:
        config[name].grad_accum_steps = args.grad_accum_steps
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = sharding.rules_from_config(config.sharding_rules)
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
    peak = peak_matmul_flops(args.matmul_size, args.repeats) * jax.device_count()
    print(
        f"{device}; measured peak: {peak / 1e9:.1f} GFLOP/s ({args.matmul_size}^2 fp32 matmul); "
        f"model.dtype={args.dtype}, model.remat={args.remat}, "
        f"grad_accum_steps={args.grad_accum_steps}; medians of {args.repeats} steps\n"
    )
    vocab_size = config.data.synthetic.vocab_size  # the embedded data's tokenizer size
    with sharding.mesh_context(mesh, rules):  # as trainer.run
        stages = {name: trainer.Stage(config, name, mesh, vocab_size) for name in STAGES}
        runners = {
            name: StepRunner(s, random_batch(s, seed=i))
            for i, (name, s) in enumerate(stages.items())
        }
        seconds = median_seconds(runners, args.repeats)

    print("| stage | trains | batch x seq | ms/step | tokens/s | TFLOP/step | GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for name, stage in stages.items():
        cfg, t = stage.stage_cfg, seconds[name]
        step_flops = stage.step_flops.total
        print(
            f"| {name} | {cfg.trainable} | {cfg.batch_size} x {cfg.max_length} | {1e3 * t:.1f} "
            f"| {cfg.batch_size * cfg.max_length / t:.0f} | {step_flops / 1e12:.3g} "
            f"| {step_flops / t / 1e9:.1f} | {step_flops / t / peak:.1%} |"
        )
    flops_ratio = stages["stage1"].step_flops.total / stages["stage2"].step_flops.total
    print(
        f"\nstage-1 / stage-2 step time: {seconds['stage1'] / seconds['stage2']:.2f} "
        f"(analytic FLOPs: {flops_ratio:.2f}; stage 1's sequences are "
        f"{config.stage1.max_length} tokens, stage 2's {config.stage2.max_length})"
    )


if __name__ == "__main__":
    main()
