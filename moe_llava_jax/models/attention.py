"""Multi-head self-attention with grouped-query heads and (partial) rotary embeddings.

One module serves the ViT (bidirectional, no RoPE) and every decoder backbone
(causal, RoPE on the first `rotary_dim` channels of each head as in Phi-2/StableLM).

How the scores are computed is `AttentionKernel` (`model.attention`, same math):
- "xla": queries in chunks of `query_chunk` under `jax.checkpoint`, so one chunk's f32
  scores `[b, kv, (g chunk), keys]` exist at a time, in the forward and in the backward
  (recomputed there), instead of `[b, heads, T, T]` (StableLM-2 at 16 x 2,624 positions:
  14 GB per layer); the mask is built per chunk from slots and segment ids, never as a
  broadcast `[b, q, keys]` array. Any backend, KV-cache decoding, left-padded and packed
  batches.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash kernel
  of cuDNN: GPU, bf16/fp16, causal or bidirectional without segment ids (unpacked training).
- "splash": Pallas's splash (flash) attention kernel for TPU, under `shard_map` over the
  batch (and heads) the context mesh splits them on: scores live in VMEM blocks, fully
  masked blocks are skipped; segment ids (packed rows) but no cache (training). The
  sequence is padded to whole blocks, the padded positions given a segment of their own.
  Off TPU it runs interpreted (the CPU tests).
- "auto": cudnn on GPU with 16-bit compute where it applies (no segment ids, no cache),
  else xla. Not splash on TPU: compiled for a v5p-8 at the StableLM recipe (README, "At
  real size") it needed 1.3 GB more temporaries per chip than the chunked xla path, and
  its speed there is not measured (no TPU here).
Segment ids `segments` [b, seq] int (None: one sequence per row, nothing masked but
causality): a query attends to the keys of its own segment only. Packed rows number their
examples 1, 2, ... and their padding 0; a left-padded decoding batch is the one-example
case (pads 0, the prompt 1). Pads attend to pads, so no causal row is ever fully masked.
The platform is the mesh's devices' (`platform`, set by `build.StageModel`: an AOT compile
for TPU on a CPU host picks TPU's kernels), else the default backend's.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask,
)
from jax.sharding import PartitionSpec

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


IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
FUSED = ("cudnn", "splash")  # fused kernels: no cache; cudnn: no segment ids either


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """How attention is computed (module docstring); never which params exist."""

    implementation: str = "auto"  # an IMPLEMENTATIONS name
    query_chunk: int = 256  # xla: queries per chunk (0: all at once)
    platform: str = ""  # where the program runs ("": the default backend)

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"config key model.attention={self.implementation!r}: expected one of "
                f"{IMPLEMENTATIONS}"
            )
        if self.query_chunk < 0:
            raise ValueError(f"config key model.attention_chunk={self.query_chunk} must be >= 0")

    @property
    def resolved_platform(self) -> str:
        return self.platform or jax.default_backend()

    def choose(self, dtype: jnp.dtype, segmented: bool, decode: bool) -> str:
        """The kernel this call runs: "xla", "cudnn" or "splash" (the fused kernels take no
        cache; cudnn takes no segment ids)."""
        name = self.implementation
        applies = not (decode or (segmented and name != "splash"))
        if name in FUSED:
            if not applies:
                raise ValueError(
                    f"config key model.attention={name!r} takes no KV cache"
                    + ("" if name == "splash" else " and no segment ids (packed rows)")
                    + "; use 'auto' to fall back to 'xla' there"
                )
            if name == "splash" and self.resolved_platform == "gpu":
                raise ValueError(
                    "config key model.attention='splash' is TPU's kernel (interpreted on CPU "
                    "for tests); on GPU use 'cudnn' or 'auto'"
                )
            return name
        if name == "xla" or not applies:
            return "xla"
        if self.resolved_platform == "gpu" and jnp.dtype(dtype).itemsize == 2:
            return "cudnn"
        return "xla"


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    query_slots: jax.Array,
    key_slots: jax.Array,
    query_segments: jax.Array | None,
    key_segments: jax.Array | None,
    causal: bool,
    query_chunk: int,
) -> jax.Array:
    """q [b, kv, g, q, d], k / v [b, kv, s, d], query / key slots [q] / [s] (cache positions),
    query / key segments [b, q] / [b, s] or None -> out [b, kv, g, q, d]; `query_chunk`
    queries at a time."""
    b, kv, g, n, d = q.shape
    scale = 1.0 / jnp.sqrt(jnp.float32(d))

    def chunk_attention(q, query_slots, query_segments):  # [b, kv, g, c, d], [c], [b, c] | None
        scores = jnp.einsum("bkgqd,bksd->bkgqs", q, k).astype(jnp.float32) * scale
        mask = jnp.ones((1, 1, 1), bool)  # [b, c, s], broadcast
        if query_segments is not None:
            mask = query_segments[:, :, None] == key_segments[:, None, :]
        if causal:
            mask = mask & (key_slots[None, :] <= query_slots[:, None])[None]
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgqs,bksd->bkgqd", probs, v)

    if query_chunk <= 0 or n <= query_chunk:
        return chunk_attention(q, query_slots, query_segments)
    pad = -n % query_chunk
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    query_slots = jnp.pad(query_slots, (0, pad), constant_values=query_slots[-1])
    chunks = q.shape[3] // query_chunk
    q_chunks = jnp.moveaxis(q.reshape(b, kv, g, chunks, query_chunk, d), 3, 0)
    segment_chunks = None
    if query_segments is not None:
        query_segments = jnp.pad(query_segments, ((0, 0), (0, pad)), mode="edge")
        segment_chunks = jnp.moveaxis(query_segments.reshape(b, chunks, query_chunk), 1, 0)
    # The backward recomputes each chunk's scores instead of keeping all of them.
    out = jax.lax.map(
        lambda xs: jax.checkpoint(chunk_attention)(*xs),
        (q_chunks, query_slots.reshape(chunks, query_chunk), segment_chunks),
    )  # [chunks, b, kv, g, c, d]
    return jnp.moveaxis(out, 0, 3).reshape(b, kv, g, chunks * query_chunk, d)[:, :, :, :n]


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool,
                    implementation: str | None = "cudnn") -> jax.Array:
    """q [b, kv, g, q, d], k / v [b, kv, s, d] -> out [b, kv, g, q, d] by
    `jax.nn.dot_product_attention` (BTNH layout; GQA: query head h uses kv head h // g)."""
    b, kv, g, n, d = q.shape
    out = jax.nn.dot_product_attention(
        rearrange(q, "b k g q d -> b q (k g) d"),
        rearrange(k, "b k s d -> b s k d"),
        rearrange(v, "b k s d -> b s k d"),
        is_causal=causal,
        implementation=implementation,
    )
    return rearrange(out, "b q (k g) d -> b k g q d", k=kv)


SPLASH_BLOCKS = (512, 256, 128)  # block sizes tried, largest dividing the padded length


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segments: jax.Array | None,
    causal: bool,
    interpret: bool,
) -> jax.Array:
    """q [b, kv, g, n, d], k / v [b, kv, n, d], segments [b, n] or None -> out
    [b, kv, g, n, d] by Pallas's splash kernel (its MQA form per kv head: g query heads over
    one k, v), one example and kv head per kernel call (vmapped), each device on its own
    share of the batch and heads (`shard_map` over the axes the context mesh splits them
    on)."""
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = _dividing_axes(mesh, "batch", q.shape[0])
    head_axes = _dividing_axes(mesh, "heads", q.shape[1])
    if segments is None:
        segments = jnp.zeros(q.shape[:1] + q.shape[3:4], jnp.int32)
    run = functools.partial(_splash_local, causal=causal, interpret=interpret)
    if not (batch_axes or head_axes):
        return run(q, k, v, segments)
    spec = PartitionSpec(batch_axes or None, head_axes or None)
    return jax.shard_map(
        run,
        in_specs=(spec, spec, spec, PartitionSpec(batch_axes or None)),
        out_specs=spec,
        check_vma=False,
    )(q, k, v, segments)


def _dividing_axes(mesh: jax.sharding.AbstractMesh, logical: str, size: int) -> tuple[str, ...]:
    """The mesh axes the rules in context put `logical` on, if they split `size` evenly
    (else none: e.g. init's one-example batch on a 4-device mesh stays whole)."""
    if mesh.empty:
        return ()
    axes = layers.mesh_axes_in_context(logical, mesh)
    return axes if size % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def _splash_local(
    q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, causal: bool, interpret: bool
):
    """`splash_attention` on this device's arrays: the sequence padded to whole 128-blocks,
    the padded positions in segment -1 (no real segment's), where they attend to each other
    only and stay finite (they are cut off after)."""
    b, kv, g, n, d = q.shape
    length = -(-n // 128) * 128
    block = next(size for size in SPLASH_BLOCKS if length % size == 0)
    pad = ((0, 0),) * 2 + ((0, length - n), (0, 0))
    q = jnp.pad(q * jnp.asarray(1.0 / d**0.5, q.dtype), ((0, 0),) + pad)  # splash: no scale
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    head_mask = splash_mask.CausalMask((length, length)) if causal else splash_mask.FullMask(
        (length, length)
    )
    kernel = splash_kernel.make_splash_mqa_single_device(
        splash_mask.MultiHeadMask([head_mask] * g),
        block_sizes=splash_kernel.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block,
            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
            block_q_dq=block, block_kv_dq=block,
        ),
        interpret=interpret,
    )
    segments = jnp.pad(segments.astype(jnp.int32), ((0, 0), (0, length - n)), constant_values=-1)

    def per_example(q, k, v, segments):  # [kv, g, T, d], [kv, T, d], [T]
        ids = splash_kernel.SegmentIds(q=segments, kv=segments)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

    out = jax.vmap(per_example)(q, k, v, segments)
    return out[:, :, :, :n]


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
    kernel: AttentionKernel = AttentionKernel()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [batch, seq, embed]
        positions: jax.Array | None = None,  # [batch, seq]
        segments: jax.Array | None = None,  # [batch, seq] int: segment ids (module docstring)
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

        # Heads-major [b, kv head, g, q, d]: both products are batched matmuls over
        # (b, kv head). (With the batch dims inside, e.g. "bqkgd,bskd->bkgqs", XLA:CPU's
        # attention fwd+bwd took 2x as long.) The KV cache is kept in this layout, so a
        # decoding step does not transpose it.
        q = rearrange(q, "b q (k g) d -> b k g q d", k=self.num_kv_heads)
        k, v = (rearrange(a, "b s k d -> b k s d") for a in (k, v))
        seq = x.shape[1]
        query_slots = key_slots = jnp.arange(seq)
        kernel = self.kernel.choose(self.dtype, segments is not None, decode)
        query_segments = key_segments = segments
        if decode:
            if segments is None:
                segments = jnp.ones(x.shape[:2], jnp.int32)
            k, v, key_segments, query_slots = self._append_to_cache(k, v, segments)
            query_segments, key_slots = segments, jnp.arange(k.shape[2])
        if kernel == "cudnn":
            out = cudnn_attention(q, k, v, self.causal)
        elif kernel == "splash":
            out = splash_attention(
                q, k, v, segments, self.causal, interpret=self.kernel.resolved_platform != "tpu"
            )
        else:
            out = xla_attention(
                q, k, v, query_slots, key_slots, query_segments, key_segments, self.causal,
                self.kernel.query_chunk,
            )
        out = rearrange(out, "b k g q d -> b q (k g d)")
        return layers.dense(
            hidden, ("heads", "embed"), use_bias=self.out_bias, name="o_proj", dtype=self.dtype
        )(out)

    def _append_to_cache(self, k: jax.Array, v: jax.Array, segments: jax.Array):
        """Writes this call's keys/values at the cache's write index and returns the whole
        cache: k, v [b, kv, max_len, d], key segments [b, max_len], and the query slots [seq]
        (k, v come in as [b, kv, seq, d]).

        The cache's length is fixed by the input length at `init` (decoding's max length);
        slots not yet written are in segment 0 (the pads'), which a prompt's and a decoded
        token's queries (segment 1) never attend, and which lie after every pad (causal).
        """
        initializing = not self.has_variable("cache", "key")
        cached_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        cached_segments = self.variable("cache", "segments", jnp.zeros, segments.shape, jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        seq = k.shape[2]
        if initializing:
            return k, v, segments, jnp.arange(seq)
        start = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, 0, start, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, 0, start, 0))
        cached_segments.value = jax.lax.dynamic_update_slice(
            cached_segments.value, segments.astype(jnp.int32), (0, start)
        )
        index.value = start + seq
        return cached_k.value, cached_v.value, cached_segments.value, start + jnp.arange(seq)
