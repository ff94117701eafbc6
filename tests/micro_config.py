"""The moe_tuning config shrunk to seconds: 2-layer decoder, 4 image tokens, 64 records.

A config file (not only a fixture) so that tests can start the trainer as a separate process:
    python -m moe_llava_jax.train --config=tests/micro_config.py:workdir=W,data_root=D
"""

from configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, workdir="workdir/micro", data_root="", run_stages="stage1")
    config = common.moe_tuning_config(args.run_stages.replace("+", ","), "")
    config.workdir = args.workdir
    config.data.root = args.data_root
    config.data.synthetic.update(num_train=64, num_eval=8, image_size=32)
    config.model.vision.update(
        image_size=32, patch_size=16, hidden_size=32, num_heads=2, intermediate_size=64
    )
    config.model.decoder.update(
        hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    for name in ("stage1", "stage2", "stage3"):
        config[name].update(
            num_steps=4, batch_size=8, log_every=1, checkpoint_every=2, max_length=96
        )
    return config
