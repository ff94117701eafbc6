"""POPE (Polling-based Object Probing Evaluation): probe building, file I/O and scoring.

POPE measures object hallucination with balanced yes/no questions "Is there a X in the
image?". The three splits differ only in how the absent ("no") objects are chosen, from
easy (random) to hard (adversarial: objects that usually appear next to the image's own).
Answer parsing and metrics follow the original POPE scripts exactly, quirks included, so
that numbers are comparable with published ones.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from itertools import combinations

import numpy as np

from moe_llava_jax.data.jsonl import iter_jsonl

SPLITS = ("random", "popular", "adversarial")

_YES, _NO = "yes", "no"
_NEGATION_WORDS = frozenset({"No", "not", "no"})


# ---------------------------------------------------------------------------
# Probe building
# ---------------------------------------------------------------------------


def _image_objects(annotations: Sequence[dict]) -> list[tuple[str, list[str]]]:
    """Validates annotations and returns (image, sorted unique objects) per entry.

    Objects are deduplicated and sorted so that sampling depends only on the set of
    objects, not on how an annotation file happened to list them.
    """
    result = []
    for i, ann in enumerate(annotations):
        for field in ("image", "objects"):
            if not isinstance(ann, Mapping) or field not in ann:
                raise ValueError(f"annotation {i}: missing field {field!r}")
        result.append((str(ann["image"]), sorted(set(ann["objects"]))))
    return result


def _frequencies(images: Sequence[tuple[str, list[str]]]) -> Counter:
    """Number of images containing each object (the 'popular' ranking)."""
    return Counter(obj for _, objects in images for obj in objects)


def _cooccurrences(images: Sequence[tuple[str, list[str]]]) -> Counter:
    """Number of images in which each unordered pair of distinct objects appears together."""
    return Counter(pair for _, objects in images for pair in combinations(objects, 2))


def _popular_negatives(absent: Sequence[str], k: int, freq: Counter) -> list[str]:
    return sorted(absent, key=lambda o: (-freq[o], o))[:k]


def _adversarial_negatives(
    absent: Sequence[str], k: int, present: Sequence[str], freq: Counter, cooc: Counter
) -> list[str]:
    def cooccurrence(obj: str) -> int:
        return sum(cooc[tuple(sorted((obj, p)))] for p in present)

    return sorted(absent, key=lambda o: (-cooccurrence(o), -freq[o], o))[:k]


def _probe(question_id: int, image: str, obj: str, split: str, label: str) -> dict:
    return {
        "question_id": question_id,
        "image": image,
        "text": f"Is there a {obj} in the image?",
        "object": obj,
        "category": split,
        "label": label,
    }


def build_pope_probes(
    annotations: Sequence[dict], split: str, *, num_per_image: int = 3, seed: int = 0
) -> list[dict]:
    """Builds balanced POPE yes/no probes for one split.

    Per image, k = min(num_per_image, #present, #absent) positives are sampled from its
    objects and k negatives are chosen among absent vocabulary objects according to
    `split`, so every image contributes equally many "yes" and "no" probes. Probes
    alternate yes/no so that any prefix of the list stays (nearly) balanced.

    Positives and random negatives use two independent streams spawned from
    `numpy.random.default_rng(seed)`: with the same seed all three splits ask about the
    same present objects and differ only in their negatives, as POPE intends.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")
    if num_per_image < 1:
        raise ValueError(f"num_per_image must be >= 1, got {num_per_image}")
    images = _image_objects(annotations)
    freq = _frequencies(images)
    cooc = _cooccurrences(images) if split == "adversarial" else Counter()
    vocabulary = sorted(freq)
    positive_rng, negative_rng = np.random.default_rng(seed).spawn(2)

    probes: list[dict] = []
    for image, present in images:
        present_set = set(present)
        absent = [o for o in vocabulary if o not in present_set]
        k = min(num_per_image, len(present), len(absent))
        positives = [present[i] for i in positive_rng.choice(len(present), k, replace=False)]
        if split == "random":
            negatives = [absent[i] for i in negative_rng.choice(len(absent), k, replace=False)]
        elif split == "popular":
            negatives = _popular_negatives(absent, k, freq)
        else:
            negatives = _adversarial_negatives(absent, k, present, freq, cooc)
        for pos, neg in zip(positives, negatives):
            probes.append(_probe(len(probes), image, pos, split, _YES))
            probes.append(_probe(len(probes), image, neg, split, _NO))
    return probes


# ---------------------------------------------------------------------------
# File formats
# ---------------------------------------------------------------------------


def _read_jsonl(path: str | os.PathLike, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) per line; a non-object or a missing field fails with file:line."""
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {lineno}: expected a JSON object")
        for field in required:
            if field not in row:
                raise ValueError(f"{path}: line {lineno}: missing field {field!r}")
        yield lineno, row


def read_pope_questions(path: str | os.PathLike) -> list[dict]:
    """Reads a POPE question file (`question_id`, `image`, `text`, optional `category`)."""
    return [row for _, row in _read_jsonl(path, ("question_id", "image", "text"))]


def read_pope_labels(path: str | os.PathLike) -> list[str]:
    """Reads the labels of a POPE label file, in file order.

    Accepts both label-only lines and POPE's original annotation files, whose lines also
    carry `question_id`, `image` and `text`; only `label` is required. Labels must be
    "yes" or "no" because anything else would silently count as a negative.
    """
    labels = []
    for lineno, row in _read_jsonl(path, ("label",)):
        if row["label"] not in (_YES, _NO):
            raise ValueError(
                f"{path}: line {lineno}: field 'label' is {row['label']!r}, not yes/no"
            )
        labels.append(row["label"])
    return labels


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


def parse_answer(text: str) -> str:
    """Maps a free-form answer to "yes"/"no" exactly like the original POPE script.

    Only the first sentence counts; it is "no" iff one of its space-separated words is
    "No", "not" or "no" (case-sensitive, so "NO" or "Nope" read as "yes"). Kept verbatim
    so scores are comparable with published POPE numbers.
    """
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return _NO if _NEGATION_WORDS.intersection(words) else _YES


def _safe_div(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def score(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE metrics with "yes" as the positive class; raw answers go through parse_answer.

    Undefined ratios (e.g. precision with no "yes" predictions) are 0.0 rather than an
    error, so a degenerate model still produces a table row.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    bad = [label for label in labels if label not in (_YES, _NO)]
    if bad:
        raise ValueError(f"labels must be 'yes' or 'no', got {bad[0]!r}")
    parsed = [parse_answer(p) for p in predictions]
    pairs = Counter(zip(parsed, labels))
    tp, fp = pairs[(_YES, _YES)], pairs[(_YES, _NO)]
    tn, fn = pairs[(_NO, _NO)], pairs[(_NO, _YES)]
    n = len(labels)
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    return {
        "accuracy": _safe_div(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _safe_div(2 * precision * recall, precision + recall),
        "yes_ratio": _safe_div(tp + fp, n),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


_TABLE_COLUMNS = (
    ("Accuracy", "accuracy"),
    ("Precision", "precision"),
    ("Recall", "recall"),
    ("F1", "f1"),
    ("Yes-ratio", "yes_ratio"),
)


# What the papers average over POPE's three splits (LLaVA-1.5's single number: mean F1).
MEAN_METRICS = ("accuracy", "f1")


def split_means(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The MEAN_METRICS averaged over the splits in `results` (split -> `score` metrics)."""
    return {m: sum(r[m] for r in results.values()) / len(results) for m in MEAN_METRICS}


def markdown_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Renders per-split results as a markdown table; a metric a row lacks (a `split_means`
    row has accuracy and F1 only) is shown as "-".

    The standard splits come first in canonical order (easy to hard); any other row
    names (e.g. "stage2/random", "mean") follow in the order given.
    """
    names = [s for s in SPLITS if s in results] + [n for n in results if n not in SPLITS]
    header = "| Split | " + " | ".join(title for title, _ in _TABLE_COLUMNS) + " |"
    rule = "|---" * (len(_TABLE_COLUMNS) + 1) + "|"
    cell = lambda row, key: f"{row[key]:.3f}" if key in row else "-"
    rows = [
        f"| {name} | " + " | ".join(cell(results[name], key) for _, key in _TABLE_COLUMNS) + " |"
        for name in names
    ]
    return "\n".join([header, rule, *rows])
