"""Batched decoding: greedy with different prompt lengths, sampling, stop predicates."""

import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.fixture(scope="module")
def tiny_lvlm():
    """A tiny random MoE-LLaVA and a ragged batch: prompts of different lengths, with and
    without an image. Returns (config, params, prompts, images)."""
    import jax
    from flax import linen as nn

    from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
    from moe_llava_jax.models.lvlm import MoELLaVA
    from moe_llava_jax.models.moe import MoEConfig
    from tests.tiny_models import tiny_lvlm_config

    config = tiny_lvlm_config(MoEConfig(layers="0"), partial_rotary_factor=0.5)
    vision = config.vision
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
    return config, params, prompts, images


def test_cached_decoding_equals_full_recompute_for_ragged_prompts(tiny_lvlm):
    """KV-cache decoding (left-padded, prefill + 1 token/step) yields exactly the tokens of
    full recomputation (right-padded); the test fails if pads are not masked."""
    from moe_llava_jax.generate import CachedDecoder
    from moe_llava_jax.models.lvlm import MoELLaVA

    config, params, prompts, images = tiny_lvlm
    model = MoELLaVA(config)
    eos = 7

    def logits_fn(ids, imgs):
        return model.apply({"params": params}, ids, imgs)[0]

    reference = greedy_generate(logits_fn, prompts, images, max_new_tokens=12, eos_id=eos, pad_id=0)
    cached = CachedDecoder(config)(params, prompts, images, max_new_tokens=12, eos_id=eos, pad_id=0)
    assert cached == reference
    assert any(len(tokens) > 3 for tokens in reference)  # the comparison covers real decoding


def test_prompt_buckets_bound_the_programs_a_benchmark_compiles(tiny_lvlm):
    """50 distinct prompt lengths (100..149 tokens) decode with 3 prefill programs (buckets
    112, 128, 160), not 50. (That the extra left pads change no answer is
    `test_cached_decoding_equals_full_recompute_for_ragged_prompts`: its prompts are padded
    to bucket 32.)"""
    from moe_llava_jax.generate import CachedDecoder, prompt_bucket

    assert [prompt_bucket(n) for n in (1, 32, 33, 100, 112, 113, 128, 129, 640, 641)] == [
        32, 32, 40, 112, 112, 128, 128, 160, 640, 768
    ]
    assert prompt_bucket(129, buckets_per_octave=8) == 144
    config, params, _, images = tiny_lvlm
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 40, n) for n in range(100, 150)]
    decoder = CachedDecoder(config)
    programs = CachedDecoder._forward._cache_size()
    for start in range(0, len(prompts), 5):  # batches of 5, as an Answerer's fixed batch size
        decoder(
            params, prompts[start : start + 5], np.zeros((5, *images.shape[1:]), np.float32),
            max_new_tokens=2, eos_id=7, pad_id=0,
        )
    # One prefill and one step program per bucket.
    assert CachedDecoder._forward._cache_size() - programs == 2 * 3


def test_next_token_greedy_and_top_p_support_and_frequencies():
    import jax

    from moe_llava_jax.generate import Sampling, next_token

    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs))[None].repeat(4000, axis=0)  # [4000, 4]
    key = jax.random.key(0)
    assert (next_token(logits, key, Sampling()) == 0).all()
    # top_p 0.5: the mass before token 1 is 0.5, not < 0.5 -> only the argmax survives
    assert (next_token(logits, key, Sampling(temperature=1.0, top_p=0.5)) == 0).all()
    # top_p 0.7: tokens {0, 1} (0.5 < 0.7, then 0.8 >= 0.7), renormalised to 0.625 / 0.375
    tokens = np.asarray(next_token(logits, key, Sampling(temperature=1.0, top_p=0.7)))
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).mean() - 0.625) < 0.03
    # top_p 1, temperature 1: the model's own distribution
    tokens = np.asarray(next_token(logits, key, Sampling(temperature=1.0)))
    assert np.allclose(np.bincount(tokens, minlength=4) / len(tokens), probs, atol=0.03)
    # temperature 2 flattens it: p ~ sqrt(probs)
    tokens = np.asarray(next_token(logits, key, Sampling(temperature=2.0)))
    flat = np.sqrt(probs) / np.sqrt(probs).sum()
    assert np.allclose(np.bincount(tokens, minlength=4) / len(tokens), flat, atol=0.03)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_cached_decoder_stop_predicate_and_seeded_sampling(tiny_lvlm):
    """A row stops at the step its stop predicate first fires (that token kept); sampling
    with one seed repeats, with another differs."""
    from moe_llava_jax.generate import CachedDecoder, Sampling

    config, params, prompts, images = tiny_lvlm
    decode = CachedDecoder(config)
    kwargs = dict(max_new_tokens=12, eos_id=-1, pad_id=0)  # eos -1: never emitted
    full = decode(params, prompts, images, **kwargs)
    assert all(len(row) == 12 for row in full)
    stop_token = full[0][4]
    stopped = decode(params, prompts, images, stop=lambda ids: ids[-1] == stop_token, **kwargs)
    for row, cut in zip(full, stopped):
        expected = row[: row.index(stop_token) + 1] if stop_token in row else row
        assert cut == expected
    hot = Sampling(temperature=3.0, top_p=0.9, seed=0)
    sampled = decode(params, prompts, images, sampling=hot, **kwargs)
    assert decode(params, prompts, images, sampling=hot, **kwargs) == sampled
    other = Sampling(temperature=3.0, top_p=0.9, seed=1)
    assert decode(params, prompts, images, sampling=other, **kwargs) != sampled
