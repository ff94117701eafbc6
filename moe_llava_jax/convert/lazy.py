"""Tensors read on demand: a checkpoint tensor after our layout transforms, not yet read.

Importing a Hugging Face checkpoint used to turn every tensor into float32 numpy at once:
host memory peaked at ~3x the file, in every process of a host. A `LazyTensor` keeps the
recipe instead: our param's shape, the checkpoint's dtype, and `read(index)`, the values of
one rectangular slice of the param, computed from only the bytes that slice needs of the
memory-mapped file. A sharded array is then built shard by shard (`placement.py`): each
process reads just its own devices' slices, through a mapping the page cache shares among
the processes of a host, and bfloat16 stays bfloat16 until it is on the device.

    w = of_array(np.memmap(...))        # [out, in], nothing read
    t = transposed(w)                   # [in, out]
    t.read((slice(0, 8), slice(None)))  # reads 8 columns of the file's rows
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

Index = tuple[slice, ...]  # one basic slice per axis, as `jax.make_array_from_callback` gives


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor:
    """`read(index)` -> the [index] slice of a `shape` array of `dtype` (index: a slice per
    axis, normalised by `read` to explicit bounds)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    reader: Callable[[Index], np.ndarray]

    def read(self, index: Sequence[slice] | None = None) -> np.ndarray:
        index = tuple(index or ())
        index += (slice(None),) * (len(self.shape) - len(index))
        bounds = tuple(slice(*s.indices(n)) for s, n in zip(index, self.shape))
        if any(s.step != 1 for s in bounds):
            raise ValueError(f"LazyTensor.read: strided slices {index} are not supported")
        return self.reader(bounds)

    def value(self) -> np.ndarray:
        """The whole tensor (read now)."""
        return self.read()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def of_array(array: np.ndarray) -> LazyTensor:
    """An array (typically a memmap view) as a lazy tensor: slicing a memmap reads nothing."""
    return LazyTensor(tuple(array.shape), array.dtype, lambda index: array[index])


def transposed(tensor: LazyTensor) -> LazyTensor:
    """A 2-D tensor's transpose (torch Linear [out, in] -> Flax [in, out])."""
    return LazyTensor(tensor.shape[::-1], tensor.dtype, lambda index: tensor.read(index[::-1]).T)


def computed(
    tensor: LazyTensor, transform: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]
) -> LazyTensor:
    """`transform(whole tensor)`, sliced: for small tensors whose transform mixes axes (the
    patch-embedding convolution), where reading all of it per shard costs nothing."""
    return LazyTensor(tuple(shape), tensor.dtype, lambda index: transform(tensor.value())[index])


def part(tensor: LazyTensor, index: int, count: int) -> LazyTensor:
    """Part `index` of `count` equal parts along axis 0 (a fused [q; k; v] projection)."""
    size = tensor.shape[0] // count
    if size * count != tensor.shape[0]:
        raise ValueError(f"axis 0 of a {tensor.shape} tensor does not split into {count} parts")
    offset = index * size

    def reader(bounds: Index) -> np.ndarray:
        rows = slice(offset + bounds[0].start, offset + bounds[0].stop)
        return tensor.read((rows, *bounds[1:]))

    return LazyTensor((size, *tensor.shape[1:]), tensor.dtype, reader)


def stacked(tensors: Sequence[LazyTensor]) -> LazyTensor:
    """The tensors stacked along a new axis 0 (experts into [E, ...], layers into a scanned
    [layers, ...] param); a slice reads only the members it covers."""
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors):
        raise ValueError(
            "stacking tensors of different shapes or dtypes: "
            f"{sorted({(t.shape, str(t.dtype)) for t in tensors})}"
        )

    def reader(bounds: Index) -> np.ndarray:
        members = range(len(tensors))[bounds[0]]
        return np.stack([tensors[k].read(bounds[1:]) for k in members])

    return LazyTensor((len(tensors), *first.shape), first.dtype, reader)
