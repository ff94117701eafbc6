"""Stage 1 of MoE-Tuning alone on the embedded data.

Command: python -m moe_llava_jax.train --config=configs/stage1.py
Arg (optional, `--config=configs/stage1.py:steps_scale=0.1`): steps_scale.
Expected here (2 CPU cores): see the README's MoE-Tuning table; writes workdir/tiny/stage1.
"""

from configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, steps_scale=1.0)
    return common.moe_tuning_config("stage1", "", steps_scale=args.steps_scale)
