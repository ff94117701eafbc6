"""Declarative name rules between Hugging Face tensors and our flat param paths.

A rule is `(our_path, hf_name, transform)` where both names may contain `{i}` (a layer index).
Importing maps every HF tensor through the rules; exporting runs them backwards. Every
mismatch is an error naming the tensor: a tensor no rule knows, a param no tensor fills, a
shape that disagrees.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Rule = tuple[str, str, str]  # (our path, HF name, transform name)


def _patch_to_dense(w: np.ndarray) -> np.ndarray:
    """Conv2d weight [d, c, p, q] -> our patch-embedding Dense kernel [(p q c), d]."""
    d, c, p, q = w.shape
    return w.transpose(2, 3, 1, 0).reshape(p * q * c, d)


def _dense_to_patch(w: np.ndarray, channels: int = 3) -> np.ndarray:
    pqc, d = w.shape
    p = int(round((pqc // channels) ** 0.5))
    return w.reshape(p, p, channels, d).transpose(3, 2, 0, 1)


# name -> (HF -> ours, ours -> HF)
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda w: w, lambda w: w),
    "linear": (lambda w: w.T, lambda w: w.T),  # torch Linear [out, in] <-> Flax [in, out]
    "patch_conv": (_patch_to_dense, _dense_to_patch),
}


def _regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _fill(template: str, match: re.Match) -> str:
    return template.replace("{i}", match.group("i")) if "{i}" in template else template


def import_tensors(
    tensors: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    expected: Mapping[str, tuple[int, ...]],
    ignored: Callable[[str], bool] = lambda name: False,
) -> dict[str, np.ndarray]:
    """HF tensors -> {our path: array} covering exactly `expected` (our path -> shape).

    `ignored(name)` marks tensors the configured model does not use by design (e.g. vision
    layers past `select_layer`, a tied lm_head); any other tensor without a place is an error.
    """
    compiled = [(_regex(hf), ours, transform) for ours, hf, transform in rules]
    out = {}
    for name, value in tensors.items():
        if ignored(name):
            continue
        for pattern, ours, transform in compiled:
            match = pattern.fullmatch(name)
            if match:
                break
        else:
            raise ValueError(f"unexpected tensor {name!r}: no conversion rule knows it")
        path = _fill(ours, match)
        if path not in expected:
            raise ValueError(f"tensor {name!r} maps to {path!r}, which the configured model lacks")
        array = TRANSFORMS[transform][0](np.asarray(value))
        if tuple(array.shape) != tuple(expected[path]):
            raise ValueError(
                f"tensor {name!r} has shape {tuple(value.shape)}; {path!r} needs "
                f"{tuple(expected[path])}"
            )
        out[path] = array
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"missing tensors for params {missing[:5]} ({len(missing)} in all)")
    return out


def export_tensors(
    params: Mapping[str, np.ndarray], rules: Sequence[Rule]
) -> dict[str, np.ndarray]:
    """{our path: array} -> HF tensors; a param no rule covers is an error."""
    compiled = [(_regex(ours), hf, transform) for ours, hf, transform in rules]
    out = {}
    for path, value in params.items():
        for pattern, hf, transform in compiled:
            match = pattern.fullmatch(path)
            if match:
                out[_fill(hf, match)] = TRANSFORMS[transform][1](np.asarray(value))
                break
        else:
            raise ValueError(f"param {path!r}: no conversion rule exports it")
    return out
