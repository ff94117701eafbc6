"""Small building blocks shared by the vision tower and the decoder.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so that
`moe_llava_jax.sharding` can map it to any mesh without the modules knowing the mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def logical_init(init: nn.initializers.Initializer, axes: Sequence[str | None]):
    """Wraps an initializer so the created param is boxed with its logical axis names.

    The box only names the axes (`rules=()`): unboxing it adds no sharding constraint from
    the rules in context. Params are placed by jit's shardings (`sharding.logical_shardings`),
    and `nn.unbox` of `eval_shape(init)` under a context mesh and rules would otherwise try
    to constrain the abstract values outside jit, which fails.
    """
    return nn.with_logical_partitioning(init, tuple(axes), rules=())


def mesh_axes_in_context(logical: str, mesh: jax.sharding.AbstractMesh) -> tuple[str, ...]:
    """The axes of `mesh` that the logical axis rules in context (`nn.logical_axis_rules`)
    map the logical axis `logical` to; () without rules."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.shape)


def batch_devices_in_context(mesh: jax.sharding.AbstractMesh) -> int:
    """How many ways the rules in context split the logical `batch` axis over `mesh`."""
    return math.prod(mesh.shape[a] for a in mesh_axes_in_context("batch", mesh))


def batch_sharded(x: jax.Array) -> jax.Array:
    """x [batch, ...] constrained to the mesh axes the rules in context give `batch`; as it
    is without a context mesh, or when the batch does not split over them (a decoding batch
    of 1 on 4 devices: GSPMD places it).

    Why: inside `nn.scan` the block is the body of an XLA while loop, and GSPMD does not carry
    the input batch's sharding into it: with the weights split over `fsdp` on the embed axis,
    it chose to replicate the residual stream, so every chip ran the whole global batch
    (StableLM-2 + CLIP-L, 64 examples on a v5p-8: `f32[64, 32, 2624, 2624]` attention scores
    per chip, 119 GB of temporaries). The blocks pin their input and output with this.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x.shape[0] % batch_devices_in_context(mesh):
        return x
    return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


class Dense(nn.Dense):
    """`nn.Dense` (same params) applied to its input flattened to [rows, in].

    XLA:CPU computes the kernel gradient of a dot whose input has several leading dims
    (x [b, t, in]: contracting b and t) about 4x slower than the same product written as
    one 2-D GEMM (measured with jax 0.10: a [32, 136, 128] x [128, 512] kernel gradient,
    12 ms vs 3 ms); reshaping a contiguous array is free on every backend.
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))  # [rows, out]
        return y.reshape(*inputs.shape[:-1], y.shape[-1])


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool,
    name: str | None = None,
    init_std: float = 0.02,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> Dense:
    """A `Dense` whose kernel [in, out] and bias [out] are annotated with logical axes."""
    return Dense(
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
