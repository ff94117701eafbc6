"""The whole MoE-Tuning recipe on the embedded data: stage 1 -> 2 -> 3, POPE after 2 and 3.

Command: python -m moe_llava_jax.train --config=configs/moe_tuning.py
Arg (optional): steps_scale (e.g. `configs/moe_tuning.py:steps_scale=0.05` for a smoke run),
  trainable (stage-3 preset: stage3_paper | stage3_original).
Expected here (2 CPU cores): see the README; POPE random accuracy >= 0.75 after stage 3.
"""

from configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, steps_scale=1.0, trainable="stage3_paper")
    return common.moe_tuning_config(
        "stage1,stage2,stage3",
        "stage2,stage3",
        steps_scale=args.steps_scale,
        stage3_trainable=args.trainable,
    )
