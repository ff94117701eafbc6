"""LLaVA-format conversation records as grain random-access data sources.

Records look like `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}`.
Everything is validated when the file is loaded: a malformed record found at step 40k of a
run costs far more than a few seconds at start-up, and silently dropping records would
change the data mixture without anyone noticing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain

from moe_llava_jax.data.conversation import IMAGE_PLACEHOLDER
from moe_llava_jax.data.jsonl import iter_jsonl

_ROLES = ("human", "gpt")


def _where(path: Path, position: str, record: Any) -> str:
    """Location prefix for error messages: file, record position and id if there is one."""
    has_id = isinstance(record, dict) and "id" in record
    return f"{path}: {position}" + (f" (id {record['id']!r})" if has_id else "")


def _check_record(record: Any) -> str | None:
    """Returns a description of what is wrong with a record (naming the field), or None."""
    if not isinstance(record, dict):
        return f"record is a {type(record).__name__}, not an object"
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return "field 'conversations' is missing, empty or not a list"
    for t, turn in enumerate(conversations):
        field = f"conversations[{t}]"
        if not isinstance(turn, dict):
            return f"field {field!r} is not an object"
        if turn.get("from") not in _ROLES:
            return f"field '{field}.from' is {turn.get('from')!r}, expected one of {_ROLES}"
        if not isinstance(turn.get("value"), str):
            return f"field '{field}.value' is missing or not a string"
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        return f"field 'image' is {image!r}, expected a non-empty path string"
    total = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in conversations)
    first_human = next((turn["value"] for turn in conversations if turn["from"] == "human"), "")
    if image is None and total:
        return f"field 'conversations' has {total} {IMAGE_PLACEHOLDER} but field 'image' is not set"
    if image is not None and (total != 1 or IMAGE_PLACEHOLDER not in first_human):
        return (
            f"field 'conversations' must have exactly one {IMAGE_PLACEHOLDER}, in the first human "
            f"turn, because field 'image' is set (found {total})"
        )
    return None


def _load_raw(path: Path) -> list[tuple[str, Any]]:
    """Returns (position description, parsed record) pairs from a JSON list or a JSONL file.

    JSONL (by the `.jsonl` suffix) is read line by line so a bad line is reported by its
    line number; anything else must be a JSON list, reported by record index.
    """
    if path.suffix == ".jsonl":
        return [(f"line {lineno}", record) for lineno, record in iter_jsonl(path)]
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return [(f"record {i}", record) for i, record in enumerate(data)]


class LlavaJsonSource:
    """A grain `RandomAccessDataSource` over a LLaVA JSON or JSONL annotation file.

    The whole file is parsed and validated at construction (LLaVA files are at most a few
    hundred MB); items are plain dicts so the source pickles cheaply into grain workers.
    Image paths are resolved against `image_root` but not checked for existence here,
    since stat-ing hundreds of thousands of files on network storage would dominate
    start-up; the image loader reports missing files.
    """

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike) -> None:
        self._path = Path(path)
        self._image_root = Path(image_root).absolute()
        self._records = []
        for position, record in _load_raw(self._path):
            problem = _check_record(record)
            if problem:
                raise ValueError(f"{_where(self._path, position, record)}: {problem}")
            self._records.append(record)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        """Returns a fresh copy of record `index` with `image` absolute (or None) and `index`.

        Copies protect the cached records from transforms that mutate their input.
        """
        index = range(len(self._records))[index]  # IndexError out of range; -1 -> last
        record = self._records[index]
        image = record.get("image")
        return {
            **record,
            "conversations": [dict(turn) for turn in record["conversations"]],
            "image": None if image is None else str(self._image_root / image),
            "index": index,
        }

    def __repr__(self) -> str:
        # Stable across processes: grain uses it to check checkpoints against the source.
        return (
            f"LlavaJsonSource(path={str(self._path)!r}, "
            f"image_root={str(self._image_root)!r}, size={len(self)})"
        )


def mixture(sources: Sequence, weights: Sequence[float] | None = None) -> grain.MapDataset:
    """Interleaves sources by `weights` (uniform if None) with `grain.MapDataset.mix`.

    Accepts data sources or `MapDataset`s. As in grain, the mixture ends when the first
    source runs out at its weighted rate; repeat or shuffle the inputs before mixing.
    """
    datasets = [
        s if isinstance(s, grain.MapDataset) else grain.MapDataset.source(s) for s in sources
    ]
    return grain.MapDataset.mix(datasets, weights)
