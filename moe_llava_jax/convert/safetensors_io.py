"""Reading and writing Hugging Face safetensors checkpoints as numpy arrays.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte offsets) and the raw tensor bytes. It is read here directly, memory-mapped, because the
`safetensors` numpy API cannot represent bfloat16 (the dtype most LLM checkpoints ship in);
`ml_dtypes` (a JAX dependency) gives numpy a bfloat16. No torch is needed at run time; a
directory holding PyTorch's `pytorch_model.bin` instead is read by `torch_pickle.py`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from moe_llava_jax.convert import torch_pickle

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_SINGLE_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"


def read_file(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, memory-mapped read-only (little-endian)."""
    path = Path(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        tensors[name] = data[start:end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def read_checkpoint(directory: str | Path) -> dict[str, np.ndarray]:
    """A Hugging Face model directory: `model.safetensors` or the shards its index lists;
    failing those, PyTorch's `pytorch_model.bin` or its shards (`torch_pickle.py`)."""
    directory = Path(directory)
    for index_file, single_file, read in (
        (INDEX_FILE, SINGLE_FILE, read_file),
        (TORCH_INDEX_FILE, TORCH_SINGLE_FILE, torch_pickle.read_file),
    ):
        index = directory / index_file
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(read(directory / shard))
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise ValueError(
                    f"{index}: tensors listed but absent from their shards: {missing[:5]}"
                )
            return tensors
        if (directory / single_file).exists():
            return read(directory / single_file)
    raise FileNotFoundError(
        f"{directory}: none of {SINGLE_FILE}, {INDEX_FILE}, {TORCH_SINGLE_FILE}, {TORCH_INDEX_FILE}"
    )


def write_file(tensors: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Writes to a temporary name, then renames: readers (and memory maps of the old file,
    possibly the very source of `tensors`) never see a half-written file."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    header, offset = {}, 0
    arrays = {name: np.ascontiguousarray(value) for name, value in sorted(tensors.items())}
    for name, array in arrays.items():
        if array.dtype not in names:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
        header[name] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns tensor data to 8 bytes
    partial = Path(f"{path}.partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for array in arrays.values():
            f.write(array.tobytes())
    os.replace(partial, path)


def write_checkpoint(
    tensors: Mapping[str, np.ndarray], directory: str | Path, max_shard_bytes: int = 5 << 30
) -> None:
    """One `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards plus the index
    when the tensors exceed `max_shard_bytes` (Hugging Face's layout)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in sorted(tensors.items()):
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    if len(shards) == 1:
        write_file(shards[0], directory / SINGLE_FILE)
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_file(shard, directory / filename)
        weight_map.update({name: filename for name in shard})
    total = sum(int(np.asarray(a).nbytes) for a in tensors.values())
    (directory / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
