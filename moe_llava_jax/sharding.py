"""Device mesh from config and the one table mapping logical axis names to mesh axes.

Every param is annotated with logical names in the model code; this file alone decides how
they land on a mesh. Expert weights [E, ...] split E over `expert`; the batch splits over
`data`, `fsdp` and `expert` (expert-parallel devices hold different tokens, which travel to
their experts inside the MoE layer); `fsdp` shards the embed dim of weights; `tensor` shards
heads / mlp / vocab.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("expert", "expert"),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("patch", None),
    ("norm", None),
)


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes per MESH_AXES; at most one axis may be -1 (= all remaining devices)."""
    unknown = [name for name in axis_sizes if name not in MESH_AXES]
    if unknown:
        raise ValueError(f"config key mesh.{unknown[0]}: unknown mesh axis; known: {MESH_AXES}")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError("config key mesh: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"config key mesh: fixed axes ({known} devices) do not divide {num_devices} devices"
            )
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config key mesh: {dict(zip(MESH_AXES, sizes))} needs "
            f"{math.prod(sizes)} devices, {num_devices} are available"
        )
    return tuple(sizes)


def make_mesh(axis_sizes: Mapping[str, int]) -> Mesh:
    """A mesh with Auto axes: GSPMD propagates shardings from the annotated params/batch."""
    shape = mesh_shape(axis_sizes, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_shardings(boxed_tree, mesh: Mesh):
    """NamedShardings for a tree of `nn.LogicallyPartitioned` boxes (e.g. `eval_shape(init)`)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
