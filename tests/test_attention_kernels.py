"""Attention kernels give the same outputs and gradients: query-chunked xla attention (any
chunk, causal or not, GQA, segment ids) = all queries at once; a packed row = its segments
run alone; the cudnn path's layout
plumbing (BTNH, GQA head order) = the xla path, run here through jax's own XLA
implementation of `jax.nn.dot_product_attention` (cuDNN itself needs a GPU); Pallas's splash
kernel (TPU's), interpreted on CPU, = the xla path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_llava_jax.models import attention
from moe_llava_jax.models.attention import Attention, AttentionKernel

B, KV, G, T, D = 2, 2, 3, 13, 8
# Row 0 packs two examples (5 + 6 tokens) and 2 pads; row 1 is left-padded by 3.
SEGMENTS = jnp.array([[1] * 5 + [2] * 6 + [0] * 2, [0] * 3 + [1] * 10], jnp.int32)


def qkv(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, KV, G, T, D))
    k, v = (jax.random.normal(key, (B, KV, T, D)) for key in keys[1:])
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_chunked_xla_attention_equals_all_queries_at_once(causal, chunk):
    q, k, v = qkv()
    slots = jnp.arange(T)

    def run(query_chunk):
        def loss(q, k, v):
            out = attention.xla_attention(
                q, k, v, slots, slots, SEGMENTS, SEGMENTS, causal, query_chunk
            )
            return jnp.sum(out * jnp.cos(out)), out

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, ref), ref_grads = run(0)
    (_, out), grads = run(chunk)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_a_packed_row_attends_like_its_segments_alone(causal):
    """Row 0's two examples, each run as a row of its own, give the packed row's outputs
    (keys of the other segment and of the pads are never attended)."""
    q, k, v = qkv(5)
    slots = jnp.arange(T)
    packed = attention.xla_attention(q, k, v, slots, slots, SEGMENTS, SEGMENTS, causal, 4)
    for start, stop in ((0, 5), (5, 11)):
        piece = lambda a: a[:1, :, :, start:stop] if a.ndim == 5 else a[:1, :, start:stop]
        alone = attention.xla_attention(
            piece(q), piece(k), piece(v), jnp.arange(stop - start), jnp.arange(stop - start),
            None, None, causal, 0,
        )
        np.testing.assert_allclose(packed[:1, :, :, start:stop], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_the_cudnn_layout_equals_the_xla_path(causal):
    q, k, v = qkv(1)
    slots = jnp.arange(T)
    ref = attention.xla_attention(q, k, v, slots, slots, None, None, causal, 0)
    out = attention.cudnn_attention(q, k, v, causal, implementation="xla")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "causal,length,packed", [(True, 13, False), (False, 13, False), (True, 256, False),
                             (True, 13, True)]
)
def test_the_splash_kernel_equals_the_xla_path_in_outputs_and_gradients(causal, length, packed):
    """Pallas's splash kernel, interpreted on CPU: padding to whole blocks (13 -> 128 with
    masked keys; 256 with none), GQA heads, segment ids of packed rows, its own backward
    kernels."""
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (B, KV, G, length, D))
    k, v = (jax.random.normal(key, (B, KV, length, D)) for key in keys[1:])
    slots = jnp.arange(length)
    segments = SEGMENTS if packed else None

    def run(kernel):
        def loss(q, k, v):
            out = kernel(q, k, v)
            return jnp.sum(out * jnp.cos(out)), out

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, ref), ref_grads = run(
        lambda q, k, v: attention.xla_attention(
            q, k, v, slots, slots, segments, segments, causal, 0
        )
    )
    (_, out), grads = run(
        lambda q, k, v: attention.splash_attention(q, k, v, segments, causal, True)
    )
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_module_runs_splash_under_a_mesh_as_it_runs_xla():
    """Through the module, inside a mesh context (the kernel then runs under shard_map)."""
    from moe_llava_jax import sharding

    x = jax.random.normal(jax.random.key(4), (B, T, 32))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    mesh = sharding.make_mesh({"data": -1})
    outputs = []
    with sharding.mesh_context(mesh, sharding.DEFAULT_LOGICAL_AXIS_RULES):
        for kernel in (AttentionKernel("xla"), AttentionKernel("splash", platform="cpu")):
            module = Attention(8, 4, 4, True, False, causal=True, rotary_dim=2, kernel=kernel)
            params = module.init(jax.random.key(0), x, positions)
            outputs.append(jax.jit(module.apply)(params, x, positions))
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_the_module_gives_the_same_output_for_every_chunk():
    x = jax.random.normal(jax.random.key(2), (B, T, 32))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    outputs = []
    for chunk in (0, 4):
        module = Attention(4, 2, 8, True, False, causal=True, rotary_dim=4,
                           kernel=AttentionKernel("xla", chunk))
        params = module.init(jax.random.key(0), x, positions)
        outputs.append(module.apply(params, x, positions))
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_bad_kernel_settings_name_the_key():
    with pytest.raises(ValueError, match="model.attention='flash'"):
        AttentionKernel("flash")
    with pytest.raises(ValueError, match="model.attention_chunk=-1"):
        AttentionKernel("xla", -1)
    for fused in ("cudnn", "splash"):
        with pytest.raises(ValueError, match=f"model.attention='{fused}' takes no KV cache"):
            AttentionKernel(fused).choose(jnp.bfloat16, segmented=False, decode=True)
    with pytest.raises(ValueError, match="'cudnn' takes no KV cache and no segment ids"):
        AttentionKernel("cudnn").choose(jnp.bfloat16, segmented=True, decode=False)
    assert AttentionKernel("splash").choose(jnp.bfloat16, segmented=True, decode=False) == "splash"
    with pytest.raises(ValueError, match="model.attention='splash' is TPU's kernel"):
        AttentionKernel("splash", platform="gpu").choose(jnp.bfloat16, False, False)


@pytest.mark.parametrize("platform", ["", "cpu", "gpu", "tpu"])
def test_auto_picks_by_platform_and_dtype_and_xla_for_padded_or_cached_attention(platform):
    auto = AttentionKernel("auto", platform=platform)
    resolved = platform or jax.default_backend()
    assert auto.choose(jnp.bfloat16, segmented=True, decode=False) == "xla"
    assert auto.choose(jnp.bfloat16, segmented=False, decode=True) == "xla"
    assert auto.choose(jnp.bfloat16, False, False) == ("cudnn" if resolved == "gpu" else "xla")
    assert auto.choose(jnp.float32, False, False) == "xla"
    if resolved != "gpu":  # an explicit choice is kept (interpreted off TPU)
        assert AttentionKernel("splash", platform=platform).choose(jnp.float32, False, False) == (
            "splash"
        )
