"""POPE with a model: build the probes, answer them (greedy, batched), score them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moe_llava_jax.answering import Answerer
from moe_llava_jax.data.jsonl import write_jsonl
from moe_llava_jax.evaluate import pope


def evaluate_pope(
    answerer: Answerer,
    annotations: Sequence[dict],
    image_root: Path,
    *,
    splits: Sequence[str],
    num_per_image: int,
    seed: int,
    answers_dir: Path | None = None,
) -> dict[str, dict]:
    """Metrics per split; with `answers_dir`, also writes POPE-format question/answer files."""
    results = {}
    for split in splits:
        probes = pope.build_pope_probes(annotations, split, num_per_image=num_per_image, seed=seed)
        answers = answerer(
            [p["text"] for p in probes], [str(image_root / p["image"]) for p in probes]
        )
        results[split] = pope.score(answers, [p["label"] for p in probes])
        if answers_dir is not None:
            write_jsonl(
                answers_dir / f"pope_{split}_answers.jsonl",
                [{**p, "answer": a} for p, a in zip(probes, answers)],
            )
    return results
