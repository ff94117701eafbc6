"""LLaVA-format conversation records as grain random-access data sources.

Records look like `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}`.
Everything that can be checked without opening images is checked when the file is loaded: a
malformed record found at step 40k costs far more than a few seconds at start-up. Bad records
are left out, never silently: each becomes a `skipped` entry (file, position, id, reason,
detail) that training lists in the stage's `skipped.jsonl`, and a file with more than
`max_bad_fraction` bad records fails at once, showing the first ones (a wrong file or format
is caught before any compute is spent).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import grain
import numpy as np

from moe_llava_jax.data.conversation import IMAGE_PLACEHOLDER
from moe_llava_jax.data.jsonl import iter_jsonl

_ROLES = ("human", "gpt")


# Why a record is left out. Load time: the first four; while reading: the last three.
SKIP_REASONS = (
    "malformed_json",
    "invalid_record",
    "image_count",
    "empty_answer",
    "missing_image",
    "corrupt_image",
    "too_long",
)


def _check_record(record: Any) -> tuple[str, str] | None:
    """(reason, description naming the field) of what is wrong with a record, or None."""
    if not isinstance(record, dict):
        return "invalid_record", f"record is a {type(record).__name__}, not an object"
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return "invalid_record", "field 'conversations' is missing, empty or not a list"
    for t, turn in enumerate(conversations):
        field = f"conversations[{t}]"
        if not isinstance(turn, dict):
            return "invalid_record", f"field {field!r} is not an object"
        if turn.get("from") not in _ROLES:
            return (
                "invalid_record",
                f"field '{field}.from' is {turn.get('from')!r}, expected one of {_ROLES}",
            )
        if not isinstance(turn.get("value"), str):
            return "invalid_record", f"field '{field}.value' is missing or not a string"
        if turn["from"] == "gpt" and not turn["value"].strip():
            return "empty_answer", f"field '{field}.value' is an empty answer"
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        return "invalid_record", f"field 'image' is {image!r}, expected a non-empty path string"
    total = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in conversations)
    first_human = next((turn["value"] for turn in conversations if turn["from"] == "human"), "")
    if image is None and total:
        return (
            "image_count",
            f"field 'conversations' has {total} {IMAGE_PLACEHOLDER} but field 'image' is not set",
        )
    if image is not None and (total != 1 or IMAGE_PLACEHOLDER not in first_human):
        return (
            "image_count",
            f"field 'conversations' must have exactly one {IMAGE_PLACEHOLDER}, in the first "
            f"human turn, because field 'image' is set (found {total})",
        )
    return None


def skipped_entry(source: Path | str, position: str, record: Any, reason: str, detail: str):
    """One line of `skipped.jsonl`: enough to find the record and know why it is out."""
    record_id = record.get("id") if isinstance(record, dict) else None
    return {
        "source": str(source),
        "position": position,
        "id": record_id,
        "reason": reason,
        "detail": detail,
    }


def check_bad_fraction(
    source: Path | str, skipped: Sequence[dict], total: int, max_bad_fraction: float
) -> None:
    """Fails, showing the first bad records, when more than `max_bad_fraction` are bad."""
    if total and len(skipped) > max_bad_fraction * total:
        first = "\n".join(
            f"  {e['source']}: {e['position']}"
            + (f" (id {e['id']!r})" if e["id"] is not None else "")
            + f": {e['detail']}"
            for e in skipped[:5]
        )
        raise ValueError(
            f"{source}: {len(skipped)} of {total} records are bad, more than "
            f"data.max_bad_fraction={max_bad_fraction}; the first:\n{first}"
        )


def _load_raw(path: Path) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """(position description, parsed record) pairs from a JSON list or a JSONL file, and the
    (position, message) of malformed JSONL lines.

    JSONL (by the `.jsonl` suffix) is read line by line so a bad line is reported by its
    line number; anything else must be a JSON list, reported by record index.
    """
    if path.suffix == ".jsonl":
        malformed: list[tuple[int, str]] = []
        records = [(f"line {lineno}", record) for lineno, record in iter_jsonl(path, malformed)]
        return records, [(f"line {lineno}", message) for lineno, message in malformed]
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return [(f"record {i}", record) for i, record in enumerate(data)], []


class LlavaJsonSource:
    """A grain `RandomAccessDataSource` over a LLaVA JSON or JSONL annotation file.

    The whole file is parsed and validated at construction (LLaVA files are at most a few
    hundred MB); items are plain dicts so the source pickles cheaply into grain workers.
    Bad records are left out and described in `skipped`; more than `max_bad_fraction` of
    them fails. Image paths are resolved against `image_root` but not checked for existence
    here, since stat-ing hundreds of thousands of files on network storage would dominate
    start-up; the training pipeline skips (and lists) records whose image is missing.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike,
        max_bad_fraction: float = 0.0,
    ) -> None:
        self._path = Path(path)
        self._image_root = Path(image_root).absolute()
        self._records = []
        raw, malformed = _load_raw(self._path)
        self.skipped = [
            skipped_entry(self._path, position, None, "malformed_json", message)
            for position, message in malformed
        ]
        for position, record in raw:
            problem = _check_record(record)
            if problem:
                self.skipped.append(skipped_entry(self._path, position, record, *problem))
            else:
                self._records.append(record)
        check_bad_fraction(self._path, self.skipped, len(raw) + len(malformed), max_bad_fraction)

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


class RecordSource(Protocol):
    """What training reads: random access to record dicts (`id`, `image`, `conversations`,
    `index`) and the records left out when the source was opened."""

    skipped: list[dict]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


class ConcatSource:
    """Several sources read as one (MoE-LLaVA's stage-2/3 data is such a list of JSON files,
    concatenated): a grain `RandomAccessDataSource` whose record `index` is the position in
    the concatenation, with every part's load-time `skipped` entries."""

    def __init__(self, sources: Sequence[RecordSource]) -> None:
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self._sources = list(sources)
        self._starts = np.cumsum([0] + [len(s) for s in self._sources])
        self.skipped = [entry for s in self._sources for entry in s.skipped]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return {**self._sources[part][index - int(self._starts[part])], "index": index}

    def __repr__(self) -> str:
        return f"ConcatSource([{', '.join(map(repr, self._sources))}])"


def mixture(sources: Sequence, weights: Sequence[float] | None = None) -> grain.MapDataset:
    """Interleaves sources by `weights` (uniform if None) with `grain.MapDataset.mix`.

    Accepts data sources or `MapDataset`s. As in grain, the mixture ends when the first
    source runs out at its weighted rate; repeat or shuffle the inputs before mixing.
    """
    datasets = [
        s if isinstance(s, grain.MapDataset) else grain.MapDataset.source(s) for s in sources
    ]
    return grain.MapDataset.mix(datasets, weights)
