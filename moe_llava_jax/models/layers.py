"""Small building blocks shared by the vision tower and the decoder.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so that
`moe_llava_jax.sharding` can map it to any mesh without the modules knowing the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def logical_init(init: nn.initializers.Initializer, axes: Sequence[str | None]):
    """Wraps an initializer so the created param is boxed with its logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool,
    name: str | None = None,
    init_std: float = 0.02,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.Dense:
    """`nn.Dense` whose kernel [in, out] and bias [out] are annotated with logical axes."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=logical_init(nn.initializers.normal(init_std), axes),
        bias_init=logical_init(nn.initializers.zeros_init(), axes[1:]),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def norm(
    kind: str, eps: float, *, name: str | None = None, dtype: Dtype = jnp.float32
) -> nn.Module:
    """LayerNorm (CLIP, Phi, StableLM) or RMSNorm (LLaMA, Qwen) over the last axis."""
    scale_init = logical_init(nn.initializers.ones_init(), ("norm",))
    if kind == "layernorm":
        bias_init = logical_init(nn.initializers.zeros_init(), ("norm",))
        return nn.LayerNorm(
            epsilon=eps, scale_init=scale_init, bias_init=bias_init, dtype=dtype, name=name
        )
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=eps, scale_init=scale_init, dtype=dtype, name=name)
    raise ValueError(f"unknown norm kind {kind!r}: expected 'layernorm' or 'rmsnorm'")


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approx. (Phi, SigLIP)
    "quick_gelu": _quick_gelu,  # CLIP
    "silu": jax.nn.silu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
