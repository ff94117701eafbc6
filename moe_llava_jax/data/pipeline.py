"""grain pipeline: LLaVA records -> fixed-shape training batches.

A row is one example right-padded to `max_length` (`data.packing="none"`), to the shortest
of a few bucket lengths that holds its batch (`"bucket"`, `data/bucketing.py`), or several
examples packed first-fit into it (`"first_fit"`, `pack_first_fit`): positions restart and
segment ids number the examples, so attention never crosses an example, and each row has a
fixed number of image slots that only the examples with an image take.

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
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import grain
import jax
import numpy as np

from moe_llava_jax.data import bucketing
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


def load_model_images(image: str | np.ndarray | None, prep: Preprocessing) -> np.ndarray:
    """Preprocessed images [k, H, W, 3] uint8 (the model normalises them) from a file path
    (JSON sources) or a decoded uint8 array (TFDS sources): k = 1, or 0 for a text-only
    record."""
    if image is None:
        return np.zeros((0, prep.image_size, prep.image_size, 3), np.uint8)
    return image_ops.preprocess_image(
        image_ops.load_image(image), prep.image_size, prep.processor, prep.pad_to_square
    )[None]


def row_image(images: np.ndarray) -> np.ndarray:
    """[k <= 1, H, W, 3] -> [H, W, 3]: an unpacked row's image; zeros for a text-only example
    (its features are never spliced in: it has no placeholders)."""
    return images[0] if len(images) else np.zeros(images.shape[1:], images.dtype)


def pad_to(ids: np.ndarray, length: int, value: int) -> np.ndarray:
    return np.pad(ids, (0, length - len(ids)), constant_values=value)


# The keys of a batch the model reads (the rest, e.g. `index`, `length`, stays on the host);
# `segments` and `positions` only packed batches have.
MODEL_INPUTS = ("input_ids", "labels", "images", "segments", "positions")
PACKINGS = ("none", "bucket", "first_fit")  # `data.packing` values


@dataclasses.dataclass(frozen=True)
class Packing:
    """How examples become rows (`data.packing` and the keys below it)."""

    mode: str = "none"  # a PACKINGS name
    # first_fit: rows filled at a time (grain emits them all when an example fits none):
    # more bins, less padding, more examples held on the host.
    bins: int = 64
    image_slots: int = 4  # first_fit: images per row (a row is full when they are taken)
    buckets: int = 4  # bucket: evenly spaced lengths up to max_length
    bucket_window: int = 16  # bucket: batches grouped at a time

    def __post_init__(self):
        if self.mode not in PACKINGS:
            raise ValueError(f"config key data.packing={self.mode!r}: expected one of {PACKINGS}")
        for key, value in (
            ("packing_bins", self.bins),
            ("image_slots", self.image_slots),
            ("buckets", self.buckets),
            ("bucket_window", self.bucket_window),
        ):
            if value < 1:
                raise ValueError(f"config key data.{key}={value} must be >= 1")


def pack_first_fit(
    examples: grain.IterDataset, prep: Preprocessing, pad_id: int, packing: Packing
) -> grain.IterDataset:
    """Unpadded examples -> packed rows {input_ids, labels [T], images [m, H, W, 3],
    segments [T] (examples 1, 2, ...; pads 0), positions [T] (restarting at each example)}.

    grain's first-fit packer fills `packing.bins` rows in stream order, an example going to
    the first row with room for its tokens and images; its state (the parent's position at
    the round's start and how far into the round) goes into checkpoints like any grain
    iterator's, so a resumed run packs the same rows. Each example's first label is
    unsupervised: the position before it (the previous example's last) must not predict it.
    """
    length = prep.max_length
    fields = ("input_ids", "labels", "images")
    packer = grain.experimental.FirstFitPackIterDataset(
        examples.map(lambda example: {k: example[k] for k in fields}),
        length_struct={"input_ids": length, "labels": length, "images": packing.image_slots},
        num_packing_bins=packing.bins,
        shuffle_bins=False,  # the stream is shuffled already
        padding_struct={"input_ids": pad_id, "labels": IGNORE_INDEX, "images": 0},
    )
    return packer.map(packed_row)


def packed_row(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed features -> the model's packed inputs (`pack_first_fit`)."""
    positions = packed["input_ids_positions"]
    return {
        "input_ids": packed["input_ids"],
        "labels": np.where(positions == 0, IGNORE_INDEX, packed["labels"]).astype(np.int32),
        "images": packed["images"],
        "segments": packed["input_ids_segment_ids"].astype(np.int32),
        "positions": positions.astype(np.int32),
    }


class RecordSkipped(ValueError):
    """A record that cannot become a training example; `reason` is one of
    `sources.SKIP_REASONS`, the message names the record and the problem."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def make_example(
    record: Mapping, tokenizer: Tokenizer, template: ChatTemplate, prep: Preprocessing
) -> dict[str, np.ndarray]:
    """One record -> {input_ids [T], labels [T], images [H, W, 3]}, right-padded to
    max_length (`padded_example` of `unpadded_example`)."""
    example = unpadded_example(record, tokenizer, template, prep)
    return padded_example(example, prep.max_length, tokenizer.pad_id)


def padded_example(example: Mapping, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """An `unpadded_example` right-padded to `length`, with its `row_image` and its real
    `length` (the host's count of useful work, `flops.batch_work`)."""
    return {
        **example,
        "length": np.int32(len(example["input_ids"])),
        "input_ids": pad_to(example["input_ids"], length, pad_id),
        "labels": pad_to(example["labels"], length, IGNORE_INDEX),
        "images": row_image(example["images"]),
    }


def unpadded_example(
    record: Mapping, tokenizer: Tokenizer, template: ChatTemplate, prep: Preprocessing
) -> dict[str, np.ndarray]:
    """One record -> {input_ids [n], labels [n], images [k, H, W, 3]} (n <= max_length; k = 1,
    or 0 for a text-only record).

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
        images = load_model_images(record.get("image"), prep)
    except FileNotFoundError as error:
        raise RecordSkipped("missing_image", f"{where}: {error}") from None
    except ValueError as error:
        raise RecordSkipped("corrupt_image", f"{where}: {error}") from None
    return {"input_ids": ids, "labels": labels, "images": images}


def example_or_skip(
    position: int,
    record: Mapping,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prep: Preprocessing,
) -> dict:
    """An unpadded example (+ `index`, the record's index in its source, for tracing), or
    `{"skipped": entry}` for `SkipLog`; `position` = index in the (global, shuffled,
    repeated) record stream, which identifies the occurrence (a record recurs every epoch)."""
    try:
        example = unpadded_example(record, tokenizer, template, prep)
        return {**example, "index": record["index"]}
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


def default_reader_threads() -> int:
    """Half the cores this process may run on (its CPU affinity: what SLURM or a container
    gives it, not the whole host's), within [2, 16]: decoding and preprocessing images
    release the GIL, and the other half stays with the training loop and XLA."""
    return max(2, min(16, len(os.sched_getaffinity(0)) // 2))


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
    reader_threads: int = 0,
    packing: Packing = Packing(),
) -> grain.IterDataset:
    """Infinite dataset of this process's share of each global batch (numpy dicts).

    Epochs are reshuffled with `seed`. Process p of n reads rows [p*B/n, (p+1)*B/n) of every
    global batch of B consecutive stream records — the rows its devices hold — so a global
    batch has the same records in the same order whatever the number of processes (as long
    as no record is skipped), and a multi-host run computes what a single host would.
    Examples are built in `workers` processes (0: `reader_threads` threads of this process,
    `default_reader_threads` when 0); skip markers are filtered (and logged) here, after the
    workers, in this process. Packed rows
    are this process's records packed (`pack_first_fit`): which examples share a row then
    depends on the number of processes. Buckets take one process (every process's batch
    would need the same length).
    """
    num_processes, process = jax.process_count(), jax.process_index()
    if global_batch_size % num_processes:
        raise ValueError(
            f"batch_size={global_batch_size} is not divisible by {num_processes} processes"
        )
    local = global_batch_size // num_processes
    if packing.mode == "bucket" and num_processes > 1:
        raise ValueError(
            f"config key data.packing='bucket' runs in one process ({num_processes} here: their "
            "batches would differ in length); use 'first_fit' or 'none'"
        )
    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)

    def stream_position(i: int) -> int:  # this process's i-th record -> its stream position
        return (i // local) * global_batch_size + process * local + i % local

    examples = (
        grain.MapDataset.range(len(stream))
        .map(stream_position)
        .map(
            lambda position: example_or_skip(position, stream[position], tokenizer, template, prep)
        )
        .to_iter_dataset(
            grain.ReadOptions(
                num_threads=reader_threads or default_reader_threads(), prefetch_buffer_size=8
            )
        )
    )
    if workers:
        examples = examples.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    examples = examples.filter(skip_log)
    pad_id = tokenizer.pad_id
    if packing.mode == "bucket":
        return bucketing.BucketBatchIterDataset(
            examples,
            lengths=bucketing.bucket_lengths(prep.max_length, packing.buckets),
            batch_size=local,
            window=packing.bucket_window,
            pad=lambda example, length: padded_example(example, length, pad_id),
        )
    if packing.mode == "first_fit":
        rows = pack_first_fit(examples, prep, pad_id, packing)
    else:
        rows = examples.map(lambda example: padded_example(example, prep.max_length, pad_id))
    return rows.batch(local, drop_remainder=True)
