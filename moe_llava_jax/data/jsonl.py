"""JSON Lines reading and writing shared by data sources and evaluation files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


def iter_jsonl(
    path: str | os.PathLike, malformed: list[tuple[int, str]] | None = None
) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line.

    A malformed line fails naming file:line, so a broken file is found when it is opened, not
    hours into a run; or, when a `malformed` list is given, it is appended there as
    (line number, message) and skipped (training sources count and report such lines).
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                if malformed is None:
                    raise ValueError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
                malformed.append((lineno, f"invalid JSON ({e.msg})"))


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> None:
    """One JSON object per line; creates the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
