"""The position-wise feed-forward block: the dense FFN and, vmapped, every MoE expert.

Experts reuse this exact module (see `moe.py`), so upcycling a dense FFN into E experts
is a pure tiling of this module's params along a new leading `expert` axis.
"""

from __future__ import annotations

import dataclasses

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


class MLP(nn.Module):
    config: FFNConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., embed]
        cfg = self.config
        act = layers.activation(cfg.activation)
        up = lambda name: layers.dense(
            cfg.intermediate_size,
            ("embed", "mlp"),
            use_bias=cfg.use_bias,
            name=name,
            dtype=self.dtype,
        )
        if cfg.gated:
            h = act(up("wi_gate")(x)) * up("wi_up")(x)  # [..., mlp]
        else:
            h = act(up("wi")(x))  # [..., mlp]
        return layers.dense(
            cfg.hidden_size, ("mlp", "embed"), use_bias=cfg.use_bias, name="wo", dtype=self.dtype
        )(h)
