"""Param trees as flat dicts keyed by '/'-joined paths (`decoder/layers_0/mlp/wo/kernel`):
what trainable rules match, what the step splits into trainable and frozen halves.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import traverse_util

FlatParams = dict[str, jax.Array]


def flatten(params: Mapping) -> FlatParams:
    return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: Mapping[str, jax.Array]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def partition(params: Mapping, mask: Mapping) -> tuple[FlatParams, FlatParams]:
    """Flat (trainable, frozen) dicts: the step differentiates w.r.t. the first only."""
    flat_mask = flatten(mask)
    flat = flatten(params)
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return trainable, frozen


def merge(trainable: FlatParams, frozen: FlatParams) -> dict:
    return unflatten({**trainable, **frozen})
