"""Grouped matmul for dropless MoE: rows sorted by expert times their expert's kernel.

`grouped_matmul(x, kernels, group_sizes)`: the rows of x [m, a] are sorted by expert, the
first group_sizes[0] rows belong to expert 0, the next group_sizes[1] to expert 1, ...; each
row is multiplied by its expert's kernel [a, b]. Rows past sum(group_sizes) belong to no group
and give 0 (as `ragged_dot` defines): expert parallelism receives tokens into buffers sized
for the worst case, and only their first rows are real. Two implementations:

- "ragged_dot": `jax.lax.ragged_dot`, the op XLA lowers to a grouped GEMM on TPU. XLA:CPU
  lowers it to a masked dense product against all E kernels (~E x the FLOPs). On NVIDIA GPUs
  XLA uses a grouped GEMM only where its cuDNN/Triton ragged-dot lowering applies and
  otherwise expands to the same padded dense product: measure with `benchmarks.moe_layer`
  before relying on it there.
- "blocked" (the CPU default): each group's rows are padded to whole blocks of `block` rows,
  so every block belongs to one expert, and a scan multiplies block by block with that
  block's kernel; blocks past the last group's are skipped. The FLOPs are the real ones plus
  under one block of padding per group, and a step holds one kernel, never a per-block copy
  of the kernels ([num_blocks, a, b] would be gigabytes at LLM sizes). Differentiable: a
  custom VJP runs the backward with the same blocks (see `_blocked_bwd`).

Shapes are static under jit: the number of blocks is bounded by (m + E * (block - 1)) / block
whatever the group sizes are.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


IMPLEMENTATIONS = ("ragged_dot", "blocked")


def default_implementation() -> str:
    """The implementation `grouped_matmul` uses on the default backend."""
    return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"


def block_rows(rows: int, num_groups: int, block_size: int) -> int:
    """Rows per block: a quarter of a group's average rows (a power of 2, 8 to `block_size`),
    so that the padding (< one block per group) stays under a quarter of the rows.

    Fastest of 64..1024 for fwd+bwd on 2 CPU cores at every shape tried: (rows, a, b, E) =
    (4096, 256, 512, 4) -> 256, (4096, 256, 512, 16) -> 64, (8704, 128, 256, 4) -> 512.
    """
    fair = max(1, rows // (4 * num_groups))
    return max(8, min(block_size, 1 << (fair.bit_length() - 1)))


def grouped_matmul(
    x: jax.Array,
    kernels: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str | None = None,
    block_size: int = 512,
) -> jax.Array:
    """x [m, a] (rows sorted by group, sum(group_sizes) <= m) @ kernels [E, a, b] -> [m, b];
    rows past sum(group_sizes) give 0.

    `implementation`: one of IMPLEMENTATIONS, None for `default_implementation()`.
    `block_size`: the largest block of the "blocked" implementation (see `block_rows`).
    """
    implementation = implementation or default_implementation()
    group_sizes = group_sizes.astype(jnp.int32)
    if implementation == "ragged_dot":
        return jax.lax.ragged_dot(x, kernels, group_sizes)
    if implementation != "blocked":
        raise ValueError(f"grouped matmul {implementation!r}: expected one of {IMPLEMENTATIONS}")
    block = block_rows(x.shape[0], kernels.shape[0], block_size)
    # Under jax.shard_map the custom VJP must return cotangents typed like its inputs, so the
    # inputs first vary over each other's axes (adding zeros: free); autodiff then sums the
    # kernels' cotangent over the axes only the rows are split on.
    x, kernels = (
        x + _zeros_like_all(x.shape, x.dtype, kernels),
        kernels + _zeros_like_all(kernels.shape, kernels.dtype, x),
    )
    return _blocked(x, kernels, group_sizes, block)


class _Blocks(NamedTuple):
    """Where the rows of each group go when padded to whole blocks."""

    padded_row: (
        jax.Array
    )  # [m]: each row's position in the padded rows; past the end if in no group
    source: jax.Array  # [num_blocks * block]: the row each padded row reads; m for padding
    block_group: jax.Array  # [num_blocks]: the group (expert) of each block
    used: jax.Array  # [num_blocks] bool: false for the trailing blocks of padding only


def _blocks(group_sizes: jax.Array, rows: int, block: int) -> _Blocks:
    num_groups = group_sizes.shape[0]
    num_blocks = (rows + num_groups * (block - 1)) // block  # >= sum_e ceil(n_e / block)
    blocks = -(-group_sizes // block)  # [E]: blocks of each group
    block_end = jnp.cumsum(blocks)  # [E]
    group_start = jnp.cumsum(group_sizes) - group_sizes  # [E]: first row, unpadded
    shift = block * (block_end - blocks) - group_start  # [E]: padded start - unpadded start
    # Rows past the groups' total get group E: their padded position is out of range.
    row_group = jnp.repeat(
        jnp.arange(num_groups + 1),
        jnp.append(group_sizes, rows - group_sizes.sum()),
        total_repeat_length=rows,
    )
    shift = jnp.append(shift, num_blocks * block)
    padded_row = jnp.arange(rows) + shift[row_group]
    source = jnp.full((num_blocks * block,), rows).at[padded_row].set(jnp.arange(rows), mode="drop")
    block_index = jnp.arange(num_blocks)
    # Blocks past the last group's are never multiplied; clip their group to a valid index.
    block_group = jnp.searchsorted(block_end, block_index, side="right")
    return _Blocks(
        padded_row, source, jnp.minimum(block_group, num_groups - 1), block_index < block_end[-1]
    )


def _to_blocks(x: jax.Array, layout: _Blocks, block: int) -> jax.Array:
    """x [m, a] -> [num_blocks, block, a], padding rows 0 (a gather, as is its inverse)."""
    padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[layout.source]
    return padded.reshape(-1, block, x.shape[1])


def _from_blocks(y_blocks: jax.Array, layout: _Blocks) -> jax.Array:
    """[num_blocks, block, b] -> the rows' outputs [m, b] (0 for rows in no group)."""
    rows = y_blocks.reshape(-1, y_blocks.shape[2])
    return rows.at[layout.padded_row].get(mode="fill", fill_value=0)


def _zeros_like_all(shape: tuple[int, ...], dtype: jnp.dtype, *like: jax.Array) -> jax.Array:
    """Zeros that vary over every `jax.shard_map` axis one of `like` varies over: a `cond`'s
    branches and a scan's carry must agree on it (outside shard_map: plain zeros)."""
    zeros = [jnp.zeros_like(a, shape=shape, dtype=dtype) for a in like]  # zeros_like keeps it
    return functools.reduce(jnp.add, zeros)


def _block_products(x_blocks: jax.Array, kernels: jax.Array, layout: _Blocks) -> jax.Array:
    """x_blocks [num_blocks, block, a] @ their groups' kernels [E, a, b], block by block."""
    shape = (x_blocks.shape[1], kernels.shape[2])
    zeros = _zeros_like_all(shape, jnp.result_type(x_blocks, kernels), x_blocks, kernels)

    def product(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        x_block, group, used = args  # [block, a], [], []
        kernel = jax.lax.dynamic_index_in_dim(kernels, group, keepdims=False)  # [a, b]
        return jax.lax.cond(used, lambda: x_block @ kernel, lambda: zeros)

    return jax.lax.map(product, (x_blocks, layout.block_group, layout.used))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(x: jax.Array, kernels: jax.Array, group_sizes: jax.Array, block: int) -> jax.Array:
    layout = _blocks(group_sizes, x.shape[0], block)
    return _from_blocks(_block_products(_to_blocks(x, layout, block), kernels, layout), layout)


def _blocked_fwd(
    x: jax.Array, kernels: jax.Array, group_sizes: jax.Array, block: int
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    return _blocked(x, kernels, group_sizes, block), (x, kernels, group_sizes)


def _blocked_bwd(
    block: int, residuals: tuple[jax.Array, jax.Array, jax.Array], dy: jax.Array
) -> tuple[jax.Array, jax.Array, None]:
    """dx: the same block products with the kernels transposed; dkernels: a scan adding each
    block's x^T dy into its group's slice of one [E, a, b] f32 accumulator, in place.
    (Autodiff through the forward scan would instead add an [E, a, b] tensor per block.)"""
    x, kernels, group_sizes = residuals
    layout = _blocks(group_sizes, x.shape[0], block)
    dy_blocks = _to_blocks(dy, layout, block)
    dx = _from_blocks(_block_products(dy_blocks, kernels.swapaxes(1, 2), layout), layout)

    def accumulate(dk: jax.Array, args: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        x_block, dy_block, group, used = args  # [block, a], [block, b], [], []

        def add(dk: jax.Array) -> jax.Array:
            update = jnp.matmul(x_block.T, dy_block, preferred_element_type=jnp.float32)
            return dk.at[group].add(update)

        return jax.lax.cond(used, add, lambda dk: dk, dk), None

    blocks = (_to_blocks(x, layout, block), dy_blocks, layout.block_group, layout.used)
    dk_zeros = _zeros_like_all(kernels.shape, jnp.float32, x, dy)
    dk, _ = jax.lax.scan(accumulate, dk_zeros, blocks)
    return dx.astype(x.dtype), dk.astype(kernels.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
