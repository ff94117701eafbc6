"""LLaVA JSON/JSONL + image folder -> TFDS dataset in ArrayRecord files (no TensorFlow).

Command:
  python -m moe_llava_jax.data.convert_to_tfds --json data.json --image_root DIR \\
      --out_dir OUT [--name llava_custom] [--split train] [--shards N] [--workers N]

The dataset lands in OUT/NAME/1.0.0 and reads back with
`tfds.data_source(NAME, split=SPLIT, data_dir=OUT)` or `TfdsSource` (spec for configs:
`stageN.data = "tfds:NAME/SPLIT@OUT"`). Features: `id` (Text), `image` (the file's own PNG or
JPEG bytes; anything else is re-encoded as RGB PNG), `has_image` (False for text-only records,
whose `image` is a 1x1 placeholder) and `conversations` (Text, the LLaVA turns as JSON).
Record order is kept, so record i of the output is the i-th record that was written.

Unlike `LlavaJsonSource`, which refuses a file with any bad record, conversion drops what it
cannot use: a full LLaVA mixture always has a few missing or corrupt images, and this is the
one place where every image is opened anyway. Nothing is dropped silently: each skipped
record is listed in OUT/skipped.jsonl (source, position, id, reason, detail: the entries
training writes for `LlavaJsonSource`, same reasons) and counted per reason.

TFDS's writer runs through a `GeneratorBasedBuilder` (TFDS's own sharding, `dataset_info.json`
and `features.json`); `tfds.dataset_builders.store_as_tfds_dataset` would be shorter but
needs TensorFlow.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import io
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from moe_llava_jax.data.jsonl import write_jsonl
from moe_llava_jax.data.sources import _check_record, _load_raw, skipped_entry

VERSION = "1.0.0"
SKIPPED_FILE = "skipped.jsonl"
# Records validated concurrently per chunk: bounds how many encoded images are in memory.
_CHUNK = 256


def llava_features() -> tfds.features.FeaturesDict:
    """The features `TfdsSource` reads with its default arguments."""
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=None),
            "has_image": np.bool_,
            "conversations": tfds.features.Text(),
        }
    )


@functools.cache
def _placeholder_png() -> bytes:
    """A 1x1 black PNG: the Image feature needs bytes even when `has_image` is False."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    return buffer.getvalue()


class _SkipRecord(Exception):
    """Raised while preparing a record that is not written; `reason` is one of
    `sources.SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _encoded_image(path: Path) -> bytes:
    """The bytes to store for the image file at `path`, fully decoded once to catch
    truncated or corrupt files (PIL's `verify` misses truncated JPEGs)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _SkipRecord("missing_image", f"image file not found: {path}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in ("PNG", "JPEG") and image.mode == "RGB":
                return data
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            return buffer.getvalue()
    except UnidentifiedImageError:  # PIL's message would name the in-memory buffer
        raise _SkipRecord("corrupt_image", f"not a known image format: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise _SkipRecord("corrupt_image", f"cannot decode image {path}: {error}") from None


def _prepare(
    json_path: Path, position: str, record: Any, image_root: Path
) -> tuple[dict | None, dict | None]:
    """(TFDS example, None) for one raw record, or (None, its skipped.jsonl entry)."""
    problem = _check_record(record)
    if problem:
        return None, skipped_entry(json_path, position, record, *problem)
    image = record.get("image")
    try:
        encoded = _placeholder_png() if image is None else _encoded_image(image_root / image)
    except _SkipRecord as skip:
        return None, skipped_entry(json_path, position, record, skip.reason, str(skip))
    return {
        # Ids may be integers in some LLaVA files; a missing one becomes the source position.
        "id": position if record.get("id") is None else str(record["id"]),
        "image": encoded,
        "has_image": image is not None,
        "conversations": json.dumps(record["conversations"], ensure_ascii=False),
    }, None


class _ExamplesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes ready-made examples to one split: TFDS does the sharding and the metadata."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(
        self,
        *,
        name: str,
        split: str,
        features: tfds.features.FeaturesDict,
        examples: Iterable[tuple[int, dict]],
        description: str,
        data_dir: str,
    ) -> None:
        self.name = name
        self._split, self._features, self._examples = split, features, examples
        self._description = description
        super().__init__(data_dir=data_dir, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        # Shuffling off keeps the source order: index i is the i-th example written.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description,
            features=self._features,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # nothing to download
        return {self._split: iter(self._examples)}

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        raise NotImplementedError("examples come from _split_generators")


def write_dataset(
    name: str,
    out_dir: str | os.PathLike,
    split: str,
    features: tfds.features.FeaturesDict,
    examples: Iterable[tuple[int, dict]],
    *,
    num_shards: int | None = None,
    description: str = "",
) -> Path:
    """Writes `(key, example)` pairs as TFDS dataset `name` (one split) under `out_dir`;
    returns the dataset directory. `num_shards` None lets TFDS pick by size."""
    builder = _ExamplesBuilder(
        name=name,
        split=split,
        features=features,
        examples=examples,
        description=description,
        data_dir=os.fspath(out_dir),
    )
    if builder.is_prepared():
        raise FileExistsError(
            f"{builder.data_dir} already holds dataset {name!r}: remove it or pick another "
            "--name / --out_dir"
        )
    with tempfile.TemporaryDirectory() as download_dir:  # TFDS insists on one
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(num_shards=num_shards),
        )
    return Path(builder.data_dir)


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """Where the dataset went, how many records it has, and the skipped.jsonl entries."""

    dataset_dir: Path
    num_written: int
    skipped: list[dict]

    def counts(self) -> dict[str, int]:
        """Skipped records per reason."""
        return dict(collections.Counter(entry["reason"] for entry in self.skipped))


def convert(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str = "llava_custom",
    split: str = "train",
    num_shards: int | None = None,
    workers: int = 8,
) -> ConversionReport:
    """Converts a LLaVA JSON/JSONL file; see the module docstring. `workers` threads read and
    decode images (PIL releases the GIL while decoding); records stay in file order."""
    json_path, image_root = Path(json_path).absolute(), Path(image_root).absolute()
    out_dir = Path(out_dir)
    # A file that is not JSON at all is an error; a malformed JSONL line is a skip.
    raw, malformed = _load_raw(json_path)
    skipped = [
        skipped_entry(json_path, position, None, "malformed_json", message)
        for position, message in malformed
    ]

    def examples(pool: concurrent.futures.Executor) -> Iterator[tuple[int, dict]]:
        indexed = iter(enumerate(raw))
        while chunk := list(itertools.islice(indexed, _CHUNK)):
            prepared = pool.map(lambda item: _prepare(json_path, *item[1], image_root), chunk)
            for (key, _), (example, skip) in zip(chunk, prepared):
                if skip is None:
                    yield key, example
                else:
                    skipped.append(skip)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        dataset_dir = write_dataset(
            name,
            out_dir,
            split,
            llava_features(),
            examples(pool),
            num_shards=num_shards,
            description=f"Converted from {json_path} (images: {image_root})",
        )
    write_jsonl(out_dir / SKIPPED_FILE, skipped)
    return ConversionReport(dataset_dir, len(raw) + len(malformed) - len(skipped), skipped)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="LLaVA JSON list or .jsonl file")
    parser.add_argument("--image_root", required=True, help="image paths are relative to it")
    parser.add_argument("--out_dir", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--name", default="llava_custom", help="TFDS dataset name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--shards", type=int, default=None, help="default: TFDS picks by size")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    report = convert(
        args.json,
        args.image_root,
        args.out_dir,
        name=args.name,
        split=args.split,
        num_shards=args.shards,
        workers=args.workers,
    )
    print(f"wrote {report.num_written} records to {report.dataset_dir}")
    print(f"skipped {len(report.skipped)} (listed in {Path(args.out_dir) / SKIPPED_FILE})")
    for reason, count in sorted(report.counts().items()):
        print(f"  {reason}: {count}")
    print(f"read with: tfds:{args.name}/{args.split}@{Path(args.out_dir).absolute()}")


if __name__ == "__main__":
    main()
