"""Dense -> MoE upcycling: stage 3's experts start from stage 2's dense FFN (copy, copy +
noise, Drop-Upcycling, or random). Trees are in the canonical per-layer layout
(`models/scan.py`).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from moe_llava_jax.param_tree import flatten, unflatten

UPCYCLE_MODES = ("copy", "copy_noise", "drop_upcycle", "random")

# Drop-Upcycling re-initialises whole intermediate channels, so it must know which axis of
# each dense-FFN param (names of `models/mlp.py`) indexes them. Names, not shapes: a kernel
# [embed, mlp] cannot be told from [mlp, embed] when embed == mlp. Input projections: kernel
# [embed, mlp] and bias [mlp]; output projection: kernel [mlp, embed]; its bias [embed] has
# no channel axis and stays a copy.
FFN_CHANNEL_AXIS: dict[str, int | None] = {
    "wi_gate/kernel": 1,
    "wi_gate/bias": 0,
    "wi_up/kernel": 1,
    "wi_up/bias": 0,
    "wi/kernel": 1,
    "wi/bias": 0,
    "wo/kernel": 0,
    "wo/bias": None,
}


def check_upcycling(mode: str, noise_scale: float, drop_fraction: float) -> None:
    """Fails on upcycling settings `upcycle` cannot use, naming their config keys."""
    if mode not in UPCYCLE_MODES:
        raise ValueError(f"config key upcycle.mode={mode!r}: expected one of {UPCYCLE_MODES}")
    if noise_scale < 0:
        raise ValueError(f"config key upcycle.noise_scale={noise_scale} must be >= 0")
    if not 0 <= drop_fraction <= 1:
        raise ValueError(f"config key upcycle.drop_fraction={drop_fraction} must be in [0, 1]")


def _named_key(rng: jax.Array, name: str) -> jax.Array:
    """A key for `name` alone: a param draws the same numbers whatever else the tree holds."""
    return jax.random.fold_in(rng, zlib.crc32(name.encode()))


def _dropped_channels(
    rng: jax.Array, num_experts: int, channels: int, drop_fraction: float
) -> jax.Array:
    """[E, F] bool: each expert's own random floor(r * F) intermediate channels."""
    count = math.floor(drop_fraction * channels)
    ranks = jax.vmap(lambda key: jax.random.permutation(key, channels))(
        jax.random.split(rng, num_experts)
    )  # [E, F]: a random permutation of 0..F-1 per expert
    return ranks < count


def _upcycled_experts(
    dense: jax.Array,
    num_experts: int,
    layer: str,
    param: str,
    rng: jax.Array | None,
    mode: str,
    noise_scale: float,
    drop_fraction: float,
) -> jax.Array:
    """One param of layer `layer`'s dense FFN [...] -> its E experts [E, ...] (not `random`).

    Noise and re-initialised entries are scaled by the dense tensor's own statistics, so one
    `noise_scale` suits kernels of any init scale. Drop-Upcycling draws one channel subset
    per (layer, expert), shared by all params of that expert, so a dropped channel is
    re-initialised on both its input and output side.
    """
    experts = jnp.broadcast_to(dense, (num_experts, *dense.shape))  # [E, ...]: E copies
    if mode == "copy":
        return experts
    dense32 = dense.astype(jnp.float32)
    mean, std = jnp.mean(dense32), jnp.std(dense32)
    draws = jax.random.normal(_named_key(rng, f"{layer}/{param}"), experts.shape)
    if mode == "copy_noise":
        return experts + noise_scale * std * draws
    if param not in FFN_CHANNEL_AXIS:
        raise ValueError(
            f"upcycling: drop_upcycle does not know the intermediate-channel axis of FFN "
            f"param {param!r} (known: {sorted(FFN_CHANNEL_AXIS)})"
        )
    axis = FFN_CHANNEL_AXIS[param]
    if axis is None:
        return experts
    dropped = _dropped_channels(
        _named_key(rng, layer), num_experts, dense.shape[axis], drop_fraction
    )  # [E, F]
    other_axes = [1 + a for a in range(dense.ndim) if a != axis]
    dropped = jnp.expand_dims(dropped, other_axes)  # [E, F, 1] or [E, 1, F] or [E, F]
    return jnp.where(dropped, mean + std * draws, experts)


def upcycle(
    dense_params: Mapping,
    moe_init: Mapping,
    rng: jax.Array | None = None,
    *,
    mode: str = "copy",
    noise_scale: float = 0.01,
    drop_fraction: float = 0.5,
) -> dict:
    """Dense stage-2 params -> stage-3 MoE params.

    The E experts of layer i (`layers_i/moe/experts/*`, [E, ...]) start from layer i's dense
    FFN (`layers_i/mlp/*`) as `mode` says:
      - `copy` (the paper): E exact copies;
      - `copy_noise`: copies + N(0, (noise_scale * std of that dense tensor)^2), drawn
        independently per expert, so experts differ from step 0;
      - `drop_upcycle` (Drop-Upcycling, Nakamura et al., ICLR 2025): each expert draws
        floor(drop_fraction * F) of the F intermediate channels and re-initialises them
        (input-projection columns and biases, output-projection rows) from a normal with the
        dense tensor's mean and std; the other channels stay exact copies;
      - `random`: the MoE model's fresh init (`moe_init`), i.e. no upcycling.
    A shared expert (`layers_i/moe/shared_expert/*`) is an exact copy of the dense FFN in
    every mode but `random`. Routers come from `moe_init`; every other param is copied.
    `copy` keeps the dense model's function only where a token's kept gates sum to 1 (top_k
    >= 2, nothing dropped) and there is no shared expert (which adds a second dense FFN).
    Shapes are checked leaf by leaf. `rng` (needed by `copy_noise` and `drop_upcycle`) may be
    traced; the keyword arguments must be static under `jax.jit`.
    """
    check_upcycling(mode, noise_scale, drop_fraction)
    if mode in ("copy_noise", "drop_upcycle") and rng is None:
        raise ValueError(f"upcycling mode {mode!r} needs an rng")
    dense = flatten(dense_params)
    unused = set(dense)
    out = {}
    for path, init in flatten(moe_init).items():
        if "/moe/router/" in path:
            out[path] = init
            continue
        ffn = re.fullmatch(r"(.*)/moe/(experts|shared_expert)/(.*)", path)
        source = f"{ffn.group(1)}/mlp/{ffn.group(3)}" if ffn else path
        if source not in dense:
            raise ValueError(
                f"upcycling: {path!r} needs {source!r}, absent from the dense checkpoint"
            )
        unused.discard(source)
        value = dense[source]
        is_experts = ffn is not None and ffn.group(2) == "experts"
        needed = init.shape[1:] if is_experts else init.shape
        if value.shape != needed:
            raise ValueError(
                f"upcycling: {source!r} has shape {value.shape}, {path!r} needs {needed}"
            )
        if ffn and mode == "random":
            value = init
        elif is_experts:
            value = _upcycled_experts(
                value,
                init.shape[0],
                ffn.group(1),
                ffn.group(3),
                rng,
                mode,
                noise_scale,
                drop_fraction,
            )
        out[path] = value.astype(init.dtype)
    if unused:
        raise ValueError(
            f"upcycling: dense params without a place in the MoE model: {sorted(unused)[:5]}"
        )
    return unflatten(out)
