"""A trained stage's checkpoint -> a directory in the released MoE-LLaVA layout, for PyTorch users:

    python -m moe_llava_jax.export --checkpoint workdir/mine/stage3/checkpoints \\
        --out /tmp/MoE-LLaVA-mine

writes `model.safetensors` (DeepSpeed expert names, `image_spatial_proj` projector), the
original's `config.json` (its `moe` dict, `image_projector_type`, `mm_image_tower`, the base
LLM's key names) and the tokenizer the stage trained with. A MoE stage becomes `moe_llava_*`,
a dense one `llava_*`; the base family (phi | stablelm | qwen) is the release's or LLM's the
run started from (`model.init_from_hf`, `model.llm_from`), or `--base`. The tower is not
written: the original reads it from `mm_image_tower`. `hf.load_moe_llava` reads the
directory back to the same config and bit-identical params.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import ml_collections
from absl import flags

from moe_llava_jax import cli
from moe_llava_jax.answering import Predictor
from moe_llava_jax.convert import families, hf
from moe_llava_jax.models.decoder import DecoderConfig

BASES = tuple(sorted(set(families.RELEASE_TYPES.values())))


def release_base(config: ml_collections.ConfigDict) -> str:
    """The base family of the release or LLM the run started from."""
    if release := config.model.get("init_from_hf", ""):
        return families.RELEASE_TYPES[hf.read_hf_config(release)["model_type"]]
    if config.model.llm_from:
        model_type = hf.read_hf_config(config.model.llm_from)["model_type"]
        if model_type in BASES:
            return model_type
        raise ValueError(
            f"model.llm_from is a {model_type!r} model: MoE-LLaVA releases exist for {BASES} only"
        )
    raise ValueError(f"the run started from no release or HF LLM: give --base (one of {BASES})")


def tower_name(config: ml_collections.ConfigDict) -> str:
    """What the release's `mm_image_tower` says: the release's own, else the tower directory."""
    if release := config.model.get("init_from_hf", ""):
        return hf.read_hf_config(release).get("mm_image_tower", "")
    return config.model.vision_from


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path, base: str = "") -> str:
    """Writes the release directory `out`; returns its model_type."""
    predictor = Predictor(checkpoint_dir, batch_size=1)
    config, stage = predictor.config, predictor.stage
    base = base or release_base(config)
    if base not in BASES:
        raise ValueError(f"--base={base!r}: expected one of {BASES}")
    decoder = stage.model_cfg.decoder
    model_type = f"moe_llava_{base}" if decoder.moe is not None else f"llava_{base}"
    params = stage.canonical(predictor.params)
    weights = jax.device_get({"decoder": params["decoder"], "projector": params["projector"]})
    hf.export_moe_llava(
        weights,
        model_type,
        stage.model_cfg.projector,
        out,
        decoder=decoder,
        mm_image_tower=tower_name(config),
        mm_vision_select_layer=stage.model_cfg.vision.select_layer,
        mm_vision_select_feature=stage.model_cfg.vision.select_feature,
    )
    check_round_trip(decoder, out, base)
    if config.data.tokenizer:
        shutil.copy(config.data.tokenizer, Path(out) / "tokenizer.json")
    return model_type


def check_round_trip(decoder: DecoderConfig, out: str | Path, base: str) -> None:
    """The written config.json must read back to the decoder: a base whose layout cannot say
    what this decoder is (another norm, activation, biases) fails here, naming the fields.
    The residual dropout is training's, not the model's (only Phi's config.json has a key
    for it), so it is not compared."""
    again, _ = families.moe_llava_config(hf.read_hf_config(out))
    plain = lambda c: dataclasses.replace(c, moe=None, residual_dropout=0.0)
    fields = [
        f.name
        for f in dataclasses.fields(DecoderConfig)
        if f.name != "moe" and getattr(plain(again), f.name) != getattr(plain(decoder), f.name)
    ]
    if fields or again.moe_layers != decoder.moe_layers:
        raise ValueError(
            f"{out}: the {base} release layout does not describe this decoder (differs in "
            f"{fields or ['moe layers']}); pick the --base the model was built as"
        )


def main(argv) -> None:
    del argv
    FLAGS = flags.FLAGS
    model_type = export_checkpoint(FLAGS.checkpoint, FLAGS.out, FLAGS.base)
    print(f"{FLAGS.out}: {model_type} (read back with hf.load_moe_llava)")


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "A stage's checkpoints directory.")
    flags.DEFINE_string("out", None, "Release directory to write.")
    flags.DEFINE_string("base", "", f"Base family {BASES} (default: what the run started from).")
    flags.mark_flags_as_required(["checkpoint", "out"])
    cli.run(main)
