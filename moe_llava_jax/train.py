"""MoE-Tuning trainer: `python -m moe_llava_jax.train --config=configs/moe_tuning.py`.

Runs the stages the config lists (stage1 -> stage2 -> stage3), each resumable from its own
checkpoints, then POPE after the stages named in `config.pope.after` (`trainer.run`). A bad
config value or a missing checkpoint prints one line and exits 2 (`--debug`: a traceback).
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from moe_llava_jax import cli, trainer

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO; the bar shows progress
    config = flags.FLAGS.config
    if (cache := cli.compilation_cache_dir(config)) is not None:
        cli.enable_compilation_cache(cache)
    trainer.run(config)


if __name__ == "__main__":
    cli.run(main)
