"""Attention kernels give the same outputs and gradients: query-chunked xla attention (any
chunk, causal or not, GQA, padding) = all queries at once; the cudnn path's layout
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
    valid = jnp.arange(T)[None, :] >= jnp.array([[0], [3]])  # row 1 left-padded by 3

    def run(query_chunk):
        def loss(q, k, v):
            out = attention.xla_attention(q, k, v, slots, slots, valid, causal, query_chunk)
            return jnp.sum(out * jnp.cos(out)), out

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, ref), ref_grads = run(0)
    (_, out), grads = run(chunk)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_the_cudnn_layout_equals_the_xla_path(causal):
    q, k, v = qkv(1)
    slots = jnp.arange(T)
    ref = attention.xla_attention(q, k, v, slots, slots, jnp.ones((B, T), bool), causal, 0)
    out = attention.cudnn_attention(q, k, v, causal, implementation="xla")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal,length", [(True, 13), (False, 13), (True, 256)])
def test_the_splash_kernel_equals_the_xla_path_in_outputs_and_gradients(causal, length):
    """Pallas's splash kernel, interpreted on CPU: padding to whole blocks (13 -> 128 with
    masked keys; 256 with none), GQA heads, its own backward kernels."""
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (B, KV, G, length, D))
    k, v = (jax.random.normal(key, (B, KV, length, D)) for key in keys[1:])
    slots = jnp.arange(length)
    valid = jnp.ones((B, length), bool)

    def run(kernel):
        def loss(q, k, v):
            out = kernel(q, k, v)
            return jnp.sum(out * jnp.cos(out)), out

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, ref), ref_grads = run(
        lambda q, k, v: attention.xla_attention(q, k, v, slots, slots, valid, causal, 0)
    )
    (_, out), grads = run(lambda q, k, v: attention.splash_attention(q, k, v, causal, True))
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
        with pytest.raises(ValueError, match=f"model.attention='{fused}' takes no padding mask"):
            AttentionKernel(fused).choose(jnp.bfloat16, padded=True, decode=False)
    with pytest.raises(ValueError, match="model.attention='splash' is TPU's kernel"):
        AttentionKernel("splash", platform="gpu").choose(jnp.bfloat16, False, False)


@pytest.mark.parametrize("platform", ["", "cpu", "gpu", "tpu"])
def test_auto_picks_by_platform_and_dtype_and_xla_for_padded_or_cached_attention(platform):
    auto = AttentionKernel("auto", platform=platform)
    resolved = platform or jax.default_backend()
    assert auto.choose(jnp.bfloat16, padded=True, decode=False) == "xla"
    assert auto.choose(jnp.bfloat16, padded=False, decode=True) == "xla"
    assert auto.choose(jnp.bfloat16, False, False) == ("cudnn" if resolved == "gpu" else "xla")
    assert auto.choose(jnp.float32, False, False) == "xla"
    if resolved != "gpu":  # an explicit choice is kept (interpreted off TPU)
        assert AttentionKernel("splash", platform=platform).choose(jnp.float32, False, False) == (
            "splash"
        )
