"""ViT vision tower (CLIP- and SigLIP-style) returning the features LLaVA feeds its projector.

LLaVA takes the hidden state of layer `select_layer` (default -2: the penultimate block's
output, without the post-LN) rather than the final output, so only the blocks up to that
layer are run here. `select_feature="patch"` drops the first token: the CLS token for CLIP,
and -- the original's quirk -- the first patch for SigLIP, which has no CLS token.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from moe_llava_jax.models import layers, scan
from moe_llava_jax.models.attention import Attention, AttentionKernel
from moe_llava_jax.models.mlp import MLP, FFNConfig


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    activation: str = "quick_gelu"  # CLIP; SigLIP: gelu_new
    norm_eps: float = 1e-5
    class_token: bool = True  # CLIP: True; SigLIP: False
    pre_norm: bool = True  # CLIP's `pre_layrnorm` on the embeddings; SigLIP: False
    patch_bias: bool = False  # CLIP: False; SigLIP: True
    select_layer: int = -2  # index into the HF hidden_states tuple (embeddings + every block)
    select_feature: str = "patch"  # "patch" (drop the first token) | "all"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """How many features the tower returns per image: the `<image>` expansion length."""
        seq = self.num_patches + int(self.class_token)
        return seq - 1 if self.select_feature == "patch" else seq

    @property
    def num_blocks_to_run(self) -> int:
        """hidden_states[i] is the output of block i-1 (index 0: the embeddings)."""
        num_states = self.num_layers + 1
        if not -num_states <= self.select_layer < num_states:
            raise ValueError(
                f"config key model.vision.select_layer={self.select_layer} out of range "
                f"for {self.num_layers} layers"
            )
        return self.select_layer % num_states


class VisionBlock(nn.Module):
    """x [batch, tokens, embed] -> (x, None): the (carry, per-layer output) form `nn.scan`
    takes, so the loop and the scan run the same module."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32  # compute dtype; params stay float32
    attention: AttentionKernel = AttentionKernel()

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.config
        x = layers.batch_sharded(x)
        h = layers.norm("layernorm", cfg.norm_eps, name="norm1", dtype=self.dtype)(x)
        x = x + Attention(
            cfg.num_heads,
            cfg.num_heads,
            cfg.hidden_size // cfg.num_heads,
            qkv_bias=True,
            out_bias=True,
            causal=False,
            dtype=self.dtype,
            kernel=self.attention,
            name="attn",
        )(h)
        h = layers.norm("layernorm", cfg.norm_eps, name="norm2", dtype=self.dtype)(x)
        ffn_cfg = FFNConfig(
            cfg.hidden_size, cfg.intermediate_size, cfg.activation, gated=False, use_bias=True
        )
        return layers.batch_sharded(x + MLP(ffn_cfg, self.dtype, name="mlp")(h)), None


class VisionUnit(nn.Module):
    """The scanned unit: one block named as the layouts of `scan.py` expect (`block_0`)."""

    config: VisionConfig
    dtype: jnp.dtype
    attention: AttentionKernel

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        return VisionBlock(self.config, self.dtype, self.attention, name="block_0")(x)


class VisionTower(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32  # compute dtype (as the decoder's; params stay float32)
    scan_layers: bool = False  # the blocks that run as one `nn.scan` (`scan.py`); same math
    attention: AttentionKernel = AttentionKernel()  # how attention is computed; same math

    @property
    def plan(self) -> scan.Plan:
        blocks = self.config.num_blocks_to_run
        return scan.plan_uniform(blocks) if self.scan_layers else scan.looped((None,) * blocks)

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images: [batch, H, W, 3] normalised floats -> features [batch, num_image_tokens, embed]."""
        cfg = self.config
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images are {images.shape[1:3]}, model.vision.image_size is {cfg.image_size}"
            )
        # A stride-p convolution ignores the last (size mod p) rows and columns (SigLIP 384/14).
        usable = (cfg.image_size // cfg.patch_size) * cfg.patch_size
        patches = rearrange(
            images[:, :usable, :usable],
            "b (h p) (w q) c -> b (h w) (p q c)",
            p=cfg.patch_size,
            q=cfg.patch_size,
        )
        x = layers.dense(
            cfg.hidden_size,
            ("patch", "embed"),
            use_bias=cfg.patch_bias,
            name="patch_embed",
            dtype=self.dtype,
        )(patches)  # [b, num_patches, embed]
        if cfg.class_token:
            cls = self.param(
                "class_embedding",
                layers.logical_init(nn.initializers.normal(0.02), ("embed",)),
                (cfg.hidden_size,),
            )
            x = jnp.concatenate(
                [jnp.broadcast_to(cls, (x.shape[0], 1, cfg.hidden_size)), x], axis=1
            )
        pos = self.param(
            "position_embedding",
            layers.logical_init(nn.initializers.normal(0.02), (None, "embed")),
            (x.shape[1], cfg.hidden_size),
        )
        x = (x + pos).astype(self.dtype)
        if cfg.pre_norm:
            x = layers.norm("layernorm", cfg.norm_eps, name="pre_norm", dtype=self.dtype)(x)
        for segment in self.plan:
            block = VisionBlock
            if segment.scanned:
                block = scan.scan_unit(VisionUnit, segment.repeats, num_broadcast_args=0)
            x, _ = block(cfg, self.dtype, self.attention, name=segment.name)(x)
        return x[:, 1:] if cfg.select_feature == "patch" else x
