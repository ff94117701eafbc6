"""Import Hugging Face backbones into our param trees and export them back.

    decoder_cfg, decoder_params = load_decoder("/models/phi-2")
    vision_cfg, vision_params = load_vision("/models/clip-vit-large-patch14-336")
    export_decoder(decoder_params, "phi", "/tmp/phi-2-roundtrip")
    moe_cfg, projector, params = load_moe_llava("/models/MoE-LLaVA-Phi2-2.7B-4e")

Params come back as float32 numpy trees (master weights), whatever the checkpoint dtype;
with `lazy=True` as trees of `lazy.LazyTensor`s in the checkpoint's dtype, read from the
memory-mapped files only when (and as far as) they are read: `placement.place` builds
sharded device arrays from them, each process reading only its devices' shards.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moe_llava_jax import param_tree
from moe_llava_jax.convert import families, name_rules, safetensors_io, torch_pickle
from moe_llava_jax.convert.lazy import LazyTensor
from moe_llava_jax.models.decoder import Decoder, DecoderConfig
from moe_llava_jax.models.projector import Projector
from moe_llava_jax.models.vision import VisionConfig, VisionTower

VISION_PREFIX = "vision_model."  # full CLIPModel / SiglipModel checkpoints nest the tower here


def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face model directory")
    return json.loads(path.read_text())


def _shapes(abstract_params: Mapping) -> dict[str, tuple[int, ...]]:
    return {
        path: tuple(x.shape) for path, x in param_tree.flatten(nn.unbox(abstract_params)).items()
    }


def decoder_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    ids = jnp.zeros((1, 1), jnp.int32)
    positions = jnp.zeros((1, 1), jnp.int32)
    init = lambda: Decoder(config).init(
        jax.random.key(0), ids, method=lambda m, x: m(m.embed(x), positions)
    )
    return _shapes(jax.eval_shape(init)["params"])


def vision_shapes(config: VisionConfig) -> dict[str, tuple[int, ...]]:
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    init = lambda: VisionTower(config).init(jax.random.key(0), images)
    return _shapes(jax.eval_shape(init)["params"])


def _as_tree(flat: Mapping[str, LazyTensor], lazy: bool) -> dict:
    """The imported params as a tree: lazy, or read whole into float32."""
    if lazy:
        return param_tree.unflatten(flat)
    return param_tree.unflatten({k: np.asarray(v.value(), np.float32) for k, v in flat.items()})


def load_decoder(directory: str | Path, *, lazy: bool = False) -> tuple[DecoderConfig, dict]:
    """(config, params) of a LLaMA / Qwen2 / StableLM / Phi causal LM directory."""
    hf = read_hf_config(directory)
    config = families.decoder_config(hf)
    flat = name_rules.import_tensors(
        safetensors_io.read_checkpoint(directory),
        families.decoder_rules(hf["model_type"]),
        decoder_shapes(config),
        families.decoder_ignored(config),
    )
    return config, _as_tree(flat, lazy)


def load_vision(
    directory: str | Path,
    *,
    select_layer: int = -2,
    select_feature: str = "patch",
    lazy: bool = False,
) -> tuple[VisionConfig, dict]:
    """(config, params) of a CLIP or SigLIP vision tower (a full CLIP/SigLIP checkpoint's
    text half is left out)."""
    hf = read_hf_config(directory)
    config = families.vision_config(hf, select_layer=select_layer, select_feature=select_feature)
    tensors = safetensors_io.read_checkpoint(directory)
    if "vision_config" in hf:  # full dual-encoder checkpoint
        tensors = {
            k[len(VISION_PREFIX) :]: v for k, v in tensors.items() if k.startswith(VISION_PREFIX)
        }
    flat = name_rules.import_tensors(
        tensors, families.vision_rules(), vision_shapes(config), families.vision_ignored(config)
    )
    return config, _as_tree(flat, lazy)


def projector_shapes(projector: str, vision_hidden: int, hidden: int) -> dict[str, tuple[int, ...]]:
    features = jnp.zeros((1, 1, vision_hidden), jnp.float32)
    init = lambda: Projector(projector, hidden).init(jax.random.key(0), features)
    return _shapes(jax.eval_shape(init)["params"])


def moe_llava_shapes(
    decoder: DecoderConfig, projector: str, vision_hidden: int
) -> dict[str, tuple[int, ...]]:
    shapes = {f"decoder/{k}": v for k, v in decoder_shapes(decoder).items()}
    projected = projector_shapes(projector, vision_hidden, decoder.hidden_size)
    shapes.update({f"projector/{k}": v for k, v in projected.items()})
    return shapes


def load_projector(
    path: str | Path, projector: str, vision_hidden: int, hidden: int, *, lazy: bool = False
) -> dict:
    """A projector-only file -> our projector params: a stage-1 release's `mm_projector.bin`
    (torch pickle; MoE-LLaVA's `model.mm_projector.image_spatial_proj.{0,2}.*`, Qwen v1's
    `transformer.…`, or LLaVA's `model.mm_projector.{0,2}.*`) or the same names in a
    `.safetensors` file; `projector` is its kind (the file does not say), from vision
    features of `vision_hidden` to the LLM's `hidden`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no projector file (config key model.projector_from)")
    read = safetensors_io.read_file if path.suffix == ".safetensors" else torch_pickle.read_file
    rules = [
        rule
        for prefix in families.PROJECTOR_FILE_PREFIXES
        for rule in families.projector_rules(projector, "", prefix)
    ]
    try:
        flat = name_rules.import_tensors(
            read(path), rules, projector_shapes(projector, vision_hidden, hidden)
        )
    except ValueError as error:
        raise ValueError(
            f"{path} (model.projector_from, model.projector={projector!r}): {error}"
        ) from error
    return _as_tree(flat, lazy)


def load_moe_llava(directory: str | Path, *, lazy: bool = False) -> tuple[DecoderConfig, str, dict]:
    """A released MoE-LLaVA checkpoint, stage 3 (`moe_llava_*`) or the dense stage 2
    (`llava_*`): (decoder config, with MoE for stage 3, projector kind, {"decoder": ...,
    "projector": ...}). The vision tower its stage-3 save may dump into the
    file (`model.image_tower.*`) is skipped, and said so on stderr: it is the frozen
    `mm_image_tower` (its config is not in the file); load it from that CLIP/SigLIP
    directory with `load_vision`."""
    hf = read_hf_config(directory)
    decoder, projector = families.moe_llava_config(hf)
    tensors = safetensors_io.read_checkpoint(directory)
    tower = families.moe_llava_tower_prefix(hf["model_type"])
    skipped = sorted(name for name in tensors if name.startswith(tower))
    if skipped:
        print(
            f"{directory}: {len(skipped)} vision-tower tensors ({tower}*) not imported: load the "
            f"tower {hf.get('mm_image_tower', '')!r} from its own directory (load_vision)",
            file=sys.stderr,
        )
    flat = name_rules.import_tensors(
        {name: value for name, value in tensors.items() if not name.startswith(tower)},
        families.moe_llava_rules(hf["model_type"], projector),
        moe_llava_shapes(decoder, projector, hf["mm_hidden_size"]),
        families.decoder_ignored(decoder),
    )
    return decoder, projector, _as_tree(flat, lazy)


def export_moe_llava(
    params: Mapping,
    model_type: str,
    projector: str,
    directory: str | Path,
    dtype=np.float32,
    decoder: DecoderConfig | None = None,
    **config_extra,
) -> None:
    """{"decoder", "projector"} params -> the MoE-LLaVA tensor layout (DeepSpeed expert names);
    with `decoder` (its config) also the release's config.json (`config_extra`: more keys,
    e.g. `mm_image_tower`), so that `load_moe_llava` reads the directory back."""
    rules = families.moe_llava_rules(model_type, projector)
    _export(name_rules.export_tensors(param_tree.flatten(params), rules), directory, dtype)
    if decoder is not None:
        mm_hidden_size = int(np.shape(params["projector"]["fc_0"]["kernel"])[0])
        hf = families.moe_llava_hf_config(
            decoder, model_type, projector, mm_hidden_size, **config_extra
        )
        (Path(directory) / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def _export(flat_tensors: Mapping[str, np.ndarray], directory: str | Path, dtype) -> None:
    safetensors_io.write_checkpoint(
        {k: np.asarray(v).astype(dtype) for k, v in flat_tensors.items()}, directory
    )


def export_decoder(
    params: Mapping, model_type: str, directory: str | Path, dtype=np.float32
) -> None:
    """Our decoder params -> `directory/model.safetensors` in the HF layout of `model_type`."""
    rules = families.decoder_rules(model_type)
    _export(name_rules.export_tensors(param_tree.flatten(params), rules), directory, dtype)


def export_vision(params: Mapping, directory: str | Path, dtype=np.float32) -> None:
    _export(
        name_rules.export_tensors(param_tree.flatten(params), families.vision_rules()),
        directory,
        dtype,
    )
