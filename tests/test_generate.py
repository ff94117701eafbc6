"""Batched greedy decoding with different prompt lengths."""

import jax.numpy as jnp
import numpy as np

from moe_llava_jax.generate import greedy_generate

VOCAB, EOS, PAD = 10, 9, 0


def successor_logits(ids, images):
    """A 'model' whose next token is (token + 1) mod 9, and EOS after a 5."""
    del images
    nxt = jnp.where(ids == 5, EOS, (ids + 1) % 9)
    return jnp.eye(VOCAB)[nxt] * 10.0


def test_greedy_stops_per_row_at_eos_and_excludes_it():
    prompts = [np.array([1, 2]), np.array([3]), np.array([7, 8, 6, 7])]
    out = greedy_generate(
        successor_logits, prompts, np.zeros((3, 1)), max_new_tokens=6, eos_id=EOS, pad_id=PAD
    )
    assert out[0] == [3, 4, 5]
    assert out[1] == [4, 5]
    assert out[2] == [8, 0, 1, 2, 3, 4]  # hits max_new_tokens before EOS


def test_cached_decoding_equals_full_recompute_for_ragged_prompts():
    """KV-cache decoding (left-padded, prefill + 1 token/step) yields exactly the tokens of
    full recomputation (right-padded) on a tiny random MoE-LLaVA, for prompts of different
    lengths with and without an image."""
    import jax
    from flax import linen as nn

    from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
    from moe_llava_jax.generate import CachedGreedyDecoder
    from moe_llava_jax.models.decoder import DecoderConfig
    from moe_llava_jax.models.lvlm import LVLMConfig, MoELLaVA
    from moe_llava_jax.models.moe import MoEConfig
    from moe_llava_jax.models.vision import VisionConfig

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
        partial_rotary_factor=0.5,
        moe=MoEConfig(layers="0"),
    )
    config = LVLMConfig(vision=vision, decoder=decoder)
    model = MoELLaVA(config)
    n = vision.num_image_tokens
    rng = np.random.default_rng(0)
    prompts = [
        np.concatenate([[3, 4], [IMAGE_TOKEN_INDEX] * n, rng.integers(1, 40, 5)]),
        rng.integers(1, 40, 3),  # text only, shortest
        np.concatenate([[IMAGE_TOKEN_INDEX] * n, rng.integers(1, 40, 9)]),
    ]
    images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), jnp.zeros((3, 8), jnp.int32), jnp.asarray(images))
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    params = jax.tree.map(  # large random weights: well-separated logits, no argmax ties
        lambda x: 0.5 * jax.random.normal(next(keys), x.shape), nn.unbox(variables["params"])
    )
    eos = 7

    def logits_fn(ids, imgs):
        return model.apply({"params": params}, ids, imgs)[0]

    reference = greedy_generate(logits_fn, prompts, images, max_new_tokens=12, eos_id=eos, pad_id=0)
    cached = CachedGreedyDecoder(config)(
        params, prompts, images, max_new_tokens=12, eos_id=eos, pad_id=0
    )
    assert cached == reference
    assert any(len(tokens) > 3 for tokens in reference)  # the comparison covers real decoding
