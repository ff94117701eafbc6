"""The position-wise feed-forward block: the dense FFN and every MoE expert.

`ffn_apply` is the one definition of the FFN's math; `MLP` runs it with its own dense layers,
and the MoE layer runs it on its experts' stacked `[E, ...]` params (declared by this module
vmapped over E, see `moe.py`), so upcycling a dense FFN into E experts is a pure tiling of
these params along a new leading `expert` axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_llava_jax.models import layers


@dataclasses.dataclass(frozen=True)
class FFNConfig:
    """`gated=True`: SwiGLU-style `wo(act(wi_gate x) * wi_up x)` (LLaMA, Qwen, StableLM);
    `gated=False`: `wo(act(wi x))` (Phi-2, CLIP)."""

    hidden_size: int
    intermediate_size: int
    activation: str
    gated: bool
    use_bias: bool


# (x [..., in], projection names, e.g. ("wi_gate", "wi_up") or ("wo",)) -> x [..., in] times
# the named projections side by side: [..., sum of their outs]
Project = Callable[[jax.Array, tuple[str, ...]], jax.Array]


def ffn_apply(x: jax.Array, config: FFNConfig, project: Project) -> jax.Array:
    """The FFN on x [..., embed], each projection done by `project` (a dense layer, a batched
    matmul over expert buffers, or a grouped matmul over rows sorted by expert). The gate and
    up projections of a gated FFN are asked for together, so that an implementation may run
    them as one matmul (dropless does: one pass of its block loop instead of two)."""
    return project(activate(config, project(x, in_projections(config))), ("wo",))


def in_projections(config: FFNConfig) -> tuple[str, ...]:
    """The projections from embed to the hidden (mlp) units, in `project`'s output order."""
    return ("wi_gate", "wi_up") if config.gated else ("wi",)


def activate(config: FFNConfig, h: jax.Array) -> jax.Array:
    """The in-projections' outputs side by side [..., n x mlp] -> the hidden units [..., mlp]:
    act(gate) * up (gated), act(h) otherwise. Elementwise per hidden unit, which is what lets
    `pieced_ffn` run the backward one slice of the mlp axis at a time."""
    act = layers.activation(config.activation)
    if config.gated:
        gate, up = jnp.split(h, 2, axis=-1)  # [..., mlp] each
        return act(gate) * up
    return act(h)


def joined_projections(params: Mapping[str, Mapping[str, jax.Array]], names: tuple[str, ...]):
    """The projections `names` of `params` as one: kernels [..., in, out] and biases [..., out]
    concatenated along out (the order of `names`)."""
    joined = {"kernel": jnp.concatenate([params[n]["kernel"] for n in names], axis=-1)}
    if "bias" in params[names[0]]:
        joined["bias"] = jnp.concatenate([params[n]["bias"] for n in names], axis=-1)
    return joined


class MLP(nn.Module):
    config: FFNConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., embed]
        cfg = self.config

        def linear(h: jax.Array, name: str) -> jax.Array:
            out = name == "wo"
            return layers.dense(
                cfg.hidden_size if out else cfg.intermediate_size,
                ("mlp", "embed") if out else ("embed", "mlp"),
                use_bias=cfg.use_bias,
                name=name,
                dtype=self.dtype,
            )(h)

        def project(h: jax.Array, names: tuple[str, ...]) -> jax.Array:
            # One module per projection (params as the checkpoints name them), side by side.
            return jnp.concatenate([linear(h, name) for name in names], axis=-1)

        return ffn_apply(x, cfg, project)
