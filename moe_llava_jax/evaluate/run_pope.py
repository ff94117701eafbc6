"""POPE with a model: build the probes, answer them greedily in batches, score them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moe_llava_jax.data.conversation import IMAGE_PLACEHOLDER, ChatTemplate, tokenize_prompt
from moe_llava_jax.data.pipeline import Preprocessing, load_model_image
from moe_llava_jax.data.tokenizer import Tokenizer
from moe_llava_jax.data.jsonl import write_jsonl
from moe_llava_jax.evaluate import pope
from moe_llava_jax.generate import GenerateFn


def answer_probes(
    generate: GenerateFn,
    probes: Sequence[dict],
    image_root: Path,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prep: Preprocessing,
    *,
    batch_size: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers, one per probe. The last batch is padded with copies of its last probe
    so that every batch has the same shape (one compilation)."""
    answers = []
    for start in range(0, len(probes), batch_size):
        chunk = list(probes[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        prompts = [
            tokenize_prompt(
                f"{IMAGE_PLACEHOLDER}\n{p['text']}", template, tokenizer, prep.num_image_tokens
            )
            for p in chunk
        ]
        images = np.stack([load_model_image(str(image_root / p["image"]), prep) for p in chunk])
        outputs = generate(
            prompts,
            images,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
        )
        answers += [tokenizer.decode(ids) for ids in outputs[:real]]
    return answers


def evaluate_pope(
    generate: GenerateFn,
    annotations: Sequence[dict],
    image_root: Path,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prep: Preprocessing,
    *,
    splits: Sequence[str],
    num_per_image: int,
    seed: int,
    batch_size: int,
    max_new_tokens: int,
    answers_dir: Path | None = None,
) -> dict[str, dict]:
    """Metrics per split; with `answers_dir`, also writes POPE-format question/answer files."""
    results = {}
    for split in splits:
        probes = pope.build_pope_probes(annotations, split, num_per_image=num_per_image, seed=seed)
        answers = answer_probes(
            generate,
            probes,
            image_root,
            tokenizer,
            template,
            prep,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
        results[split] = pope.score(answers, [p["label"] for p in probes])
        if answers_dir is not None:
            write_jsonl(
                answers_dir / f"pope_{split}_answers.jsonl",
                [{**p, "answer": a} for p, a in zip(probes, answers)],
            )
    return results
