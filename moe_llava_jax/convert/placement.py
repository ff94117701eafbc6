"""Lazy imported params -> sharded device arrays, one param and one shard at a time.

`jax.make_array_from_callback` asks each process for its addressable devices' slices only;
the slice is read from the memory-mapped checkpoint in the file's dtype (bfloat16 stays
bfloat16 across the host-to-device copy) and cast on the device to the param's dtype, one
param at a time: a host holds at most one shard's bytes beside the file mapping, and the
devices the param set plus one param in the file's dtype. Processes sharing a host share
the mapping's pages (the page cache), so the weights are on a host once, not per process.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from moe_llava_jax import param_tree
from moe_llava_jax.convert.lazy import LazyTensor


def place(tensors: Mapping, targets: Mapping) -> dict:
    """A tree of `LazyTensor`s -> the same tree of device arrays, each shaped, typed and
    sharded as its `targets` entry (a `jax.ShapeDtypeStruct` with a sharding, at the same
    path; `targets` may hold more params than `tensors`)."""
    flat_targets = param_tree.flatten(targets)
    placed = {}
    for path, tensor in param_tree.flatten(tensors).items():
        target = flat_targets.get(path)
        if target is None:
            raise ValueError(f"imported param {path!r}: the model has no such param")
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"imported param {path!r} has shape {tensor.shape}; the model's is {target.shape}"
            )
        placed[path] = place_one(tensor, target)
    return param_tree.unflatten(placed)


def place_one(tensor: LazyTensor, target: jax.ShapeDtypeStruct) -> jax.Array:
    """One param: its shards read and put on their devices, then cast there.

    Each shard is copied out of the mapping: on CPU a jax array adopts an aligned numpy
    buffer without copying, and a param backed by the read-only file would crash the first
    in-place (donated) update."""
    raw = jax.make_array_from_callback(
        tensor.shape,
        target.sharding,
        lambda index: np.array(tensor.read(index), order="C", copy=True),
        dtype=tensor.dtype,
    )
    if raw.dtype == target.dtype:
        return raw
    value = raw.astype(target.dtype)  # on the devices, keeping the sharding
    raw.delete()
    return value
