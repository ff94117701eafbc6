"""Upcycling ablation: stage 3 under each upcycling mode (+ dense continuation), 2 seeds each,
from one shared stage-2 checkpoint, on the embedded data.

Command: python -m moe_llava_jax.experiments.ablation --config=configs/ablation.py
Arg (optional): steps_scale (scales every stage's steps), seeds (e.g. `seeds=0+1+2`).
Shorter than the MoE-Tuning run (stage 2: 600 steps, each stage-3 variant: 100 steps, POPE
with 1 yes + 1 no probe per held-out image) so that 10 variants fit in ~20 minutes on 2 cores.
"""

from configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, steps_scale=1.0, seeds="0+1")
    config = common.moe_tuning_config(
        "stage1,stage2", "", steps_scale=args.steps_scale, stage3_trainable="stage3_paper"
    )
    config.workdir = "workdir/ablation"
    scaled = lambda n: max(1, round(n * args.steps_scale))
    config.stage2.num_steps = scaled(600)
    config.stage3.num_steps = scaled(100)
    config.stage3.log_every = 5
    config.stage3.checkpoint_every = 1000  # only the final checkpoint
    config.pope.num_per_image = 1
    # The dense baseline trains the FFNs of every other layer, which a scanned stack cannot
    # tell apart (a scanned param trains as a whole); the tiny model compiles fast looped.
    config.model.scan_layers = False
    config.ablation = {
        "modes": "copy,copy_noise,drop_upcycle,random,dense",
        "seeds": args.seeds.replace("+", ","),
    }
    return config
