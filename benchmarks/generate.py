"""Greedy decoding speed: KV cache vs full recomputation, side by side in one process.

    python -m benchmarks.generate [--new_tokens 256] [--repeats 3]

Model: the tiny MoE-LLaVA of `configs/moe_tuning.py` (random weights; EOS disabled so every
row decodes all new tokens). Prints tokens/s per decoder and batch size and their ratio
(medians over repeats, after a warm-up call that compiles).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import linen as nn

from configs import common
from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
from moe_llava_jax.generate import CachedDecoder, greedy_generate
from moe_llava_jax.models.decoder import DecoderConfig
from moe_llava_jax.models.lvlm import LVLMConfig, MoELLaVA
from moe_llava_jax.models.moe import MoEConfig
from moe_llava_jax.models.vision import VisionConfig


def tiny_model(vocab_size: int) -> LVLMConfig:
    model = common.tiny_model()
    decoder = dict(model.decoder.to_dict(), vocab_size=vocab_size)
    return LVLMConfig(
        vision=VisionConfig(**model.vision.to_dict()),
        decoder=DecoderConfig(**decoder, moe=MoEConfig(**model.moe.to_dict())),
        projector=model.projector,
    )


def median_seconds(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_sizes", default="1,8")
    args = parser.parse_args()

    config = tiny_model(vocab_size=512)
    model = MoELLaVA(config)
    size = config.vision.image_size
    rng = np.random.default_rng(0)
    prompt = np.concatenate(
        [
            rng.integers(1, 512, 30),
            [IMAGE_TOKEN_INDEX] * config.vision.num_image_tokens,
            rng.integers(1, 512, 12),
        ]
    )
    params = nn.unbox(
        model.init(jax.random.key(0), prompt[None], np.zeros((1, size, size, 3), np.float32))[
            "params"
        ]
    )
    cached = CachedDecoder(config)
    recompute_logits = jax.jit(lambda ids, images: model.apply({"params": params}, ids, images)[0])
    kwargs = dict(max_new_tokens=args.new_tokens, eos_id=-1, pad_id=0)  # -1: never stops

    print(f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, {jax.devices()[0]}")
    print("| batch | full recompute tok/s | KV cache tok/s | speed-up |")
    print("|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = [prompt] * batch
        images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
        slow = median_seconds(
            lambda: greedy_generate(recompute_logits, prompts, images, **kwargs), args.repeats
        )
        fast = median_seconds(lambda: cached(params, prompts, images, **kwargs), args.repeats)
        tokens = batch * args.new_tokens
        print(f"| {batch} | {tokens / slow:,.0f} | {tokens / fast:,.0f} | {slow / fast:.1f}x |")


if __name__ == "__main__":
    main()
