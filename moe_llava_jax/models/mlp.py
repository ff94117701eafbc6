"""The position-wise feed-forward block: the dense FFN and, vmapped, every MoE expert.

Experts reuse this exact module (see `moe.py`), so upcycling a dense FFN into E experts
is a pure tiling of this module's params along a new leading `expert` axis.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_llava_jax.models import layers


class MLP(nn.Module):
    """`gated=True`: SwiGLU-style `wo(act(wi_gate x) * wi_up x)` (LLaMA, Qwen, StableLM);
    `gated=False`: `wo(act(wi x))` (Phi-2, CLIP)."""

    hidden_size: int
    intermediate_size: int
    activation: str
    gated: bool
    use_bias: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., embed]
        act = layers.activation(self.activation)
        up = lambda name: layers.dense(
            self.intermediate_size,
            ("embed", "mlp"),
            use_bias=self.use_bias,
            name=name,
            dtype=self.dtype,
        )
        if self.gated:
            h = act(up("wi_gate")(x)) * up("wi_up")(x)  # [..., mlp]
        else:
            h = act(up("wi")(x))  # [..., mlp]
        return layers.dense(
            self.hidden_size, ("mlp", "embed"), use_bias=self.use_bias, name="wo", dtype=self.dtype
        )(h)
