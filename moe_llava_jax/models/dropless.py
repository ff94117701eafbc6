"""Dropless experts: every (token, choice) assignment runs through its expert, no capacity.

The assignments are sorted by expert (stable, so token order within an expert) and the
experts run as grouped matmuls over the sorted rows (`grouped_matmul.py`): the FLOPs are
the routed ones, with no buffer padded to a capacity.

Expert parallelism. When a mesh with an `expert` axis of size P > 1 is the context mesh
(`jax.set_mesh`, as `train.run` does), the experts' params are split E/P per device and the
layer runs under `jax.shard_map`: each device sorts its own tokens' assignments by expert,
sends each expert's rows to the device holding that expert (`all_to_all` over `expert`),
receives the rows of its E/P experts from every device, runs its experts, and sends the
outputs back the same way. The batch stays split over every batch axis (`data`, `fsdp`,
`expert`) throughout; the `tensor` axis, if any, repeats the expert computation.

Shapes are static, so each device sends every peer a buffer of n * k rows (n = its tokens):
what a peer receives if every token chose its experts. The real rows of each buffer come
first; the grouped matmul skips the rest (rows in no group). This moves P x the routed rows
over the network: `jax.lax.ragged_all_to_all` moves only the routed rows, but XLA:CPU cannot
run it (jax 0.10), so it could not be tested here and is not used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moe_llava_jax.models.grouped_matmul import grouped_matmul
from moe_llava_jax.models.mlp import FFNConfig, ffn_apply, joined_projections
from moe_llava_jax.sharding import BATCH_AXES

EXPERT_AXIS = "expert"


def grouped_ffn(
    rows: jax.Array,
    group_sizes: jax.Array,
    params: Mapping,
    ffn: FFNConfig,
    implementation: str | None = None,
) -> jax.Array:
    """The experts' FFN on rows [m, d] sorted by expert (group_sizes [E], sum <= m) -> [m, d].
    Rows past sum(group_sizes) are padding: their outputs are never read."""
    num_experts = group_sizes.shape[0]
    row_expert = jnp.repeat(  # [m]; padding rows -> the last expert (a valid bias index)
        jnp.arange(num_experts), group_sizes, total_repeat_length=rows.shape[0]
    )

    def grouped_linear(h: jax.Array, names: tuple[str, ...]) -> jax.Array:
        # Gate and up as one grouped matmul (one pass of the block loop; ~10% faster fwd+bwd
        # on CPU than two), at the price of a copy of their kernels per call.
        dense = joined_projections(params, names)
        y = grouped_matmul(h, dense["kernel"], group_sizes, implementation=implementation)
        return y + dense["bias"][row_expert] if "bias" in dense else y

    return ffn_apply(rows, ffn, grouped_linear)


def _on_expert_devices(
    rows: jax.Array,
    counts: jax.Array,
    params: Mapping,
    ffn: FFNConfig,
    implementation: str | None,
) -> jax.Array:
    """Inside shard_map: rows [m, d] sorted by expert, counts [E] per expert -> their outputs
    [m, d], computed on the devices that hold the experts (module docstring)."""
    devices = jax.lax.axis_size(EXPERT_AXIS)
    local = counts.shape[0] // devices  # experts per device
    m, dim = rows.shape
    per_device = counts.reshape(devices, local).sum(axis=1)  # [P]: rows sent to each device
    destination = jnp.repeat(jnp.arange(devices), per_device, total_repeat_length=m)  # [m]
    first_row = jnp.cumsum(per_device) - per_device  # [P]
    slot = destination * m + jnp.arange(m) - first_row[destination]  # [m] in the [P * m] buffer
    send = jnp.zeros((devices * m, dim), rows.dtype).at[slot].set(rows, unique_indices=True)

    def exchange(buffers: jax.Array) -> jax.Array:  # [P, ...]: chunk j to device j
        return jax.lax.all_to_all(buffers, EXPERT_AXIS, split_axis=0, concat_axis=0)

    received = exchange(send.reshape(devices, m, dim))  # [P (source), m, d]
    received_counts = exchange(counts.reshape(devices, local))  # [P (source), E/P]
    # Each received row's local expert; the padding after a source's rows sorts last.
    row_expert = jax.vmap(
        lambda c: jnp.repeat(
            jnp.arange(local + 1), jnp.append(c, m - c.sum()), total_repeat_length=m
        )
    )(received_counts)  # [P, m]
    order = jnp.argsort(row_expert.reshape(-1), stable=True)  # [P * m]
    y_sorted = grouped_ffn(
        received.reshape(devices * m, dim)[order],
        received_counts.sum(axis=0),
        params,
        ffn,
        implementation,
    )
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    returned = exchange(y.reshape(devices, m, dim))  # [P (expert device), m, d]
    return returned.reshape(devices * m, dim)[slot]


def dropless_experts(
    x: jax.Array,
    expert_index: jax.Array,
    gate: jax.Array,
    params: Mapping,
    ffn: FFNConfig,
    num_experts: int,
    *,
    expert_parallel: bool = False,
    implementation: str | None = None,
) -> jax.Array:
    """sum_k gate[n, k] * expert_{expert_index[n, k]}(x[n]) for x [n, d] -> [n, d].

    `expert_parallel`: called inside shard_map over `expert`, with params holding this
    device's E/P experts (`num_experts` is the global E).
    """
    tokens, dim = x.shape
    top_k = expert_index.shape[-1]
    expert = expert_index.reshape(-1)  # [(n k)]
    order = jnp.argsort(expert, stable=True)  # [(n k)]: assignments sorted by expert
    counts = jnp.bincount(expert, length=num_experts)  # [E]
    rows = x[order // top_k]  # [(n k), d], sorted
    if expert_parallel:
        y_sorted = _on_expert_devices(rows, counts, params, ffn, implementation)
    else:
        y_sorted = grouped_ffn(rows, counts, params, ffn, implementation)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)  # unsorted
    return jnp.einsum("nkd,nk->nd", y.reshape(tokens, top_k, dim), gate.astype(y.dtype))


def expert_parallel_size(batch: int, num_experts: int) -> int:
    """P, the size of the context mesh's `expert` axis, when the layer can shard over it;
    1 (run on the global arrays, GSPMD placing them) without such a mesh, or when the batch
    does not split over the batch axes (e.g. a decoding batch of 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(EXPERT_AXIS, 1) == 1:
        return 1
    devices = mesh.shape[EXPERT_AXIS]
    if num_experts % devices:
        raise ValueError(
            f"model.moe.num_experts={num_experts} does not split over the mesh's "
            f"{devices} expert devices"
        )
    batch_devices = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
    return devices if batch % batch_devices == 0 else 1


def routed_experts(
    x: jax.Array, expert_index: jax.Array, gate: jax.Array, params: Mapping, ffn: FFNConfig
) -> jax.Array:
    """The dropless MoE output for x [b, t, d] routed to expert_index / gate [b, t, k] with
    expert params [E, ...] -> [b, t, d]; across expert devices when the mesh has them."""
    num_experts = params["wo"]["kernel"].shape[0]
    batch, _, dim = x.shape

    def run(x, expert_index, gate, params, *, expert_parallel):
        y = dropless_experts(
            x.reshape(-1, dim),
            expert_index.reshape(-1, expert_index.shape[-1]),
            gate.reshape(-1, gate.shape[-1]),
            params,
            ffn,
            num_experts,
            expert_parallel=expert_parallel,
        )
        return y.reshape(x.shape)

    if expert_parallel_size(batch, num_experts) == 1:
        return run(x, expert_index, gate, params, expert_parallel=False)
    mesh = jax.sharding.get_abstract_mesh()
    batch_spec = PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.shape))
    expert_spec = jax.tree.map(lambda _: PartitionSpec(EXPERT_AXIS), params)
    sharded = jax.shard_map(
        lambda *args: run(*args, expert_parallel=True),
        in_specs=(batch_spec, batch_spec, batch_spec, expert_spec),
        out_specs=batch_spec,
    )
    return sharded(x, expert_index, gate, params)
