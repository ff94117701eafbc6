"""grain pipeline: LLaVA records -> fixed-shape training batches.

Order is a pure function of (seed, step): `batches[step]` is random access, so a run resumed
at step s reads exactly the batches an uninterrupted run would have read from step s on.
Each process reads a disjoint stride of the shuffled record stream (multi-host).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import grain
import jax
import numpy as np

from moe_llava_jax.data import images as image_ops
from moe_llava_jax.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    ChatTemplate,
    tokenize_conversation,
)
from moe_llava_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a record into model inputs of static shape."""

    image_size: int
    processor: image_ops.ImageProcessor
    pad_to_square: bool
    num_image_tokens: int
    max_length: int


def load_model_image(path: str | None, prep: Preprocessing) -> np.ndarray:
    """Preprocessed image [H, W, 3] f32; a text-only record gets zeros (its features are never
    spliced in: it has no placeholders)."""
    if path is None:
        return np.zeros((prep.image_size, prep.image_size, 3), np.float32)
    return image_ops.preprocess_image(
        image_ops.load_image(path), prep.image_size, prep.processor, prep.pad_to_square
    )


def pad_to(ids: np.ndarray, length: int, value: int) -> np.ndarray:
    return np.pad(ids, (0, length - len(ids)), constant_values=value)


def make_example(
    record: Mapping, tokenizer: Tokenizer, template: ChatTemplate, prep: Preprocessing
) -> dict[str, np.ndarray]:
    """One record -> {input_ids [T], labels [T], images [H, W, 3]}; right-padded to max_length.

    Truncation keeps the image placeholders whole: a record whose image would be cut, or whose
    every answer token would be cut, is an error naming the record (never a silently empty
    sample, the original's "loss 0.0" failure mode).
    """
    ids, labels = tokenize_conversation(
        record["conversations"], template, tokenizer, prep.num_image_tokens
    )
    where = f"record {record.get('id', record.get('index'))!r}"
    image_positions = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
    if len(image_positions) and image_positions[-1] >= prep.max_length:
        raise ValueError(
            f"{where}: the image placeholders end at token {image_positions[-1]}, past "
            f"data.max_length={prep.max_length}"
        )
    ids, labels = ids[: prep.max_length], labels[: prep.max_length]
    if not np.any(labels != IGNORE_INDEX):
        raise ValueError(f"{where}: no answer token left within data.max_length={prep.max_length}")
    return {
        "input_ids": pad_to(ids, prep.max_length, tokenizer.pad_id),
        "labels": pad_to(labels, prep.max_length, IGNORE_INDEX),
        "images": load_model_image(record.get("image"), prep),
    }


def training_batches(
    source: Sequence,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prep: Preprocessing,
    *,
    global_batch_size: int,
    seed: int,
) -> grain.MapDataset:
    """Infinite `MapDataset` of this process's share of each global batch (numpy dicts).

    Epochs are reshuffled with `seed`; process p of n takes records p, p+n, ... of the stream.
    """
    num_processes = jax.process_count()
    if global_batch_size % num_processes:
        raise ValueError(
            f"batch_size={global_batch_size} is not divisible by {num_processes} processes"
        )
    return (
        grain.MapDataset.source(source)
        .shuffle(seed=seed)
        .repeat(None)
        .slice(slice(jax.process_index(), None, num_processes))
        .map(lambda record: make_example(record, tokenizer, template, prep))
        .batch(global_batch_size // num_processes, drop_remainder=True)
    )


def iterate_from(batches: grain.MapDataset, start_step: int, num_threads: int = 2):
    """Iterator over batches[start_step:], prefetched by `num_threads` reader threads."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
    return iter(batches.slice(slice(start_step, None)).to_iter_dataset(options))
