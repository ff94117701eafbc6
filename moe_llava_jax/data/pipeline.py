"""grain pipeline: LLaVA records -> fixed-shape training batches.

The record stream is a pure function of the seed (shuffled, reshuffled every epoch); each
process reads a disjoint stride of it (multi-host). Records that cannot become an example
(missing or corrupt image, too long) are dropped from the stream and listed in the stage's
`skipped.jsonl` by `SkipLog`, so batches stay full. The iterator's position is grain state
that goes into every checkpoint (`checkpoint.save`): a resumed run continues with exactly
the records an uninterrupted run would have read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

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
from moe_llava_jax.data.sources import check_bad_fraction
from moe_llava_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a record into model inputs of static shape."""

    image_size: int
    processor: image_ops.ImageProcessor
    pad_to_square: bool
    num_image_tokens: int
    max_length: int


def load_model_image(image: str | np.ndarray | None, prep: Preprocessing) -> np.ndarray:
    """Preprocessed image [H, W, 3] f32 from a file path (JSON sources) or a decoded uint8
    array (TFDS sources); a text-only record gets zeros (its features are never spliced in:
    it has no placeholders)."""
    if image is None:
        return np.zeros((prep.image_size, prep.image_size, 3), np.float32)
    return image_ops.preprocess_image(
        image_ops.load_image(image), prep.image_size, prep.processor, prep.pad_to_square
    )


def pad_to(ids: np.ndarray, length: int, value: int) -> np.ndarray:
    return np.pad(ids, (0, length - len(ids)), constant_values=value)


# The keys of an example the model reads (the rest, e.g. `index`, stays on the host).
MODEL_INPUTS = ("input_ids", "labels", "images")


class RecordSkipped(ValueError):
    """A record that cannot become a training example; `reason` is one of
    `sources.SKIP_REASONS`, the message names the record and the problem."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def make_example(
    record: Mapping, tokenizer: Tokenizer, template: ChatTemplate, prep: Preprocessing
) -> dict[str, np.ndarray]:
    """One record -> {input_ids [T], labels [T], images [H, W, 3]}; right-padded to max_length.

    Truncation keeps the image placeholders whole: a record whose image would be cut, or whose
    every answer token would be cut, raises `RecordSkipped` naming the record (never a silently
    empty sample, the original's "loss 0.0" failure mode); so does a missing or corrupt image.
    """
    ids, labels = tokenize_conversation(
        record["conversations"], template, tokenizer, prep.num_image_tokens
    )
    where = f"record {record.get('id', record.get('index'))!r}"
    image_positions = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
    if len(image_positions) and image_positions[-1] >= prep.max_length:
        raise RecordSkipped(
            "too_long",
            f"{where}: the image placeholders end at token {image_positions[-1]}, past "
            f"data.max_length={prep.max_length}",
        )
    ids, labels = ids[: prep.max_length], labels[: prep.max_length]
    if not np.any(labels != IGNORE_INDEX):
        raise RecordSkipped(
            "too_long", f"{where}: no answer token left within data.max_length={prep.max_length}"
        )
    try:
        images = load_model_image(record.get("image"), prep)
    except FileNotFoundError as error:
        raise RecordSkipped("missing_image", f"{where}: {error}") from None
    except ValueError as error:
        raise RecordSkipped("corrupt_image", f"{where}: {error}") from None
    return {
        "input_ids": pad_to(ids, prep.max_length, tokenizer.pad_id),
        "labels": pad_to(labels, prep.max_length, IGNORE_INDEX),
        "images": images,
    }


def example_or_skip(
    position: int,
    record: Mapping,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prep: Preprocessing,
) -> dict:
    """An example (+ `index`, the record's index in its source, for tracing), or
    `{"skipped": entry}` for `SkipLog`; `position` = index in the (global, shuffled,
    repeated) record stream, which identifies the occurrence (a record recurs every epoch)."""
    try:
        return {**make_example(record, tokenizer, template, prep), "index": record["index"]}
    except RecordSkipped as error:
        return {
            "skipped": {
                "position": f"record {record.get('index')}",
                "id": record.get("id"),
                "reason": error.reason,
                "detail": str(error),
                "stream_position": position,
            }
        }


class SkipLog:
    """The grain filter that drops `{"skipped": ...}` elements and lists them in a stage's
    `skipped.jsonl`, with counts per reason.

    The file starts with the sources' load-time entries (rewritten at every start: they are a
    function of the files); entries met while reading are appended. A resumed run meets again
    the records read between the last checkpoint and the interruption, so entries are keyed
    by stream position and written once. More than `max_bad_fraction` of the first
    `min_records` (or more) read records skipped is an error showing the first ones: a wrong
    `image_root` fails in seconds instead of filtering the whole dataset away.
    """

    def __init__(
        self,
        path: str | Path,
        load_time: Sequence[dict],
        *,
        source: str,
        max_bad_fraction: float,
        min_records: int = 1000,
    ):
        self.path = Path(path)
        self.source, self.max_bad_fraction, self.min_records = source, max_bad_fraction, min_records
        previous = []
        if self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines()]
            previous = [row for row in rows if "stream_position" in row]
        self.entries = list(load_time) + previous
        self._logged = {row["stream_position"] for row in previous}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in self.entries))
        self._seen = self._skipped = 0

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            counts[entry["reason"]] = counts.get(entry["reason"], 0) + 1
        return counts

    def __call__(self, element: dict) -> bool:
        """True (keep) for an example; False for a skip marker, which is logged."""
        self._seen += 1
        if "skipped" not in element:
            return True
        self._skipped += 1
        entry = {"source": self.source, **element["skipped"]}
        if entry["stream_position"] not in self._logged:
            self._logged.add(entry["stream_position"])
            self.entries.append(entry)
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self._seen >= self.min_records and self._skipped > self.max_bad_fraction * self._seen:
            runtime = [e for e in self.entries if "stream_position" in e]
            check_bad_fraction(self.source, runtime, self._seen, self.max_bad_fraction)
        return False


def training_dataset(
    source: Sequence,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prep: Preprocessing,
    skip_log: SkipLog,
    *,
    global_batch_size: int,
    seed: int,
    workers: int = 0,
) -> grain.IterDataset:
    """Infinite dataset of this process's share of each global batch (numpy dicts).

    Epochs are reshuffled with `seed`. Process p of n reads rows [p*B/n, (p+1)*B/n) of every
    global batch of B consecutive stream records — the rows its devices hold — so a global
    batch has the same records in the same order whatever the number of processes (as long
    as no record is skipped), and a multi-host run computes what a single host would.
    Examples are built in `workers` processes (0: reader threads of this process); skip
    markers are filtered (and logged) here, after the workers, in this process.
    """
    num_processes, process = jax.process_count(), jax.process_index()
    if global_batch_size % num_processes:
        raise ValueError(
            f"batch_size={global_batch_size} is not divisible by {num_processes} processes"
        )
    local = global_batch_size // num_processes
    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)

    def stream_position(i: int) -> int:  # this process's i-th record -> its stream position
        return (i // local) * global_batch_size + process * local + i % local

    examples = (
        grain.MapDataset.range(len(stream))
        .map(stream_position)
        .map(
            lambda position: example_or_skip(position, stream[position], tokenizer, template, prep)
        )
        .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
    )
    if workers:
        examples = examples.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return examples.filter(skip_log).batch(local, drop_remainder=True)
