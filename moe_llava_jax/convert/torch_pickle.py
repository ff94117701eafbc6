"""Reading PyTorch's `torch.save` files (`pytorch_model.bin`, `mm_projector.bin`) as numpy
arrays, without torch and without running the pickle's code.

MoE-LLaVA's stage-3 save writes a `pytorch_model.bin` next to (or instead of) safetensors,
and its stage-1 releases are a projector-only `mm_projector.bin`. Such a file is a zip
archive (torch >= 1.6): `<name>/data.pkl`, a pickle of the state dict whose tensors refer to
raw storages `<name>/data/<key>` (little-endian, as `<name>/byteorder` says). A plain
`pickle.load` would import and call whatever the file names; this unpickler resolves only
what a state dict of tensors needs (`torch._utils._rebuild_tensor_v2`,
`_rebuild_parameter`, the storage types, `collections.OrderedDict`) and refuses anything
else by name.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    """torch._utils._rebuild_tensor_v2: a view of `storage` (a 1-D array) with element
    offset and strides, copied out (the archive's bytes are not kept)."""
    del requires_grad, hooks, metadata
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad, hooks):
    """torch._utils._rebuild_parameter: an nn.Parameter is its tensor."""
    del requires_grad, hooks
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, path: Path):
        super().__init__(file)
        self.archive, self.root, self.path = archive, root, path
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(
            f"{self.path}: refusing {module}.{name}: only a state dict of tensors is read"
        )

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid  # ("storage", dtype, "0", "cpu", n)
        if kind != "storage":
            raise pickle.UnpicklingError(f"{self.path}: unknown persistent id {pid!r}")
        if key not in self.storages:
            data = self.archive.read(f"{self.root}/data/{key}")
            self.storages[key] = np.frombuffer(data, dtype, count=numel)
        return self.storages[key]


def read_file(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state dict, by name."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a zip-format torch.save file (torch < 1.6 wrote another format); "
            "re-save it with a recent torch, or convert it to safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one */data.pkl in the archive, found {pickles}")
        root = pickles[0][: -len("/data.pkl")]
        order = f"{root}/byteorder"
        if order in archive.namelist() and archive.read(order).strip() != b"little":
            raise ValueError(f"{path}: big-endian storages are not supported")
        with archive.open(pickles[0]) as f:
            state = _StateDictUnpickler(f, archive, root, path).load()
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return dict(state)
