"""A tiny MoE-LLaVA config shared by tests that need a whole model (fast to build and run)."""

from moe_llava_jax.models.decoder import DecoderConfig
from moe_llava_jax.models.lvlm import LVLMConfig
from moe_llava_jax.models.moe import MoEConfig
from moe_llava_jax.models.vision import VisionConfig


def tiny_lvlm_config(moe: MoEConfig, **decoder_overrides) -> LVLMConfig:
    """16-px images in 4 patches, 2-layer tower, 2-layer decoder (vocab 40, GQA 4/2 heads)."""
    vision = VisionConfig(
        image_size=16, patch_size=8, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
    )
    decoder = DecoderConfig(
        vocab_size=40,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        norm="rmsnorm",
        moe=moe,
        **decoder_overrides,
    )
    return LVLMConfig(vision=vision, decoder=decoder)
