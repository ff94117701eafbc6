"""Attention kernels give the same outputs and gradients: query-chunked xla attention (any
chunk, causal or not, GQA, padding) = all queries at once; the cudnn path's layout
plumbing (BTNH, GQA head order) = the xla path, run here through jax's own XLA
implementation of `jax.nn.dot_product_attention` (cuDNN itself needs a GPU)."""

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
    with pytest.raises(ValueError, match="model.attention='splash'"):
        AttentionKernel("splash")
    with pytest.raises(ValueError, match="model.attention_chunk=-1"):
        AttentionKernel("xla", -1)
    with pytest.raises(ValueError, match="model.attention='cudnn' takes no padding mask"):
        AttentionKernel("cudnn").uses_cudnn(jnp.bfloat16, padded=True, decode=False)


def test_auto_picks_xla_off_gpu_and_for_padded_or_cached_attention():
    auto = AttentionKernel("auto")
    assert not auto.uses_cudnn(jnp.bfloat16, padded=True, decode=False)
    assert not auto.uses_cudnn(jnp.bfloat16, padded=False, decode=True)
    assert auto.uses_cudnn(jnp.bfloat16, False, False) == (jax.default_backend() == "gpu")
    assert not auto.uses_cudnn(jnp.float32, False, False)
