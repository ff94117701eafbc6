"""Which params a stage trains: `(regex, trainable)` rules matched with `re.fullmatch`
against '/'-joined canonical param paths (e.g. `decoder/layers_0/moe/router/kernel`); the
first matching rule wins, as in big_vision's freezing schedules. A stage config names a
preset or gives its own list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moe_llava_jax.param_tree import flatten, unflatten

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


STORAGE_DTYPES = ("float32", "bfloat16")


def storage_dtype(name: str, key: str) -> jnp.dtype:
    """A params' storage dtype named by config key `key` (one of STORAGE_DTYPES)."""
    if name not in STORAGE_DTYPES:
        raise ValueError(f"config key {key}={name!r}: expected one of {STORAGE_DTYPES}")
    return jnp.dtype(name)


def cast_frozen(params: Any, mask: Mapping, dtype: jnp.dtype) -> Any:
    """Params (arrays or ShapeDtypeStructs) with their frozen floating leaves in `dtype`,
    trainable ones untouched (the optimizer's master weights stay as they are)."""

    def cast(param, trainable: bool):
        if trainable or not jnp.issubdtype(param.dtype, jnp.floating):
            return param
        if isinstance(param, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(param.shape, dtype, sharding=param.sharding)
        return param.astype(dtype)

    return jax.tree.map(cast, params, mask)
