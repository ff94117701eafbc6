"""Backbone presets: our models built from them have exactly the parameter counts of the
published models (and of transformers' own classes built from the same config on the meta
device), so a wrong dimension or a wrong mapping cannot go unnoticed."""

import math

import pytest

from configs import models
from moe_llava_jax.convert import hf
from moe_llava_jax.models.decoder import DecoderConfig
from moe_llava_jax.models.vision import VisionConfig

PUBLISHED_PARAMS = {  # total parameters of the released checkpoints
    "phi2-2.7b": 2_779_683_840,
    "stablelm-2-1.6b": 1_644_515_328,
    "qwen1.5-1.8b": 1_836_828_672,
    "vicuna-7b": 6_738_415_616,
}


def count(shapes):
    return sum(math.prod(shape) for shape in shapes.values())


@pytest.mark.parametrize("name", sorted(models.LLMS))
def test_llm_preset_has_the_published_parameter_count(name):
    config = DecoderConfig(**models.decoder(name).to_dict())
    assert count(hf.decoder_shapes(config)) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(models.TOWERS))
def test_tower_preset_matches_transformers_parameter_count(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = dict(models.TOWERS[name])
    kind = {"clip_vision_model": "CLIP", "siglip_vision_model": "Siglip"}[
        hf_config.pop("model_type")
    ]
    with torch.device("meta"):
        reference = getattr(transformers, f"{kind}VisionModel")(
            getattr(transformers, f"{kind}VisionConfig")(**hf_config)
        )
    # Ours runs every layer (select_layer=-1) but has no post-LN and no SigLIP pooling head.
    unused = ("post_layernorm", "head.")
    expected = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith(unused))
    config = VisionConfig(**models.vision(name, select_layer=-1).to_dict())
    assert count(hf.vision_shapes(config)) == expected


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="phi2-2.7b"):
        models.decoder("phi-3")
