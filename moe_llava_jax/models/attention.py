"""Multi-head self-attention with grouped-query heads and (partial) rotary embeddings.

One module serves the ViT (bidirectional, no RoPE) and every decoder backbone
(causal, RoPE on the first `rotary_dim` channels of each head as in Phi-2/StableLM).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from moe_llava_jax.models import layers


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] on the last axis (the Hugging Face / GPT-NeoX convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """Rotates the first `rotary_dim` channels of every head; the rest pass through.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] (int).
    """
    if rotary_dim == 0:
        return x
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, rotary_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, s, 1, rotary_dim]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rot32 = rot.astype(jnp.float32)
    rot = (rot32 * jnp.cos(angles) + rotate_half(rot32) * jnp.sin(angles)).astype(x.dtype)
    return jnp.concatenate([rot, rest], axis=-1)


class Attention(nn.Module):
    """Self-attention; `num_kv_heads < num_heads` gives GQA (each kv head serves a group)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool
    out_bias: bool
    causal: bool
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [batch, seq, embed]
        positions: jax.Array | None = None,  # [batch, seq]
        valid: jax.Array | None = None,  # [batch, seq] bool; False keys are never attended
    ) -> jax.Array:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        hidden = x.shape[-1]

        def project(heads: int, name: str) -> jax.Array:
            y = layers.dense(
                heads * self.head_dim,
                ("embed", "heads"),
                use_bias=self.qkv_bias,
                name=name,
                dtype=self.dtype,
            )(x)
            return rearrange(y, "b s (h d) -> b s h d", h=heads)

        q = project(self.num_heads, "q_proj")
        k = project(self.num_kv_heads, "k_proj")
        v = project(self.num_kv_heads, "v_proj")
        if self.rotary_dim:
            q = apply_rotary(q, positions, self.rotary_dim, self.rope_theta)
            k = apply_rotary(k, positions, self.rotary_dim, self.rope_theta)

        q = rearrange(q, "b s (k g) d -> b s k g d", k=self.num_kv_heads)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(self.head_dim))
        seq = x.shape[1]
        mask = jnp.ones((1, seq, seq), bool)
        if self.causal:
            mask = jnp.tril(mask)
        if valid is not None:
            mask = mask & valid[:, None, :]
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
        out = rearrange(out, "b q k g d -> b q (k g d)")
        return layers.dense(
            hidden, ("heads", "embed"), use_bias=self.out_bias, name="o_proj", dtype=self.dtype
        )(out)
