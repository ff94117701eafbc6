"""Dropless experts: every (token, choice) assignment runs through its expert, no capacity.

The assignments are sorted by expert (stable, so token order within an expert) and the
experts run as grouped matmuls over the sorted rows (`grouped_matmul.py`): the FLOPs are
the routed ones, with no buffer padded to a capacity.

Expert parallelism. When the logical axis rules in context map the logical `expert` axis
to axes of the context mesh of P > 1 devices (`sharding.mesh_context`, as `train.run` enters
them; by default the mesh axis `expert`), the experts' params are split E/P per device and
the layer runs under `jax.shard_map`: each device sorts its own tokens' assignments by
expert, sends each expert's rows to the device holding that expert (`all_to_all` over those
axes), receives the rows of its E/P experts from every device, runs its experts, and sends
the outputs back the same way. The batch stays split over the mesh axes of the logical
`batch` axis (by default `data`, `fsdp`, `expert`) throughout; other mesh axes (by default
`tensor`) repeat the expert computation. Without such an expert axis the layer still runs per device
under `shard_map` over the batch's axes (each device sorts and computes its own tokens with
every expert's weights), never as one global sort that GSPMD would replicate. The layer reads the rules, never a table: the
placement is the config's (`sharding_rules`).

How the rows travel (`model.moe.exchange`):
- "dense": shapes are static, so each device sends every peer a buffer of m = n * k rows
  (n = its tokens): what a peer receives if every token chose its experts. The real rows of
  each buffer come first; the grouped matmul skips the rest (rows in no group). This moves
  P x the routed rows over the network and runs the experts' matmuls over P x m row slots.
- "ragged": `jax.lax.ragged_all_to_all` sends each peer only its rows, into a receive buffer
  of `receive_factor` x m rows (m is a device's share when the experts are balanced); the
  experts run over that buffer, the outputs go back the same way. Rows that would land past
  the buffer's end are not sent: those assignments are dropped (their output is 0) and
  counted in `dropped_fraction`, as capacity dispatch counts its drops. XLA:CPU cannot run
  the ragged collective, so on CPU meshes the same offsets and sizes go through an emulation
  of it by dense all-to-all (P x the bytes): that is what the CPU tests check against the
  dense path; TPU and GPU programs (and the AOT report) use the collective itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moe_llava_jax.models import layers
from moe_llava_jax.models.grouped_matmul import grouped_matmul
from moe_llava_jax.models.mlp import FFNConfig, ffn_apply, joined_projections


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
    expert_axes: tuple[str, ...],
) -> jax.Array:
    """Inside shard_map over `expert_axes`: rows [m, d] sorted by expert, counts [E] per
    expert -> their outputs [m, d], computed on the devices that hold the experts, by
    dense all-to-all (module docstring)."""
    devices = jax.lax.axis_size(expert_axes)
    local = counts.shape[0] // devices  # experts per device
    m, dim = rows.shape
    per_device = counts.reshape(devices, local).sum(axis=1)  # [P]: rows sent to each device
    destination = jnp.repeat(jnp.arange(devices), per_device, total_repeat_length=m)  # [m]
    first_row = jnp.cumsum(per_device) - per_device  # [P]
    slot = destination * m + jnp.arange(m) - first_row[destination]  # [m] in the [P * m] buffer
    send = jnp.zeros((devices * m, dim), rows.dtype).at[slot].set(rows, unique_indices=True)

    def exchange(buffers: jax.Array) -> jax.Array:  # [P, ...]: chunk j to device j
        return jax.lax.all_to_all(buffers, expert_axes, split_axis=0, concat_axis=0)

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


def emulated_ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name,
) -> jax.Array:
    """`jax.lax.ragged_all_to_all`'s result by a dense all-to-all of [P, N] row slots (P x
    the bytes): for CPU meshes, where XLA has no ragged collective."""
    n = operand.shape[0]
    rows = jnp.arange(n)
    source = jnp.clip(input_offsets[:, None] + rows, 0, n - 1)  # [P, N]
    chunks = jnp.where((rows < send_sizes[:, None])[..., None], operand[source], 0)
    exchange = lambda x: jax.lax.all_to_all(x, axis_name, split_axis=0, concat_axis=0)
    received = exchange(chunks)  # [P (source), N, ...]
    offsets = exchange(output_offsets[:, None])[:, 0]  # where each source's rows land here
    target = jnp.where(rows < recv_sizes[:, None], offsets[:, None] + rows, output.shape[0])
    return output.at[target.reshape(-1)].set(
        received.reshape(-1, *operand.shape[1:]), mode="drop", unique_indices=True
    )


def _on_expert_devices_ragged(
    rows: jax.Array,
    counts: jax.Array,
    params: Mapping,
    ffn: FFNConfig,
    implementation: str | None,
    expert_axes: tuple[str, ...],
    receive_factor: float,
) -> tuple[jax.Array, jax.Array]:
    """As `_on_expert_devices`, moving only the routed rows (module docstring): -> outputs
    [m, d] (0 for rows past a receive buffer's end) and the number of such rows, here."""
    devices = jax.lax.axis_size(expert_axes)
    local = counts.shape[0] // devices  # experts per device
    m, dim = rows.shape
    capacity = max(math.ceil(receive_factor * m), 1)  # receive buffer rows
    mesh = jax.sharding.get_abstract_mesh()
    platform = getattr(mesh.abstract_device, "platform", None) or jax.default_backend()
    collective = emulated_ragged_all_to_all if platform == "cpu" else jax.lax.ragged_all_to_all
    exchange = lambda x: jax.lax.all_to_all(x, expert_axes, split_axis=0, concat_axis=0)

    per_device = counts.reshape(devices, local).sum(axis=1)  # [P]: rows for each device
    first_row = jnp.cumsum(per_device) - per_device  # [P]: where they start in `rows`
    wanted = exchange(per_device[:, None])[:, 0]  # [P]: rows each source has for me
    start = jnp.minimum(jnp.cumsum(wanted) - wanted, capacity)  # [P]: where they start here
    kept = jnp.clip(capacity - start, 0, wanted)  # [P]: the ones that fit
    sent = exchange(kept[:, None])[:, 0]  # [P]: my rows each device keeps
    lands_at = exchange(start[:, None])[:, 0]  # [P]: where my rows start there
    received = collective(
        rows, jnp.zeros((capacity, dim), rows.dtype), first_row, sent, lands_at, kept,
        axis_name=expert_axes,
    )  # [C, d]: source-major, each source's rows sorted by (local) expert
    per_expert = exchange(counts.reshape(devices, local))  # [P (source), E/P]
    # Per (source, local expert): the rows that fit; the buffer's unused tail sorts last.
    fits = jnp.minimum(jnp.cumsum(per_expert, axis=1), kept[:, None])
    fitting = jnp.diff(fits, axis=1, prepend=0)  # [P, E/P]
    row_expert = jnp.repeat(
        jnp.append(jnp.tile(jnp.arange(local), devices), local),
        jnp.append(fitting.reshape(-1), capacity - fitting.sum()),
        total_repeat_length=capacity,
    )  # [C]
    order = jnp.argsort(row_expert, stable=True)
    y_sorted = grouped_ffn(received[order], fitting.sum(axis=0), params, ffn, implementation)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    returned = collective(
        y, jnp.zeros_like(rows), start, kept, exchange(first_row[:, None])[:, 0], sent,
        axis_name=expert_axes,
    )  # [m, d] in `rows`' order; rows that did not fit stay 0
    return returned, m - sent.sum()


def dropless_experts(
    x: jax.Array,
    expert_index: jax.Array,
    gate: jax.Array,
    params: Mapping,
    ffn: FFNConfig,
    num_experts: int,
    *,
    expert_axes: tuple[str, ...] = (),
    implementation: str | None = None,
    exchange: str = "dense",
    receive_factor: float = 2.0,
) -> tuple[jax.Array, jax.Array]:
    """sum_k gate[n, k] * expert_{expert_index[n, k]}(x[n]) for x [n, d] -> [n, d], and the
    number of assignments dropped (only a "ragged" exchange drops: module docstring).

    `expert_axes`: called inside shard_map over these mesh axes, with params holding this
    device's E/P experts (`num_experts` is the global E); () = on the global arrays.
    """
    tokens, dim = x.shape
    top_k = expert_index.shape[-1]
    expert = expert_index.reshape(-1)  # [(n k)]
    order = jnp.argsort(expert, stable=True)  # [(n k)]: assignments sorted by expert
    counts = jnp.bincount(expert, length=num_experts)  # [E]
    rows = x[order // top_k]  # [(n k), d], sorted
    dropped = jnp.zeros((), jnp.int32)
    if expert_axes and exchange == "ragged":
        y_sorted, dropped = _on_expert_devices_ragged(
            rows, counts, params, ffn, implementation, expert_axes, receive_factor
        )
    elif expert_axes:
        y_sorted = _on_expert_devices(rows, counts, params, ffn, implementation, expert_axes)
    else:
        y_sorted = grouped_ffn(rows, counts, params, ffn, implementation)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)  # unsorted
    out = jnp.einsum("nkd,nk->nd", y.reshape(tokens, top_k, dim), gate.astype(y.dtype))
    return out, dropped


def expert_parallel_axes(batch: int, num_experts: int) -> tuple[str, ...]:
    """The context mesh's axes that the experts split over (the logical `expert` axis's),
    when the layer can shard over them; () (run on the global arrays, GSPMD placing them)
    without such a mesh and rules, or when the batch does not split over the logical `batch`
    axis's mesh axes (e.g. a decoding batch of 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    expert_axes = layers.mesh_axes_in_context("expert", mesh)
    devices = math.prod(mesh.shape[a] for a in expert_axes)
    if devices == 1:
        return ()
    if num_experts % devices:
        raise ValueError(
            f"model.moe.num_experts={num_experts} does not split over the mesh's "
            f"{devices} expert devices"
        )
    return expert_axes if batch % layers.batch_devices_in_context(mesh) == 0 else ()


EXCHANGES = ("dense", "ragged")  # `model.moe.exchange` values


def check_exchange(exchange: str, receive_factor: float) -> None:
    if exchange not in EXCHANGES:
        raise ValueError(f"config key model.moe.exchange={exchange!r}: expected one of {EXCHANGES}")
    if receive_factor <= 0:
        raise ValueError(f"config key model.moe.receive_factor={receive_factor} must be > 0")


def routed_experts(
    x: jax.Array,
    expert_index: jax.Array,
    gate: jax.Array,
    params: Mapping,
    ffn: FFNConfig,
    exchange: str = "dense",
    receive_factor: float = 2.0,
) -> tuple[jax.Array, jax.Array]:
    """The dropless MoE output for x [b, t, d] routed to expert_index / gate [b, t, k] with
    expert params [E, ...] -> [b, t, d], and the fraction of assignments dropped (a ragged
    exchange's receive buffers overflowing); across expert devices when the mesh has them."""
    check_exchange(exchange, receive_factor)
    num_experts = params["wo"]["kernel"].shape[0]
    batch, _, dim = x.shape
    assignments = expert_index.size

    def run(x, expert_index, gate, params, *, expert_axes):
        y, dropped = dropless_experts(
            x.reshape(-1, dim),
            expert_index.reshape(-1, expert_index.shape[-1]),
            gate.reshape(-1, gate.shape[-1]),
            params,
            ffn,
            num_experts,
            expert_axes=expert_axes,
            exchange=exchange,
            receive_factor=receive_factor,
        )
        return y.reshape(x.shape), dropped

    expert_axes = expert_parallel_axes(batch, num_experts)
    mesh = jax.sharding.get_abstract_mesh()
    batch_devices = 1 if mesh.empty else layers.batch_devices_in_context(mesh)
    if batch_devices == 1 or batch % batch_devices:
        out, dropped = run(x, expert_index, gate, params, expert_axes=())
        return out, dropped / assignments
    # Each device sorts and computes its own tokens: with experts on other devices
    # (expert_axes) by all-to-all, else with every expert's (FSDP-gathered) weights.
    batch_axes = layers.mesh_axes_in_context("batch", mesh)
    batch_spec = PartitionSpec(batch_axes)
    expert_spec = jax.tree.map(lambda _: PartitionSpec(expert_axes or None), params)

    def run_here(*args):
        y, dropped = run(*args, expert_axes=expert_axes)
        return y, jax.lax.psum(dropped, batch_axes)  # each batch device drops its own rows

    sharded = jax.shard_map(
        run_here,
        in_specs=(batch_spec, batch_spec, batch_spec, expert_spec),
        out_specs=(batch_spec, PartitionSpec()),
        # jax 0.10 types ragged_all_to_all's result as varying over its axis only (here the
        # rows vary over every batch axis), which its custom-VJP users then reject.
        check_vma=exchange != "ragged",
    )
    out, dropped = sharded(x, expert_index, gate, params)
    return out, dropped / assignments
