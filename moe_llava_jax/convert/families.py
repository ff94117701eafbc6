"""Hugging Face backbones: their config.json -> our configs, and their tensor names.

Decoders: LLaMA/Vicuna (`llama`), Qwen1.5/Qwen2 (`qwen2`), StableLM-2 (`stablelm`), Phi-2
(`phi`). Vision towers: CLIP (`clip_vision_model`, or a full `clip` checkpoint) and SigLIP
(`siglip_vision_model`, or `siglip`). A backbone is a config of our one decoder / tower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from moe_llava_jax.convert.name_rules import Rule
from moe_llava_jax.models.decoder import DecoderConfig
from moe_llava_jax.models.moe import MoEConfig
from moe_llava_jax.models.projector import projector_depth
from moe_llava_jax.models.vision import VisionConfig

DECODER_TYPES = ("llama", "qwen2", "stablelm", "phi")
VISION_TYPES = {
    "clip_vision_model": "clip",
    "clip": "clip",
    "siglip_vision_model": "siglip",
    "siglip": "siglip",
}
ACTIVATIONS = {
    "silu": "silu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
}


def _activation(hf: Mapping) -> str:
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json hidden_act={act!r} is not supported")
    return ACTIVATIONS[act]


def _rope(hf: Mapping) -> tuple[float, float]:
    """(theta, partial rotary factor) from old (top-level) or new (`rope_parameters`) keys."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if params.get("rope_type", "default") != "default" or scaling:
        raise ValueError(f"config.json rope scaling {scaling or params} is not supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return float(theta), float(partial)


def _reject(hf: Mapping, *keys: str) -> None:
    for key in keys:
        if hf.get(key):
            raise ValueError(f"config.json {key}={hf[key]!r} is not supported")


def decoder_config(hf: Mapping) -> DecoderConfig:
    """Our DecoderConfig for a Hugging Face causal-LM config.json (dense, no MoE)."""
    model_type = hf.get("model_type")
    if model_type not in DECODER_TYPES:
        raise ValueError(f"config.json model_type={model_type!r}: expected one of {DECODER_TYPES}")
    theta, partial = _rope(hf)
    common = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or 0,
        intermediate_size=hf["intermediate_size"],
        activation=_activation(hf),
        rope_theta=theta,
        partial_rotary_factor=partial,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if model_type in ("llama", "qwen2"):
        bias = bool(hf.get("attention_bias", False))
        return DecoderConfig(
            **common,
            norm="rmsnorm",
            norm_eps=hf["rms_norm_eps"],
            gated_mlp=True,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qkv_bias=model_type == "qwen2" or bias,
            out_bias=bias,
        )
    if model_type == "stablelm":
        _reject(hf, "qk_layernorm", "use_parallel_residual")
        return DecoderConfig(
            **common,
            norm="layernorm",
            norm_eps=hf["layer_norm_eps"],
            gated_mlp=True,
            qkv_bias=bool(hf.get("use_qkv_bias", False)),
        )
    _reject(hf, "qk_layernorm")  # phi
    return DecoderConfig(
        **common,
        norm="layernorm",
        norm_eps=hf["layer_norm_eps"],
        gated_mlp=False,
        mlp_bias=True,
        qkv_bias=True,
        out_bias=True,
        parallel_block=True,
        lm_head_bias=True,
    )


def _linear(ours: str, hf: str) -> list[Rule]:
    return [(f"{ours}/kernel", f"{hf}.weight", "linear"), (f"{ours}/bias", f"{hf}.bias", "copy")]


def _norm(ours: str, hf: str) -> list[Rule]:
    return [(f"{ours}/scale", f"{hf}.weight", "copy"), (f"{ours}/bias", f"{hf}.bias", "copy")]


def _mlp_names(model_type: str) -> tuple[tuple[str, str], ...]:
    """(our FFN param, HF module) pairs: Phi's fc1/fc2, or the gated gate/up/down triple."""
    if model_type == "phi":
        return (("wi", "fc1"), ("wo", "fc2"))
    return (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj"))


def decoder_rules(model_type: str) -> list[Rule]:
    """Rules for our `decoder/...` subtree (paths relative to it)."""
    phi = model_type == "phi"
    layer = "model.layers.{i}"
    rules = [("embed_tokens/embedding", "model.embed_tokens.weight", "copy")]
    for ours, hf in (
        ("q_proj", "q_proj"),
        ("k_proj", "k_proj"),
        ("v_proj", "v_proj"),
        ("o_proj", "dense" if phi else "o_proj"),
    ):
        rules += _linear(f"layers_{{i}}/attn/{ours}", f"{layer}.self_attn.{hf}")
    rules += _norm("layers_{i}/input_norm", f"{layer}.input_layernorm")
    rules += _norm("layers_{i}/post_attn_norm", f"{layer}.post_attention_layernorm")
    mlp = (
        (("wi", "fc1"), ("wo", "fc2"))
        if phi
        else (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj"))
    )
    for ours, hf in mlp:
        rules += _linear(f"layers_{{i}}/mlp/{ours}", f"{layer}.mlp.{hf}")
    rules += _norm("final_norm", "model.final_layernorm" if phi else "model.norm")
    rules += _linear("lm_head", "lm_head")
    return rules


def decoder_ignored(config: DecoderConfig) -> Callable[[str], bool]:
    """Tensors a checkpoint may carry that the model rebuilds or shares."""

    def ignored(name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq") or (
            config.tie_embeddings and name == "lm_head.weight"
        )

    return ignored


def vision_family(hf: Mapping) -> tuple[str, Mapping]:
    """('clip' | 'siglip', the vision part of the config.json)."""
    model_type = hf.get("model_type")
    if model_type not in VISION_TYPES:
        raise ValueError(
            f"config.json model_type={model_type!r}: expected one of {sorted(VISION_TYPES)}"
        )
    return VISION_TYPES[model_type], hf.get("vision_config", hf)


def vision_config(
    hf: Mapping, *, select_layer: int = -2, select_feature: str = "patch"
) -> VisionConfig:
    family, cfg = vision_family(hf)
    clip = family == "clip"
    return VisionConfig(
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        activation=_activation(cfg),
        norm_eps=cfg.get("layer_norm_eps", 1e-5),
        class_token=clip,
        pre_norm=clip,
        patch_bias=not clip,
        select_layer=select_layer,
        select_feature=select_feature,
    )


def vision_rules() -> list[Rule]:
    """Rules for our `vision/...` subtree; CLIP and SigLIP share names where both have them."""
    layer = "encoder.layers.{i}"
    rules = [
        ("patch_embed/kernel", "embeddings.patch_embedding.weight", "patch_conv"),
        ("patch_embed/bias", "embeddings.patch_embedding.bias", "copy"),
        ("class_embedding", "embeddings.class_embedding", "copy"),
        ("position_embedding", "embeddings.position_embedding.weight", "copy"),
    ]
    rules += _norm("pre_norm", "pre_layrnorm")  # sic: CLIP's spelling
    rules += _norm("layers_{i}/norm1", f"{layer}.layer_norm1")
    rules += _norm("layers_{i}/norm2", f"{layer}.layer_norm2")
    for ours, hf in (
        ("q_proj", "q_proj"),
        ("k_proj", "k_proj"),
        ("v_proj", "v_proj"),
        ("o_proj", "out_proj"),
    ):
        rules += _linear(f"layers_{{i}}/attn/{ours}", f"{layer}.self_attn.{hf}")
    rules += _linear("layers_{i}/mlp/wi", f"{layer}.mlp.fc1")
    rules += _linear("layers_{i}/mlp/wo", f"{layer}.mlp.fc2")
    return rules


def vision_ignored(config: VisionConfig) -> Callable[[str], bool]:
    """LLaVA reads layer `select_layer` without the post-LN: later layers, the post-LN and
    SigLIP's pooling head are never run, so they are not imported."""

    def ignored(name: str) -> bool:
        if name.startswith(("post_layernorm.", "head.")):
            return True
        parts = name.split(".")
        return name.startswith("encoder.layers.") and int(parts[2]) >= config.num_blocks_to_run

    return ignored


# Released MoE-LLaVA checkpoints (PyTorch + DeepSpeed MoE). The Qwen (v1) variant uses a
# fused-qkv layout this converter does not read.
MOE_LLAVA_TYPES = {"moe_llava_phi": "phi", "moe_llava_stablelm": "stablelm"}
MOE_PREFIX = "model.layers.{i}.mlp.deepspeed_moe"


def moe_llava_config(hf: Mapping) -> tuple[DecoderConfig, str]:
    """(decoder config with its MoE settings, projector kind) of a MoE-LLaVA config.json."""
    model_type = hf.get("model_type")
    if model_type not in MOE_LLAVA_TYPES:
        raise ValueError(
            f"config.json model_type={model_type!r}: expected one of {sorted(MOE_LLAVA_TYPES)}"
        )
    base = MOE_LLAVA_TYPES[model_type]
    moe = hf.get("moe")
    if not moe:
        raise ValueError("config.json has no 'moe' section: not a MoE-LLaVA stage-3 checkpoint")
    _reject(moe, "use_residual")
    num_experts = set(moe["num_experts"])
    if len(num_experts) != 1:
        raise ValueError(f"config.json moe.num_experts={moe['num_experts']}: layers differ")
    moe_cfg = MoEConfig(
        num_experts=num_experts.pop(),
        top_k=moe["top_k_experts"],
        capacity_factor=moe["capacity_factor"],
        eval_capacity_factor=moe["eval_capacity_factor"],
        min_capacity=moe["min_capacity"],
        layers=",".join(str(i) for i in moe["moe_layers_idx"]),
    )
    decoder = decoder_config({**hf, "model_type": base})
    # The released Phi variant's lm_head has no bias (unlike transformers' PhiForCausalLM).
    decoder = dataclasses.replace(decoder, moe=moe_cfg, lm_head_bias=False)
    return decoder, hf.get("mm_projector_type", "mlp2x_gelu")


def moe_llava_rules(model_type: str, projector: str) -> list[Rule]:
    """Rules for our whole param tree minus the vision tower (which the checkpoint omits)."""
    base = MOE_LLAVA_TYPES[model_type]
    rules = [(f"decoder/{ours}", hf, t) for ours, hf, t in decoder_rules(base)]
    rules.append(("decoder/layers_{i}/moe/router/kernel", f"{MOE_PREFIX}.gate.wg.weight", "linear"))
    for ours, hf in _mlp_names(base):
        rules += _linear(
            f"decoder/layers_{{i}}/moe/experts/{ours}",
            f"{MOE_PREFIX}.experts.deepspeed_experts.{{k}}.{hf}",
        )
    for j in range(projector_depth(projector)):  # nn.Sequential: Linear, GELU, Linear, ...
        rules += _linear(f"projector/fc_{j}", f"model.mm_projector.image_spatial_proj.{2 * j}")
    return rules
