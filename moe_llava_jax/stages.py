"""MoE-Tuning stages as data: which params train (regex rules) and dense -> MoE upcycling.

Rules are `(regex, trainable)` pairs matched with `re.fullmatch` against '/'-joined param
paths (e.g. `decoder/layers_0/moe/router/kernel`); the first matching rule wins, as in
big_vision's freezing schedules. A stage config names a preset or gives its own list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

Rules = Sequence[tuple[str, bool]]

TRAINABLE_PRESETS: dict[str, Rules] = {
    # Stage 1: the projector aligns image features to the frozen LLM.
    "stage1": ((r"projector/.*", True), (r".*", False)),
    # Stage 2: the whole LLM and the projector; the vision tower stays frozen.
    "stage2": ((r"(projector|decoder)/.*", True), (r".*", False)),
    # Stage 3 as the paper describes it: only the MoE layers (experts + routers).
    "stage3_paper": ((r"decoder/layers_\d+/moe/.*", True), (r".*", False)),
    # Stage 3 as the released code trains it: every FFN (dense and MoE), routers, projector.
    "stage3_original": (
        (r"decoder/layers_\d+/(moe|mlp)/.*", True),
        (r"projector/.*", True),
        (r".*", False),
    ),
}

FlatParams = dict[str, jax.Array]


def flatten(params: Mapping) -> FlatParams:
    return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: Mapping[str, jax.Array]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def resolve_rules(rules: str | Rules) -> Rules:
    if isinstance(rules, str):
        if rules not in TRAINABLE_PRESETS:
            raise ValueError(
                f"config key trainable={rules!r}: unknown preset; known: "
                f"{sorted(TRAINABLE_PRESETS)}"
            )
        return TRAINABLE_PRESETS[rules]
    return tuple((str(pattern), bool(train)) for pattern, train in rules)


def trainable_mask(params: Mapping, rules: str | Rules) -> dict:
    """Bool pytree (same structure as params): True where the first matching rule trains."""
    compiled = [(re.compile(pattern), train) for pattern, train in resolve_rules(rules)]
    mask = {}
    for path in flatten(params):
        matches = [train for pattern, train in compiled if pattern.fullmatch(path)]
        if not matches:
            raise ValueError(
                f"param {path!r} matches no trainable rule; end the rules with ('.*', False)"
            )
        mask[path] = matches[0]
    if not any(mask.values()):
        raise ValueError(
            f"trainable rules {rules!r} select no parameter (is the model missing the "
            "layers they name, e.g. MoE layers in a dense model?)"
        )
    return unflatten(mask)


def partition(params: Mapping, mask: Mapping) -> tuple[FlatParams, FlatParams]:
    """Flat (trainable, frozen) dicts: the step differentiates w.r.t. the first only."""
    flat_mask = flatten(mask)
    flat = flatten(params)
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return trainable, frozen


def merge(trainable: FlatParams, frozen: FlatParams) -> dict:
    return unflatten({**trainable, **frozen})


def upcycle(dense_params: Mapping, moe_init: Mapping) -> dict:
    """Dense stage-2 params -> stage-3 MoE params.

    Each expert of layer i = an exact copy of layer i's dense FFN (`layers_i/mlp/*` tiled to
    `layers_i/moe/experts/*`); routers come from `moe_init` (the MoE model's fresh init);
    every other param is copied. Shapes are checked leaf by leaf.
    """
    dense = flatten(dense_params)
    unused = set(dense)
    out = {}
    for path, init in flatten(moe_init).items():
        expert = re.fullmatch(r"(.*)/moe/experts/(.*)", path)
        if "/moe/router/" in path:
            out[path] = init
            continue
        source = f"{expert.group(1)}/mlp/{expert.group(2)}" if expert else path
        if source not in dense:
            raise ValueError(
                f"upcycling: {path!r} needs {source!r}, absent from the dense checkpoint"
            )
        value = dense[source]
        if expert:
            value = jnp.broadcast_to(value, init.shape)  # [E, ...]: E identical copies
        if value.shape != init.shape:
            raise ValueError(
                f"upcycling: {source!r} has shape {value.shape}, {path!r} needs {init.shape}"
            )
        out[path] = value.astype(init.dtype)
        unused.discard(source)
    if unused:
        raise ValueError(
            f"upcycling: dense params without a place in the MoE model: {sorted(unused)[:5]}"
        )
    return unflatten(out)
