"""MoE-LLaVA: vision tower -> projector -> image features spliced into the token sequence
-> decoder (dense or MoE FFNs).

The data pipeline expands each `<image>` into `num_image_tokens` placeholder ids
(`IMAGE_TOKEN_INDEX`), so sequence shapes are static under `jit`; the model overwrites the
placeholders' embeddings with the image features in order.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
from moe_llava_jax.models import pixels, scan
from moe_llava_jax.models.attention import AttentionKernel
from moe_llava_jax.models.decoder import Decoder, DecoderConfig
from moe_llava_jax.models.projector import Projector
from moe_llava_jax.models.vision import VisionConfig, VisionTower


# `model.dtype` values: the compute dtype. No float16: it would need loss scaling.
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LVLMConfig:
    """`dtype` is the compute dtype of the vision tower, the projector and the decoder
    (params stay float32 master weights; see `models/decoder.py` for what stays float32
    inside); `remat` applies to the decoder, where nearly all of a step's activation memory
    is."""

    vision: VisionConfig
    decoder: DecoderConfig
    projector: str = "mlp2x_gelu"
    dtype: str = "float32"  # a COMPUTE_DTYPES name
    remat: str = "none"  # a decoder.REMAT_POLICIES name
    scan_layers: bool = True  # repeating blocks under `nn.scan` (`models/scan.py`)
    attention: str = "auto"  # an attention.IMPLEMENTATIONS name (`models/attention.py`)
    attention_chunk: int = 256  # xla attention: queries per chunk (0: all at once)
    platform: str = ""  # where it runs, for `auto` kernels ("": the default backend)
    # The image processor's normalisation of uint8 pixels (`models/pixels.py`).
    pixel_mean: pixels.Triple = pixels.CLIP_MEAN
    pixel_std: pixels.Triple = pixels.CLIP_STD

    @property
    def attention_kernel(self) -> AttentionKernel:
        return AttentionKernel(self.attention, self.attention_chunk, self.platform)


def layer_plans(config: LVLMConfig) -> scan.Plans:
    """The scan plans of the model's two stacks, for `scan.stack_layers` / `unstack_layers`
    on its param tree (and on its sown intermediates and KV cache)."""
    return {
        "vision": VisionTower(config.vision, scan_layers=config.scan_layers).plan,
        "decoder": Decoder(config.decoder, scan_layers=config.scan_layers).plan,
    }


def splice_image_features(
    embeds: jax.Array, input_ids: jax.Array, features: jax.Array
) -> jax.Array:
    """Replaces placeholder positions of embeds [b, t, d] with features [b, m * n, d] (a row's
    m image slots of n tokens each) in order.

    Row b must hold a whole number of images' placeholders, at most m (a text-only sample:
    none; a packed row: its examples' images in order); the pipeline checks it.
    """
    is_image = input_ids == IMAGE_TOKEN_INDEX  # [b, t]
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)  # [b, t]
    gathered = jnp.take_along_axis(features, index[..., None], axis=1)  # [b, t, d]
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


class MoELLaVA(nn.Module):
    config: LVLMConfig

    def setup(self):
        if self.config.dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"config key model.dtype={self.config.dtype!r}: expected one of {COMPUTE_DTYPES}"
            )
        dtype = jnp.dtype(self.config.dtype)
        cfg = self.config
        kernel = cfg.attention_kernel
        self.vision = VisionTower(cfg.vision, dtype, scan_layers=cfg.scan_layers, attention=kernel)
        self.projector = Projector(cfg.projector, cfg.decoder.hidden_size, dtype)
        self.decoder = Decoder(
            cfg.decoder,
            dtype=dtype,
            remat=cfg.remat,
            scan_layers=cfg.scan_layers,
            attention=kernel,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        images: jax.Array | None,
        deterministic: bool = True,
        positions: jax.Array | None = None,
        segments: jax.Array | None = None,
        decode: bool = False,
        head: bool = True,
    ) -> tuple[jax.Array, dict]:
        """input_ids [b, t] (placeholders = IMAGE_TOKEN_INDEX), images [b, H, W, 3] (one per
        row), [b, m, H, W, 3] (m slots per row: packed rows) or None (no placeholders in
        input_ids: a decoding step) -> logits [b, t, vocab], MoE stats.

        positions [b, t] default to 0..t-1 and segments [b, t] (`models/attention.py`) to
        one sequence per row; left-padded and packed batches pass both. `decode` appends to
        the attention KV cache ("cache" collection).
        `head=False` returns the final-normed hidden states [b, t, d] instead of the logits
        (`logits` maps them; `answer_loss.py` applies it to the supervised positions only).
        """
        embeds = self.decoder.embed(input_ids)
        if images is not None:
            images = pixels.model_input(images, self.config.pixel_mean, self.config.pixel_std)
            slots = images.reshape(-1, *images.shape[-3:])  # [b m, H, W, 3]
            features = self.projector(self.vision(slots))  # [b m, n, d]
            features = features.reshape(embeds.shape[0], -1, features.shape[-1])  # [b, m n, d]
            embeds = splice_image_features(embeds, input_ids, features)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        return self.decoder(embeds, positions, segments, deterministic, decode, head)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states [..., d] -> f32 logits [..., vocab] (the LM head)."""
        return self.decoder.logits(hidden)
