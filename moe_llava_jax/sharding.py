"""Device mesh from config and the rules mapping logical axis names to mesh axes.

Every param is annotated with logical names in the model code; the rules (config key
`sharding_rules`, default `DEFAULT_LOGICAL_AXIS_RULES`) alone decide how they land on a mesh.
They are data: `logical_shardings` takes them explicitly for params, and `mesh_context`
enters them (`nn.logical_axis_rules`) with the context mesh around init, step and decode,
where the models' activation constraints and dropless expert parallelism read them. Default
placement: expert weights [E, ...] split E over `expert`; the batch splits over `data`,
`fsdp` and `expert` (expert-parallel devices hold different tokens, which travel to their
experts inside the MoE layer); `fsdp` shards the embed dim of weights; `tensor` shards
heads / mlp / vocab; scanned layers' stacking axis stays whole.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the default rule for the logical `batch` axis

Rule = tuple[str, str | tuple[str, ...] | None]  # (logical name, mesh axes)
Rules = tuple[Rule, ...]  # in order of precedence (flax's `nn.logical_axis_rules`)

DEFAULT_LOGICAL_AXIS_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("expert", "expert"),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("patch", None),
    ("norm", None),
    ("layers", None),  # scanned layers' stacking axis: each device holds every layer's slice
)


def rules_to_config(rules: Rules) -> list:
    """The rules as config value: [name, mesh axes] lists, as JSON (`config.to_json()`) keeps
    them."""
    return [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules]


def rules_from_config(value: Sequence) -> Rules:
    """Config key `sharding_rules` ([logical name, mesh axis | [mesh axes] | None] pairs, as a
    config file or a checkpoint's JSON gives them) -> the rules flax takes. A bad entry fails
    here, naming the key, not later as a silent replication or an error inside jit."""
    rules = tuple(_rule(entry) for entry in value)
    names = [name for name, _ in rules]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"config key sharding_rules: logical names {twice} appear more than once")
    return rules


def _rule(entry) -> Rule:
    """One [logical name, mesh axes] pair, its mesh axes checked against MESH_AXES."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str):
        raise ValueError(
            f"config key sharding_rules: entry {entry!r} is not a [logical name, mesh axes] pair"
        )
    name, axes = entry
    axes = axes if axes is None or isinstance(axes, str) else tuple(axes)
    unknown = [a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in MESH_AXES]
    if unknown:
        raise ValueError(
            f"config key sharding_rules: entry {list(entry)!r}: unknown mesh axis "
            f"{unknown[0]!r}; known: {MESH_AXES}"
        )
    return name, axes


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


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """`mesh` as the context mesh and `rules` as flax's logical axis rules: what the models'
    sharding constraints and dropless expert parallelism read while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_shardings(boxed_tree, mesh: Mesh, rules: Rules):
    """NamedShardings for a tree of `nn.LogicallyPartitioned` boxes (e.g. `eval_shape(init)`)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_LOGICAL_AXIS_RULES) -> NamedSharding:
    """Where input batches [batch, ...] land: the mesh axes the rules give `batch`, the same
    split the models' constraints and dropless expert parallelism assume."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
