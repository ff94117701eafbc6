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
        decode: bool = False,  # append k/v to the "cache" collection and attend over it
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

        # Heads-major, the g query heads of a kv head stacked along the query axis: both
        # products are plain batched matmuls over (b, kv head). (With the batch dims inside,
        # e.g. "bqkgd,bskd->bkgqs", XLA:CPU's attention fwd+bwd took 2x as long.) The KV
        # cache is kept in this layout, so a decoding step does not transpose it.
        groups = self.num_heads // self.num_kv_heads
        q = rearrange(q, "b q (k g) d -> b k (g q) d", k=self.num_kv_heads)
        k, v = (rearrange(a, "b s k d -> b k s d") for a in (k, v))
        seq = x.shape[1]
        query_slots = key_slots = jnp.arange(seq)
        if valid is None:
            valid = jnp.ones(x.shape[:2], bool)
        if decode:
            k, v, valid, query_slots = self._append_to_cache(k, v, valid)
            key_slots = jnp.arange(k.shape[2])
        scores = jnp.einsum("bkqd,bksd->bkqs", q, k).astype(jnp.float32)  # q: (g q)
        scores = scores / jnp.sqrt(jnp.float32(self.head_dim))
        mask = valid[:, None, :]  # [b, 1, keys]
        if self.causal:
            query_slots = jnp.tile(query_slots, groups)  # [(g q)]
            mask = mask & (key_slots[None, :] <= query_slots[:, None])[None]  # [b, (g q), keys]
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
        out = rearrange(out, "b k (g q) d -> b q (k g d)", g=groups)
        return layers.dense(
            hidden, ("heads", "embed"), use_bias=self.out_bias, name="o_proj", dtype=self.dtype
        )(out)

    def _append_to_cache(self, k: jax.Array, v: jax.Array, valid: jax.Array):
        """Writes this call's keys/values at the cache's write index and returns the whole
        cache: k, v [b, kv, max_len, d], key validity [b, max_len], and the query slots [seq]
        (k, v come in as [b, kv, seq, d]).

        The cache's length is fixed by the input length at `init` (decoding's max length);
        slots not yet written are invalid, so they are never attended.
        """
        initializing = not self.has_variable("cache", "key")
        cached_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        cached_valid = self.variable("cache", "valid", jnp.zeros, valid.shape, bool)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        seq = k.shape[2]
        if initializing:
            return k, v, valid, jnp.arange(seq)
        start = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, 0, start, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, 0, start, 0))
        cached_valid.value = jax.lax.dynamic_update_slice(cached_valid.value, valid, (0, start))
        index.value = start + seq
        return cached_k.value, cached_v.value, cached_valid.value, start + jnp.arange(seq)
