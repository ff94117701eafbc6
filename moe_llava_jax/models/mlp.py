"""The position-wise feed-forward block: the dense FFN and every MoE expert.

`ffn_apply` is the one definition of the FFN's math; `MLP` runs it with its own dense layers,
and the MoE layer runs it on its experts' stacked `[E, ...]` params (declared by this module
vmapped over E, see `moe.py`), so upcycling a dense FFN into E experts is a pure tiling of
these params along a new leading `expert` axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

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


# (x [..., in], projection name: wi_gate | wi_up | wi | wo) -> x @ W_name + b_name [..., out]
Project = Callable[[jax.Array, str], jax.Array]


def ffn_apply(x: jax.Array, config: FFNConfig, project: Project) -> jax.Array:
    """The FFN on x [..., embed], each projection done by `project` (a dense layer, a batched
    matmul over expert buffers, or a grouped matmul over rows sorted by expert)."""
    act = layers.activation(config.activation)
    if config.gated:
        h = act(project(x, "wi_gate")) * project(x, "wi_up")  # [..., mlp]
    else:
        h = act(project(x, "wi"))  # [..., mlp]
    return project(h, "wo")  # [..., embed]


class MLP(nn.Module):
    config: FFNConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., embed]
        cfg = self.config

        def project(h: jax.Array, name: str) -> jax.Array:
            out = name == "wo"
            return layers.dense(
                cfg.hidden_size if out else cfg.intermediate_size,
                ("mlp", "embed") if out else ("embed", "mlp"),
                use_bias=cfg.use_bias,
                name=name,
                dtype=self.dtype,
            )(h)

        return ffn_apply(x, cfg, project)
