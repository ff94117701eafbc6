"""Declarative name rules between Hugging Face tensors and our flat param paths.

A rule is `(our_path, hf_name, transform)` where both names may contain `{i}` (a layer index).
An HF name may also contain `{k}`: per-expert tensors (DeepSpeed's `deepspeed_experts.{k}`)
that stack along a new leading axis into one of our `[E, ...]` params. Importing maps every
HF tensor through the rules; exporting runs them backwards. Every
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
    pattern = re.escape(template)
    for field in ("i", "k"):
        pattern = pattern.replace(re.escape(f"{{{field}}}"), rf"(?P<{field}>\d+)")
    return re.compile(pattern)


def _fill(template: str, match: re.Match) -> str:
    return template.replace("{i}", match.group("i")) if "{i}" in template else template


def _check_shape(name: str, source_shape: tuple, path: str, array: np.ndarray, expected) -> None:
    if tuple(array.shape) != tuple(expected[path]):
        raise ValueError(
            f"tensor {name!r} has shape {tuple(source_shape)}; {path!r} needs "
            f"{tuple(expected[path])} (ours, after the layout transform: {tuple(array.shape)})"
        )


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
    experts: dict[str, dict[int, np.ndarray]] = {}  # our path -> {k: one expert's tensor}
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
        if "k" in match.groupdict():
            experts.setdefault(path, {})[int(match.group("k"))] = array
            continue
        _check_shape(name, np.shape(value), path, array, expected)
        out[path] = array
    for path, parts in experts.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(
                f"{path!r}: expert tensors {sorted(parts)} are not 0..{len(parts) - 1}"
            )
        stacked = np.stack([parts[k] for k in sorted(parts)])
        _check_shape(f"{path} experts", stacked.shape, path, stacked, expected)
        out[path] = stacked
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
                break
        else:
            raise ValueError(f"param {path!r}: no conversion rule exports it")
        to_hf = TRANSFORMS[transform][1]
        name = _fill(hf, match)
        if "{k}" in name:  # [E, ...] -> one tensor per expert
            for k, expert in enumerate(np.asarray(value)):
                out[name.replace("{k}", str(k))] = to_hf(expert)
        else:
            out[name] = to_hf(np.asarray(value))
    return out
