"""Stage 3 of MoE-Tuning alone on the embedded data (needs stage 2's checkpoint).

Command: python -m moe_llava_jax.train --config=configs/stage3.py
Arg (optional, `--config=configs/stage3.py:steps_scale=0.1`): steps_scale, trainable=stage3_original.
Expected here (2 CPU cores): see the README's MoE-Tuning table; writes workdir/tiny/stage3.
"""

from configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, steps_scale=1.0, trainable="stage3_paper")
    return common.moe_tuning_config(
        "stage3", "stage3", steps_scale=args.steps_scale, stage3_trainable=args.trainable
    )
