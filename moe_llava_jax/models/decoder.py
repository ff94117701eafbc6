"""Decoder-only LLM: one block stack, every backbone a config (never a fork).

Switches: norm (layernorm | rmsnorm), gated (SwiGLU) or plain GELU MLP, parallel attention+MLP
sharing one input norm (Phi-2), partial rotary (Phi-2, StableLM), qkv bias (Qwen), GQA, tied
embeddings. Layers listed by `moe.layers` get an `MoELayer` instead of the dense `MLP`.

Compute knobs (module attributes, not `DecoderConfig` fields: they change how the same
params are computed, never which params exist):
- `dtype`: the activations' and matmuls' dtype (e.g. bfloat16); params stay float32 (master
  weights, cast per use by the layers), norms reduce in float32, attention softmax, router
  and logits are float32.
- `remat`: what each block keeps for the backward pass (`REMAT_POLICIES`). "block" keeps only
  the block's input and recomputes the rest; "dots" also keeps the outputs of matmuls without
  batch dimensions (the weight projections) and recomputes the cheaper elementwise ops and
  attention scores. "unit" is "block" for the scanned unit as a whole (a dense and an MoE
  block in the paper's every-other-layer placement): one saved input per unit instead of one
  per block, for the price of holding a whole unit's intermediates while its backward runs.
  Param names and values are the same under every setting.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_llava_jax.models import layers, scan
from moe_llava_jax.models.attention import Attention, AttentionKernel
from moe_llava_jax.models.mlp import MLP, FFNConfig
from moe_llava_jax.models.moe import MoEConfig, MoELayer, moe_layer_indices

# `model.remat` -> `jax.checkpoint` policy of each decoder block (None: no remat). "unit"
# applies "block"'s to each scanned unit as a whole (module docstring).
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "unit": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_heads
    intermediate_size: int = 5632
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "silu"
    gated_mlp: bool = True
    mlp_bias: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    parallel_block: bool = False
    partial_rotary_factor: float = 1.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    # Dropout on the attention and FFN/MoE outputs before they join the residual stream, in
    # training only (the "dropout" rng stream): Phi-2's resid_pdrop, 0.1 in LLaVA-Phi.
    residual_dropout: float = 0.0
    moe: MoEConfig | None = None  # None: a dense model (stages 1-2)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.resolved_head_dim * self.partial_rotary_factor)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return () if self.moe is None else moe_layer_indices(self.moe.layers, self.num_layers)


class DecoderBlock(nn.Module):
    config: DecoderConfig
    use_moe: bool
    dtype: jnp.dtype = jnp.float32
    attention: AttentionKernel = AttentionKernel()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segments: jax.Array | None,
        deterministic: bool,
        decode: bool = False,
    ) -> tuple[jax.Array, dict | None]:
        cfg = self.config
        x = layers.batch_sharded(x)
        h = layers.norm(cfg.norm, cfg.norm_eps, name="input_norm", dtype=self.dtype)(x)
        attn = Attention(
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.resolved_head_dim,
            cfg.qkv_bias,
            cfg.out_bias,
            causal=True,
            rotary_dim=cfg.rotary_dim,
            rope_theta=cfg.rope_theta,
            dtype=self.dtype,
            kernel=self.attention,
            name="attn",
        )(h, positions, segments, decode)
        dropout = nn.Dropout(cfg.residual_dropout, deterministic=deterministic)
        attn = dropout(attn)
        if not cfg.parallel_block:
            x = x + attn
            h = layers.norm(cfg.norm, cfg.norm_eps, name="post_attn_norm", dtype=self.dtype)(x)
        ffn_cfg = FFNConfig(
            cfg.hidden_size, cfg.intermediate_size, cfg.activation, cfg.gated_mlp, cfg.mlp_bias
        )
        stats = None
        if self.use_moe:
            real = None if segments is None else segments > 0  # pads take no expert capacity
            ffn, stats = MoELayer(cfg.moe, ffn_cfg, self.dtype, name="moe")(h, deterministic, real)
        else:
            ffn = MLP(ffn_cfg, self.dtype, name="mlp")(h)
        ffn = dropout(ffn)
        x = x + attn + ffn if cfg.parallel_block else x + ffn
        return layers.batch_sharded(x), stats


class DecoderUnit(nn.Module):
    """The blocks of one scanned unit, applied in turn: (x, positions, segments,
    deterministic, decode) -> (x, the MoE blocks' statistics). `kinds[j]`: whether block j
    is MoE."""

    config: DecoderConfig
    kinds: tuple[bool, ...]
    dtype: jnp.dtype
    remat: str
    attention: AttentionKernel

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segments: jax.Array | None,
        deterministic: bool,
        decode: bool,
    ) -> tuple[jax.Array, tuple[dict | None, ...]]:
        # The unit is rematerialised as a whole under "unit" (`Decoder.setup`).
        block_remat = "none" if self.remat == "unit" else self.remat
        block = remat_block(block_remat, prevent_cse=False)  # scan already keeps CSE apart
        stats = []
        for j, use_moe in enumerate(self.kinds):
            x, s = block(self.config, use_moe, self.dtype, self.attention, name=f"block_{j}")(
                x, positions, segments, deterministic, decode
            )
            stats.append(s)
        return x, tuple(stats)


def remat_block(remat: str, prevent_cse: bool = True) -> type[nn.Module]:
    """`DecoderBlock`, rematerialised as `model.remat` says."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"config key model.remat={remat!r}: expected one of {tuple(REMAT_POLICIES)}")
    if remat == "none":
        return DecoderBlock
    return rematerialised(DecoderBlock, REMAT_POLICIES[remat], prevent_cse)


def rematerialised(module: type[nn.Module], policy, prevent_cse: bool) -> type[nn.Module]:
    """A block or unit (x, positions, segments, deterministic, decode) under `jax.checkpoint`;
    arguments 4, 5 (self = 0) are the Python bools `deterministic` and `decode`."""
    return nn.remat(module, policy=policy, static_argnums=(4, 5), prevent_cse=prevent_cse)


def in_layer_order(per_segment: list[tuple[list[int], dict]]) -> dict:
    """[(layer indices [n], stats with leading axis [n])] -> stats stacked over layers in
    layer order (scanned units return their blocks' statistics by member, not by layer)."""
    if not per_segment:
        return {}
    layers = np.concatenate([np.asarray(ids) for ids, _ in per_segment])
    order = np.argsort(layers)
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *(s for _, s in per_segment))
    return jax.tree.map(lambda x: x[order], stacked)


class Decoder(nn.Module):
    config: DecoderConfig
    dtype: jnp.dtype = jnp.float32  # compute dtype (module docstring)
    remat: str = "none"  # a REMAT_POLICIES name
    scan_layers: bool = False  # `nn.scan` over repeating blocks (`scan.py`); same math
    attention: AttentionKernel = AttentionKernel()  # how attention is computed; same math

    @property
    def plan(self) -> scan.Plan:
        cfg = self.config
        if not self.scan_layers:
            moe = set(cfg.moe_layers)
            return scan.looped(tuple(i in moe for i in range(cfg.num_layers)))
        placement = None if cfg.moe is None else cfg.moe.layers
        return scan.plan_decoder(cfg.num_layers, cfg.moe_layers, placement)

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            embedding_init=layers.logical_init(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        for segment in self.plan:
            if segment.scanned:
                unit = DecoderUnit
                if self.remat == "unit":  # scan already keeps CSE apart
                    unit = rematerialised(unit, REMAT_POLICIES["unit"], prevent_cse=False)
                unit = scan.scan_unit(unit, segment.repeats, num_broadcast_args=4)
                module = unit(cfg, segment.kinds, self.dtype, self.remat, self.attention)
            else:
                module = remat_block(self.remat)(
                    cfg, segment.kinds[0], self.dtype, self.attention
                )
            setattr(self, segment.name, module)  # named as the layouts of `scan.py` say
        self.final_norm = layers.norm(cfg.norm, cfg.norm_eps, dtype=self.dtype)
        if not cfg.tie_embeddings:
            self.lm_head = layers.dense(
                cfg.vocab_size, ("embed", "vocab"), use_bias=cfg.lm_head_bias, dtype=self.dtype
            )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """[batch, seq] -> [batch, seq, embed]; negative ids (image placeholders) embed row 0 and
        are overwritten by the caller."""
        return self.embed_tokens(jnp.maximum(input_ids, 0))

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segments: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        head: bool = True,
    ) -> tuple[jax.Array, dict]:
        """x: [batch, seq, embed] -> logits [batch, seq, vocab] (f32) and MoE statistics
        stacked over the MoE layers in layer order (`aux_loss`, `z_loss`, `router_entropy`,
        `dropped_fraction` [L_moe]; `expert_load` [L_moe, E]); empty dict for a dense model.
        `head=False`: the final-normed hidden states [batch, seq, embed] instead of logits,
        for a loss that applies `logits` to the positions it needs (`answer_loss.py`)."""
        per_segment = []
        for segment in self.plan:
            module = getattr(self, segment.name)
            x, stats = module(x, positions, segments, deterministic, decode)
            if not segment.scanned:  # one block: its stats as a stack of one layer
                stats = (jax.tree.map(lambda v: v[None], stats),)
            for member, member_stats in enumerate(stats):  # member j's, stacked over repeats
                if member_stats is not None:
                    ids = [segment.layer(r, member) for r in range(segment.repeats)]
                    per_segment.append((ids, member_stats))
        x = self.final_norm(x)
        return (self.logits(x) if head else x), in_layer_order(per_segment)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states [..., embed] -> f32 logits [..., vocab]."""
        head = self.embed_tokens.attend if self.config.tie_embeddings else self.lm_head
        return head(hidden).astype(jnp.float32)
