"""The FFN with its backward pass run over pieces of the hidden (`mlp`) axis.

Why: at real size an expert FFN's backward holds several `[groups, E, C, F]` tensors at once
(the gate and up pre-activations, the activation, its gradient, the gate and up gradients:
1.4 GB each for StableLM-2's experts at 16 x 2,624 tokens per chip, capacity factor 1.5), and
they are the largest buffers of a stage-3 step. The activation is elementwise per hidden
unit, so the backward from the output down to the pre-activations can run one slice of F at
a time: a piece's out-projection gradient is that slice of the whole (nothing accumulates
across pieces), and its pre-activation gradient overwrites the slice of the saved
pre-activations it was computed from, in place. The in-projections' backward then runs once
on the whole pre-activation gradient, as in the plain FFN (one full-width product each: the
same rounding). The forward is the plain one and keeps the pre-activations as autodiff
would, so no matmul is computed twice; what the pieces add to the saved pre-activations is
`[..., F / pieces]` wide. Same outputs and gradients as `ffn_apply` (tests).

The pieces slice the out-projection along the mlp axis: keep that axis unsharded (the default
rules map it to `tensor`, of size 1 in the recipes), or GSPMD gathers each piece's slice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from moe_llava_jax.models.mlp import (
    FFNConfig,
    activate,
    ffn_apply,
    in_projections,
    joined_projections,
)

# (h [..., in], the FFN's params {name: {"kernel", "bias"?}}, projection names) -> h times the
# named projections side by side [..., sum of their outs], as `mlp.Project` with the params
# passed in (the backward calls it on slices of them).
ParamProject = Callable[[jax.Array, Mapping, tuple[str, ...]], jax.Array]


def pieced_ffn(
    x: jax.Array, params: Mapping, config: FFNConfig, project: ParamProject, pieces: int
) -> jax.Array:
    """`ffn_apply(x, config, ...)` on x [..., embed] whose backward runs `pieces` slices of
    the mlp axis one after another (module docstring); pieces=1 is `ffn_apply` itself."""
    check_pieces(pieces, config)
    if pieces == 1:
        return ffn_apply(x, config, lambda h, names: project(h, params, names))
    return _pieced_backward(config, project, pieces)(x, params)


def check_pieces(pieces: int, config: FFNConfig) -> None:
    if pieces < 1 or config.intermediate_size % pieces:
        raise ValueError(
            f"config key model.moe.backward_pieces={pieces} must be >= 1 and divide the "
            f"experts' intermediate size {config.intermediate_size}"
        )


def _out_projection_piece(out: Mapping, start: jax.Array, size: int) -> dict:
    """The out-projection's params for hidden units [start, start + size): the kernel [.., F,
    d] sliced on its mlp axis; the bias belongs to no hidden unit and is passed whole."""
    piece = {"kernel": jax.lax.dynamic_slice_in_dim(out["kernel"], start, size, axis=-2)}
    return {**out, **piece}


def _pieced_backward(config: FFNConfig, project: ParamProject, pieces: int):
    names_in = in_projections(config)
    width = config.intermediate_size
    size = width // pieces

    def hidden(x: jax.Array, params: Mapping) -> jax.Array:  # [..., n_in x mlp]
        # One product with the in-projections' kernels joined (a copy of the weights, small
        # next to the activations): separate products would be concatenated, holding the
        # pre-activations twice.
        return project(x, {"in": joined_projections(params, names_in)}, ("in",))

    def output(h: jax.Array, params: Mapping) -> jax.Array:  # [..., embed]
        return project(activate(config, h), params, ("wo",))

    @jax.custom_vjp
    def ffn(x: jax.Array, params: Mapping) -> jax.Array:
        return output(hidden(x, params), params)

    def forward(x: jax.Array, params: Mapping):
        h = hidden(x, params)
        return output(h, params), (x, h, params)

    def backward(residuals, dy: jax.Array):
        x, h, params = residuals
        # h: the in-projections' outputs side by side; as [..., n_in, mlp] (a free reshape)
        # a piece of all of them is one slice, and its gradient one in-place update.
        split = h.reshape(*h.shape[:-1], len(names_in), width)

        def piece(i: jax.Array, carry: tuple[jax.Array, dict]) -> tuple[jax.Array, dict]:
            h_or_dh, d_out = carry  # pieces < i of h_or_dh hold dh already
            start = i * size
            h_i = jax.lax.dynamic_slice_in_dim(h_or_dh, start, size, axis=-1)
            out_i = {"wo": _out_projection_piece(params["wo"], start, size)}
            # The vjp's primal output is unused (dead code for XLA).
            dh_i, d_out_i = jax.vjp(output, h_i.reshape(*h.shape[:-1], -1), out_i)[1](dy)
            # Computed whole before it overwrites h_i: XLA would otherwise fuse the
            # activation's backward into the update, reading h after writing it (a copy).
            dh_i = jax.lax.optimization_barrier(dh_i.reshape(h_i.shape))
            h_or_dh = jax.lax.dynamic_update_slice_in_dim(h_or_dh, dh_i, start, axis=-1)
            kernel = jax.lax.dynamic_update_slice_in_dim(
                d_out["kernel"], d_out_i["wo"]["kernel"], start, axis=-2
            )
            # Every piece's vjp gives the whole bias gradient (the sum of dy): keep one.
            bias = {"bias": d_out_i["wo"]["bias"]} if "bias" in d_out else {}
            return h_or_dh, {**d_out, "kernel": kernel, **bias}

        zero_out = jax.tree.map(jnp.zeros_like, params["wo"])
        dh, d_out = jax.lax.fori_loop(0, pieces, piece, (split, zero_out))
        in_params = {name: params[name] for name in names_in}
        dx, d_in = jax.vjp(hidden, x, in_params)[1](dh.reshape(h.shape))  # primal unused
        return dx, {**d_in, "wo": d_out}

    ffn.defvjp(forward, backward)
    return ffn
