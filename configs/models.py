"""Backbone presets: the Hugging Face config.json values of the towers and LLMs MoE-LLaVA
uses, turned into our `model.vision` / `model.decoder` sections by the same mapping as
`--config.model.vision_from` / `--config.model.llm_from` (`moe_llava_jax.convert.families`).

    config.model.decoder = models.decoder("phi2-2.7b")
    config.model.vision = models.vision("clip-l-14-336")

Use a preset to build the real architecture without weights (benchmarks, sharding plans);
to start from the weights, point `model.llm_from` / `model.vision_from` at the directories.
"""

import dataclasses

import ml_collections

from moe_llava_jax.convert import families

LLMS = {
    "phi2-2.7b": {  # microsoft/phi-2
        "model_type": "phi",
        "vocab_size": 51200,
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "gelu_new",
        "layer_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.4,
        "tie_word_embeddings": False,
        "qk_layernorm": False,
        "resid_pdrop": 0.1,
    },
    "stablelm-2-1.6b": {  # stabilityai/stablelm-2-1_6b
        "model_type": "stablelm",
        "vocab_size": 100352,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "layer_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "use_qkv_bias": True,
        "use_parallel_residual": False,
        "qk_layernorm": False,
        "tie_word_embeddings": False,
    },
    "qwen1.5-1.8b": {  # Qwen/Qwen1.5-1.8B
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5504,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "vicuna-7b": {  # lmsys/vicuna-7b-v1.5
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
}

TOWERS = {
    "clip-l-14-336": {  # openai/clip-vit-large-patch14-336 (vision half)
        "model_type": "clip_vision_model",
        "image_size": 336,
        "patch_size": 14,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
    "siglip-so400m-14-384": {  # google/siglip-so400m-patch14-384 (vision half)
        "model_type": "siglip_vision_model",
        "image_size": 384,
        "patch_size": 14,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
}


def decoder(name: str) -> ml_collections.ConfigDict:
    """`model.decoder` section for an LLM preset (vocab_size included)."""
    if name not in LLMS:
        raise ValueError(f"unknown LLM preset {name!r}; known: {sorted(LLMS)}")
    fields = dataclasses.asdict(families.decoder_config(LLMS[name]))
    del fields["moe"]  # MoE settings live in `model.moe`
    return ml_collections.ConfigDict(fields)


def vision(name: str, select_layer: int = -2, select_feature: str = "patch"):
    """`model.vision` section for a tower preset."""
    if name not in TOWERS:
        raise ValueError(f"unknown vision preset {name!r}; known: {sorted(TOWERS)}")
    config = families.vision_config(
        TOWERS[name], select_layer=select_layer, select_feature=select_feature
    )
    return ml_collections.ConfigDict(dataclasses.asdict(config))
