"""Length buckets (`data.packing="bucket"`): batches of one example per row, each batch
right-padded to the shortest of a few static lengths that holds its longest example.

The cheaper alternative to packing: no segment ids, at most `len(lengths)` step programs,
padding bounded by the gap between neighbouring lengths. Examples are grouped within a
window of `window` batches read in stream order: rows of one bucket fill batches in stream
order; the window's leftovers (fewer than a batch per bucket) are batched together, shortest
first, each batch padded to its longest row's bucket. Nothing is dropped. The iterator's
state is the parent's state at the window's start plus the number of its batches emitted,
so a resumed run re-reads the window and emits exactly the remaining batches.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np


def bucket_lengths(max_length: int, count: int) -> tuple[int, ...]:
    """`count` evenly spaced lengths up to max_length (the last), multiples of 8 below it."""
    if count < 1:
        raise ValueError(f"config key data.buckets={count} must be >= 1")
    lengths = [min(-(-max_length * i // count // 8) * 8, max_length) for i in range(1, count + 1)]
    return tuple(sorted(set(lengths)))


def window_batches(
    sizes: Sequence[int], lengths: Sequence[int], batch_size: int
) -> list[list[int]]:
    """A window's examples (their token counts, stream order; a multiple of batch_size) ->
    batches as lists of example indices, in the order they are emitted (by first example)."""
    by_bucket: dict[int, list[int]] = {}
    for index, size in enumerate(sizes):
        by_bucket.setdefault(bisect.bisect_left(lengths, size), []).append(index)
    batches, leftovers = [], []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        whole = len(members) - len(members) % batch_size
        batches += [members[i : i + batch_size] for i in range(0, whole, batch_size)]
        leftovers += members[whole:]
    batches += [leftovers[i : i + batch_size] for i in range(0, len(leftovers), batch_size)]
    return sorted(batches, key=lambda batch: batch[0])


class BucketBatchIterDataset(grain.IterDataset):
    """Unpadded examples -> batches (module docstring); `pad(example, length)` gives an
    example's fixed-shape row at a bucket length."""

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        lengths: Sequence[int],
        batch_size: int,
        window: int,
        pad: Callable[[Mapping, int], dict],
    ):
        super().__init__(parent)
        self.lengths, self.batch_size = tuple(lengths), batch_size
        self.window, self.pad = window, pad

    def __iter__(self) -> grain.DatasetIterator:
        return _BucketBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"BucketBatchIterDataset(lengths={self.lengths}, batch_size={self.batch_size})"


class _BucketBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: BucketBatchIterDataset):
        super().__init__(parent)
        self._spec = spec
        self._window_start = parent.get_state()
        self._pending: list[dict] = []  # the window's batches not yet emitted
        self._emitted = 0  # batches of the current window emitted

    def _read_window(self) -> None:
        spec = self._spec
        self._window_start = self._parent.get_state()
        examples = [next(self._parent) for _ in range(spec.window * spec.batch_size)]
        self._pending = [
            self._batch([examples[i] for i in members])
            for members in window_batches(
                [len(x["input_ids"]) for x in examples], spec.lengths, spec.batch_size
            )
        ]
        self._emitted = 0

    def _batch(self, examples: list[Mapping]) -> dict[str, np.ndarray]:
        longest = max(len(x["input_ids"]) for x in examples)
        length = self._spec.lengths[bisect.bisect_left(self._spec.lengths, longest)]
        rows = [self._spec.pad(x, length) for x in examples]
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def __next__(self) -> dict[str, np.ndarray]:
        if self._emitted == len(self._pending):
            self._read_window()
        batch = self._pending[self._emitted]
        self._emitted += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"window_start": self._window_start, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["window_start"])
        self._read_window()
        self._emitted = state["emitted"]
