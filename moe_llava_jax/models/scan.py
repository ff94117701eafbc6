"""Scanned layers: which blocks of a stack run under one `nn.scan`, and the two param
layouts that follow from it.

A real backbone repeats one block 24-32 times. Written as a Python loop, every block is
traced, lowered and compiled on its own (the HLO and compile time grow with depth); under
`nn.scan` the repeating unit is compiled once and its params are stacked along a leading
`layers` axis. A stack is cut into `Segment`s: a scanned segment runs `repeats` times a unit
of `len(kinds)` blocks (a (MoE, dense) pair for `sparse` placement), an unscanned one is a
single block of the loop.

Two layouts of the same params:
- the *model layout*, what the modules declare: scanned units at `scan_{start}/block_{j}/...`
  (leaves [repeats, ...]), loop blocks at `layers_{i}/...`; train state and checkpoints use
  it;
- the *canonical layout*: every block at `layers_{i}/...`, unstacked. Everything outside the
  model speaks it (Hugging Face import/export, trainable rules, upcycling, FLOP units,
  routing analysis), so none of it depends on `model.scan_layers`.
`stack_layers` / `unstack_layers` convert between them; a layout without scanned segments is
the canonical one. They work on any tree keyed like the params (params, abstract shapes,
bool masks, sown intermediates, KV caches).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

LAYERS_AXIS = "layers"  # logical name of the stacking axis (never sharded)
# Collections whose variables exist per block: stacked along the scan axis like the params.
PER_LAYER_COLLECTIONS = ("params", "cache", "intermediates")


class Segment(NamedTuple):
    """Blocks start .. start + repeats * len(kinds) - 1; block start + r * len(kinds) + j
    has kind kinds[j] (e.g. True = MoE FFN)."""

    start: int
    kinds: tuple[Any, ...]
    repeats: int
    scanned: bool

    @property
    def period(self) -> int:
        return len(self.kinds)

    def layer(self, repeat: int, member: int) -> int:
        return self.start + repeat * self.period + member

    @property
    def name(self) -> str:
        return f"scan_{self.start}" if self.scanned else f"layers_{self.start}"


Plan = tuple[Segment, ...]


def looped(kinds: Sequence[Any]) -> Plan:
    """Every block on its own: the loop (and the canonical layout)."""
    return tuple(Segment(i, (kind,), 1, scanned=False) for i, kind in enumerate(kinds))


def periodic(kinds: Sequence[Any], period: int) -> Plan:
    """`kinds` as one scan of a `period`-block unit, the blocks that do not fill a whole
    unit looped after it; all looped if `kinds` does not repeat with that period."""
    repeats = len(kinds) // period
    unit = tuple(kinds[:period])
    if repeats == 0 or any(tuple(kinds[r * period : (r + 1) * period]) != unit for r in range(repeats)):
        return looped(kinds)
    tail = looped(kinds[repeats * period :])
    return (Segment(0, unit, repeats, scanned=True),) + tuple(
        s._replace(start=s.start + repeats * period) for s in tail
    )


def runs(kinds: Sequence[Any]) -> Plan:
    """One period-1 scan per run of equal kinds (`first_half` / `second_half`: two scans)."""
    plan, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            plan.append(Segment(start, (kinds[start],), i - start, scanned=True))
            start = i
    return tuple(plan)


def plan_decoder(num_layers: int, moe_layers: Sequence[int], placement: str | None) -> Plan:
    """The decoder's scan plan; kinds are `use_moe` bools. `placement` is `moe.layers`
    (None for a dense model): `sparse` scans (MoE, dense) pairs, an index list loops."""
    moe = set(moe_layers)
    kinds = tuple(i in moe for i in range(num_layers))
    if placement == "sparse":
        return periodic(kinds, 2)
    if placement in (None, "dense", "first_half", "second_half"):
        return runs(kinds)
    return looped(kinds)  # an irregular index list


def plan_uniform(num_blocks: int) -> Plan:
    """A stack of identical blocks (the ViT): one period-1 scan."""
    return runs((None,) * num_blocks)


def scan_unit(unit: type[nn.Module], repeats: int, num_broadcast_args: int) -> type[nn.Module]:
    """`unit` (carry, *broadcast args) -> (carry, per-repeat outputs) scanned `repeats` times:
    params, KV cache and sown values stacked on axis 0, fresh init, gating noise and dropout
    masks per repeat, the broadcast args (positions, masks) shared."""
    return nn.scan(
        unit,
        variable_axes={name: 0 for name in PER_LAYER_COLLECTIONS},
        split_rngs={"params": True, "gating": True, "dropout": True},
        in_axes=(nn.broadcast,) * num_broadcast_args,
        length=repeats,
        metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
    )


# --- layouts -------------------------------------------------------------------------------

Plans = Mapping[str, Plan]  # subtree prefix ("decoder", "vision"; "" for a bare stack) -> plan
_SCANNED = re.compile(r"scan_(\d+)/block_(\d+)/(.+)")
_LAYER = re.compile(r"layers_(\d+)/(.+)")


def _split(path: str, plans: Plans) -> tuple[str, str] | None:
    """(prefix, rest) for a path under one of the planned subtrees."""
    for prefix in plans:
        if not prefix:
            return "", path
        if path.startswith(prefix + "/"):
            return prefix, path[len(prefix) + 1 :]
    return None


def _join(prefix: str, rest: str) -> str:
    return f"{prefix}/{rest}" if prefix else rest


def _take(leaf: Any, index: int) -> Any:
    """Layer `index` of a stacked leaf: arrays are sliced, abstract shapes lose axis 0,
    Python values (a bool mask entry) apply to every layer, tuples (sown values) per item."""
    if isinstance(leaf, tuple):
        return tuple(_take(x, index) for x in leaf)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    if isinstance(leaf, (bool, int, float)):
        return leaf
    return leaf[index]


def stack_leaves(path: str, leaves: Sequence[Any]) -> Any:
    """One stacked leaf from the per-layer leaves (the default `combine` of `stack_layers`).

    Bool leaves (a trainable mask) stay one bool and must agree: a scanned param trains as
    a whole."""
    first = leaves[0]
    if isinstance(first, tuple):
        return tuple(stack_leaves(path, items) for items in zip(*leaves))
    if isinstance(first, bool):
        if any(leaf != first for leaf in leaves):
            raise ValueError(
                f"{path!r} is one scanned param [layers, ...], but the trainable rules train "
                "some of its layers and freeze others: give those layers the same rule, or "
                "set model.scan_layers=False"
            )
        return first
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def unstack_layers(tree: Mapping, plans: Plans) -> dict:
    """Model layout -> canonical layout (module docstring)."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(tree, sep="/").items():
        split = _split(path, plans)
        match = split and _SCANNED.fullmatch(split[1])
        if not match:
            out[path] = leaf
            continue
        prefix, (start, member, rest) = split[0], match.groups()
        segment = next(s for s in plans[prefix] if s.scanned and s.start == int(start))
        for repeat in range(segment.repeats):
            layer = segment.layer(repeat, int(member))
            out[_join(prefix, f"layers_{layer}/{rest}")] = _take(leaf, repeat)
    return traverse_util.unflatten_dict(out, sep="/")


def stack_layers(
    tree: Mapping, plans: Plans, combine: Callable[[str, Sequence[Any]], Any] = stack_leaves
) -> dict:
    """Canonical layout -> model layout (module docstring). Every layer of a scanned unit
    must hold the same leaves; `combine(path, per-layer leaves)` makes the stacked leaf."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    per_layer: dict[tuple[str, int], dict[str, Any]] = {}
    out = {}
    for path, leaf in flat.items():
        split = _split(path, plans)
        match = split and _LAYER.fullmatch(split[1])
        if match:
            per_layer.setdefault((split[0], int(match.group(1))), {})[match.group(2)] = leaf
        else:
            out[path] = leaf
    for prefix, plan in plans.items():
        for segment in plan:
            for member in range(segment.period):
                layers = [segment.layer(r, member) for r in range(segment.repeats)]
                trees = [per_layer.pop((prefix, layer), None) for layer in layers]
                if all(t is None for t in trees):
                    continue  # a tree without this stack (e.g. a mask of the decoder alone)
                missing = [layer for layer, t in zip(layers, trees) if t is None]
                if missing or any(t.keys() != trees[0].keys() for t in trees):
                    raise ValueError(
                        f"stacking {_join(prefix, segment.name)}: layers {layers} do not hold "
                        f"the same params (missing layers: {missing})"
                    )
                for rest in trees[0]:
                    leaves = [t[rest] for t in trees]
                    if segment.scanned:
                        name = _join(prefix, f"{segment.name}/block_{member}/{rest}")
                        out[name] = combine(name, leaves)
                    else:
                        out[_join(prefix, f"layers_{layers[0]}/{rest}")] = leaves[0]
    if per_layer:
        unknown = sorted(_join(p, f"layers_{i}") for p, i in per_layer)
        raise ValueError(f"stacking: {unknown[:5]} are not layers of the model")
    return traverse_util.unflatten_dict(out, sep="/")
