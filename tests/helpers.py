"""Stage-level helpers shared by tests: build a stage on the micro config, draw a batch."""

from pathlib import Path

import jax.numpy as jnp

from moe_llava_jax import sharding, trainer
from moe_llava_jax.data import from_config
from moe_llava_jax.data.pipeline import MODEL_INPUTS


def make_stage(config, name):
    """(trainer.Stage, embedded data, tokenizer) for stage `name` of `config`."""
    data, tokenizer = from_config.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    return trainer.Stage(config, name, mesh, tokenizer.vocab_size), data, tokenizer


def first_batch(stage, data, tokenizer):
    """The stage's first training batch (model inputs only), as jax arrays."""
    source = from_config.stage_source(stage.config, stage.name, data)
    skip_log = stage.skip_log(source, Path(stage.config.workdir) / "skipped.jsonl")
    batch = next(iter(stage.dataset(source, tokenizer, skip_log)))
    return {k: jnp.asarray(batch[k]) for k in MODEL_INPUTS if k in batch}
