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

DECODER_TYPES = ("llama", "qwen2", "stablelm", "phi", "qwen")  # "qwen": Qwen v1 (remote code)
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


# Rotary fraction when config.json names none: transformers' config defaults per family.
PARTIAL_ROTARY_DEFAULTS = {"stablelm": 0.25, "phi": 0.5}


def _first(hf: Mapping, keys: tuple[str, ...], default):
    """The value of the first of `keys` that config.json has (older releases name some
    settings otherwise: StableLMEpoch's `norm_eps`, `rope_pct`), else `default`."""
    return next((hf[key] for key in keys if key in hf), default)


def _rope(hf: Mapping) -> tuple[float, float]:
    """(theta, partial rotary factor) from old (top-level) or new (`rope_parameters`) keys."""
    params = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        raise ValueError(f"config.json rope_scaling={hf['rope_scaling']!r} is not supported")
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"config.json rope_parameters={params!r}: only default RoPE is supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    default = PARTIAL_ROTARY_DEFAULTS.get(hf["model_type"], 1.0)
    partial = params.get(
        "partial_rotary_factor", _first(hf, ("partial_rotary_factor", "rope_pct"), default)
    )
    return float(theta), float(partial)


def _reject(hf: Mapping, *keys: str) -> None:
    for key in keys:
        if hf.get(key):
            raise ValueError(f"config.json {key}={hf[key]!r} is not supported")


# Dropout config keys of the families other than Phi's resid_pdrop (`residual_dropout`):
# not implemented, so a non-zero one is refused (every supported release has them at 0).
UNSUPPORTED_DROPOUT_KEYS = (
    "attention_dropout",
    "attn_pdrop",
    "embd_pdrop",
    "hidden_dropout",
    "attn_dropout_prob",
    "emb_dropout_prob",
)


def decoder_config(hf: Mapping) -> DecoderConfig:
    """Our DecoderConfig for a Hugging Face causal-LM config.json (dense, no MoE)."""
    model_type = hf.get("model_type")
    if model_type not in DECODER_TYPES:
        raise ValueError(f"config.json model_type={model_type!r}: expected one of {DECODER_TYPES}")
    _reject(hf, *UNSUPPORTED_DROPOUT_KEYS)
    if model_type == "qwen":
        return _qwen_v1_config(hf)
    # Sliding-window attention is not implemented: full attention would differ past the window.
    if model_type == "qwen2":
        _reject(hf, "use_sliding_window")
    else:
        _reject(hf, "sliding_window")
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
            norm_eps=_first(hf, ("layer_norm_eps", "norm_eps"), 1e-5),
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
        residual_dropout=float(hf.get("resid_pdrop", 0.0)),
    )


def _qwen_v1_config(hf: Mapping) -> DecoderConfig:
    """Qwen (v1) config.json keys. Its `intermediate_size` counts both SwiGLU halves. Dynamic
    NTK and log-n attention scaling only act past `seq_length` tokens and are not applied."""
    no_bias = bool(hf.get("no_bias", True))
    return DecoderConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_attention_heads"],
        head_dim=hf.get("kv_channels") or 0,
        intermediate_size=hf["intermediate_size"] // 2,
        norm="rmsnorm",
        norm_eps=hf["layer_norm_epsilon"],
        activation="silu",
        gated_mlp=True,
        mlp_bias=not no_bias,
        qkv_bias=True,  # c_attn always has a bias
        out_bias=not no_bias,
        rope_theta=float(hf.get("rotary_emb_base", 10000.0)),
        partial_rotary_factor=float(hf.get("rotary_pct", 1.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a decoder family keeps its tensors (`{i}`: layer index)."""

    embed: str
    layer: str
    attn: str
    qkv: tuple[str, str, str] | str  # separate projections, or one fused [q; k; v] module
    attn_out: str
    norm1: str
    norm2: str
    final_norm: str

    @property
    def moe(self) -> str:
        return f"{self.layer}.mlp.deepspeed_moe"


_HF_LAYOUT = _Layout(
    embed="model.embed_tokens",
    layer="model.layers.{i}",
    attn="self_attn",
    qkv=("q_proj", "k_proj", "v_proj"),
    attn_out="o_proj",
    norm1="input_layernorm",
    norm2="post_attention_layernorm",
    final_norm="model.norm",
)
LAYOUTS = {
    "llama": _HF_LAYOUT,
    "qwen2": _HF_LAYOUT,
    "stablelm": _HF_LAYOUT,
    "phi": dataclasses.replace(_HF_LAYOUT, attn_out="dense", final_norm="model.final_layernorm"),
    "qwen": _Layout(
        embed="transformer.wte",
        layer="transformer.h.{i}",
        attn="attn",
        qkv="c_attn",
        attn_out="c_proj",
        norm1="ln_1",
        norm2="ln_2",
        final_norm="transformer.ln_f",
    ),
}


def _linear(ours: str, hf: str) -> list[Rule]:
    return [(f"{ours}/kernel", f"{hf}.weight", "linear"), (f"{ours}/bias", f"{hf}.bias", "copy")]


def _norm(ours: str, hf: str) -> list[Rule]:
    return [(f"{ours}/scale", f"{hf}.weight", "copy"), (f"{ours}/bias", f"{hf}.bias", "copy")]


def _mlp_names(model_type: str) -> tuple[tuple[str, str], ...]:
    """(our FFN param, HF module) pairs. Qwen v1 computes `c_proj(w1(x) * silu(w2(x)))`."""
    if model_type == "phi":
        return (("wi", "fc1"), ("wo", "fc2"))
    if model_type == "qwen":
        return (("wi_gate", "w2"), ("wi_up", "w1"), ("wo", "c_proj"))
    return (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj"))


def decoder_rules(model_type: str) -> list[Rule]:
    """Rules for our `decoder/...` subtree (paths relative to it)."""
    layout = LAYOUTS[model_type]
    attn = f"{layout.layer}.{layout.attn}"
    rules = [("embed_tokens/embedding", f"{layout.embed}.weight", "copy")]
    for j, ours in enumerate(("q_proj", "k_proj", "v_proj")):
        if isinstance(layout.qkv, str):  # fused: part j of 3 along the output axis
            rules += [
                (
                    f"layers_{{i}}/attn/{ours}/kernel",
                    f"{attn}.{layout.qkv}.weight",
                    f"linear@{j}/3",
                ),
                (f"layers_{{i}}/attn/{ours}/bias", f"{attn}.{layout.qkv}.bias", f"copy@{j}/3"),
            ]
        else:
            rules += _linear(f"layers_{{i}}/attn/{ours}", f"{attn}.{layout.qkv[j]}")
    rules += _linear("layers_{i}/attn/o_proj", f"{attn}.{layout.attn_out}")
    rules += _norm("layers_{i}/input_norm", f"{layout.layer}.{layout.norm1}")
    rules += _norm("layers_{i}/post_attn_norm", f"{layout.layer}.{layout.norm2}")
    for ours, hf in _mlp_names(model_type):
        rules += _linear(f"layers_{{i}}/mlp/{ours}", f"{layout.layer}.mlp.{hf}")
    rules += _norm("final_norm", layout.final_norm)
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


# Released MoE-LLaVA checkpoints (PyTorch + DeepSpeed MoE): the base LLM's layout, experts
# under `…mlp.deepspeed_moe.experts.deepspeed_experts.{k}`, the router `…deepspeed_moe.gate.wg`
# and the projector next to the LLM's embeddings (`model.` or, for Qwen v1, `transformer.`).
# The dense stage-2 releases (`llava_*`) have the same layout without experts.
MOE_LLAVA_TYPES = {
    "moe_llava_phi": "phi",
    "moe_llava_stablelm": "stablelm",
    "moe_llava_qwen": "qwen",
}
DENSE_LLAVA_TYPES = {"llava_phi": "phi", "llava_stablelm": "stablelm", "llava_qwen": "qwen"}
RELEASE_TYPES = {**MOE_LLAVA_TYPES, **DENSE_LLAVA_TYPES}
# The MoEConfig fields a release's `moe` dict sets (the rest, e.g. dispatch, are ours).
RELEASE_MOE_FIELDS = (
    "num_experts",
    "top_k",
    "capacity_factor",
    "eval_capacity_factor",
    "min_capacity",
    "layers",
)


def moe_llava_config(hf: Mapping) -> tuple[DecoderConfig, str]:
    """(decoder config, with its MoE settings for a stage-3 release, projector kind) of a
    MoE-LLaVA config.json (`moe_llava_*`, or a dense stage-2 `llava_*`)."""
    model_type = hf.get("model_type")
    if model_type not in RELEASE_TYPES:
        raise ValueError(
            f"config.json model_type={model_type!r}: expected one of {sorted(RELEASE_TYPES)}"
        )
    moe_cfg = None
    if model_type in MOE_LLAVA_TYPES:
        moe = hf.get("moe")
        if not moe:
            raise ValueError(
                f"config.json model_type={model_type!r} has no 'moe' section: not a MoE-LLaVA "
                "stage-3 checkpoint"
            )
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
    decoder = decoder_config({**hf, "model_type": RELEASE_TYPES[model_type]})
    # LLaVA-Phi drops Phi-2's lm_head bias from stage 1 on (transformers' PhiForCausalLM has it).
    decoder = dataclasses.replace(decoder, moe=moe_cfg, lm_head_bias=False)
    projector = _first(hf, PROJECTOR_KEYS, None)
    if projector is None:
        raise ValueError(f"config.json names no projector kind (keys {PROJECTOR_KEYS})")
    return decoder, projector


# config.json keys of the releases' base LLMs where they differ (StableLMEpoch, Qwen v1):
# (norm eps, rotary fraction).
_RELEASE_KEYS = {
    "stablelm": ("norm_eps", "rope_pct"),
    "phi": ("layer_norm_eps", "partial_rotary_factor"),
    "qwen": ("layer_norm_epsilon", "rotary_pct"),
}
_ACTIVATION_NAMES = {"silu": "silu", "gelu_new": "gelu_new", "gelu": "gelu"}


def moe_llava_hf_config(
    decoder: DecoderConfig, model_type: str, projector: str, mm_hidden_size: int, **extra
) -> dict:
    """The config.json of a release (`moe_llava_*` / `llava_*`) with the original's key
    names for `decoder` (its MoE settings as the `moe` dict) and the projector; `extra`
    keys (e.g. `mm_image_tower`) are written as given. `moe_llava_config` reads it back."""
    if model_type not in RELEASE_TYPES:
        raise ValueError(f"model_type={model_type!r}: expected one of {sorted(RELEASE_TYPES)}")
    base = RELEASE_TYPES[model_type]
    eps_key, rotary_key = _RELEASE_KEYS[base]
    hf = {
        "model_type": model_type,
        "vocab_size": decoder.vocab_size,
        "hidden_size": decoder.hidden_size,
        "num_hidden_layers": decoder.num_layers,
        "num_attention_heads": decoder.num_heads,
        "intermediate_size": decoder.intermediate_size,
        "hidden_act": _ACTIVATION_NAMES[decoder.activation],
        eps_key: decoder.norm_eps,
        rotary_key: decoder.partial_rotary_factor,
        "tie_word_embeddings": decoder.tie_embeddings,
        "image_projector_type": projector,
        "mm_hidden_size": mm_hidden_size,
    }
    if base == "qwen":  # Qwen v1 counts both SwiGLU halves, has fused biased qkv, no GQA
        hf.update(
            intermediate_size=2 * decoder.intermediate_size,
            kv_channels=decoder.resolved_head_dim,
            rotary_emb_base=decoder.rope_theta,
            no_bias=not decoder.mlp_bias,
        )
    else:
        hf.update(num_key_value_heads=decoder.num_kv_heads, rope_theta=decoder.rope_theta)
    if base == "stablelm":
        hf["use_qkv_bias"] = decoder.qkv_bias
    if base == "phi":
        hf["resid_pdrop"] = decoder.residual_dropout
    moe = decoder.moe
    if model_type in MOE_LLAVA_TYPES:
        if moe is None:
            raise ValueError(f"model_type={model_type!r} needs a decoder with MoE layers")
        layers = list(decoder.moe_layers)
        hf["moe"] = {
            "moe_enable": True,
            "moe_mode": "sparse" if layers == list(range(0, decoder.num_layers, 2)) else "custom",
            "moe_layers_idx": layers,
            "num_experts": [moe.num_experts] * len(layers),
            "top_k_experts": moe.top_k,
            "capacity_factor": moe.capacity_factor,
            "eval_capacity_factor": moe.eval_capacity_factor,
            "min_capacity": moe.min_capacity,
            "use_residual": False,
            "ep_size": 1,
        }
    elif moe is not None:
        raise ValueError(f"model_type={model_type!r} is a dense release; the decoder has MoE layers")
    return {**hf, **extra}


# MoE-LLaVA stores the projector kind as `image_projector_type`; LLaVA as `mm_projector_type`.
PROJECTOR_KEYS = ("image_projector_type", "mm_projector_type")


def moe_llava_tower_prefix(model_type: str) -> str:
    """Where a MoE-LLaVA stage-3 save keeps the vision tower it dumps with the rest
    (`model.image_tower.image_tower.vision_model.*`; Qwen v1 `transformer.…`)."""
    root = LAYOUTS[RELEASE_TYPES[model_type]].embed.split(".")[0]
    return f"{root}.image_tower."


def moe_llava_rules(model_type: str, projector: str) -> list[Rule]:
    """Rules for our whole param tree minus the vision tower (`moe_llava_tower_prefix`)."""
    base = RELEASE_TYPES[model_type]
    layout = LAYOUTS[base]
    rules = [(f"decoder/{ours}", hf, t) for ours, hf, t in decoder_rules(base)]
    if model_type in MOE_LLAVA_TYPES:
        router = f"{layout.moe}.gate.wg.weight"
        rules.append(("decoder/layers_{i}/moe/router/kernel", router, "linear"))
        for ours, hf in _mlp_names(base):
            rules += _linear(
                f"decoder/layers_{{i}}/moe/experts/{ours}",
                f"{layout.moe}.experts.deepspeed_experts.{{k}}.{hf}",
            )
    root = layout.embed.split(".")[0]  # "model" or "transformer"
    rules += projector_rules(projector, "projector/", f"{root}.mm_projector.image_spatial_proj.")
    return rules


def projector_rules(projector: str, ours: str, theirs: str) -> list[Rule]:
    """The projector's nn.Sequential (Linear, GELU, Linear, ...): our `{ours}fc_{j}` is
    their `{theirs}{2 j}`."""
    return [
        rule
        for j in range(projector_depth(projector))
        for rule in _linear(f"{ours}fc_{j}", f"{theirs}{2 * j}")
    ]


# Where projector-only files (a stage-1 release's mm_projector.bin) keep the projector:
# MoE-LLaVA (Qwen v1 under `transformer.`) and LLaVA (no `image_spatial_proj`).
PROJECTOR_FILE_PREFIXES = tuple(
    f"{root}.mm_projector.{inner}"
    for root in ("model", "transformer")
    for inner in ("image_spatial_proj.", "")
)
