"""Vision -> text projector: `linear` or LLaVA's `mlp{N}x_gelu` (N linears, GELU between)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_llava_jax.models import layers


def projector_depth(kind: str) -> int:
    """Number of linear layers for a projector name (`linear` -> 1, `mlp2x_gelu` -> 2)."""
    if kind == "linear":
        return 1
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match or int(match.group(1)) < 1:
        raise ValueError(
            f"config key model.projector={kind!r}: expected 'linear' or 'mlp<N>x_gelu'"
        )
    return int(match.group(1))


class Projector(nn.Module):
    kind: str
    out_features: int
    dtype: jnp.dtype = jnp.float32  # compute dtype; params stay float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, tokens, vision] -> [.., embed]
        depth = projector_depth(self.kind)
        for i in range(depth):
            if i:
                x = jax.nn.gelu(x, approximate=False)  # torch.nn.GELU() is the exact erf form
            axes = ("vision_embed" if i == 0 else "mlp", "mlp" if i < depth - 1 else "embed")
            x = layers.dense(
                self.out_features, axes, use_bias=True, name=f"fc_{i}", dtype=self.dtype
            )(x)
        return x
