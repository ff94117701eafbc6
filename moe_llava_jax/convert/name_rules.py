"""Declarative name rules between Hugging Face tensors and our flat param paths.

A rule is `(our_path, hf_name, transform)` where both names may contain `{i}` (a layer index).
A transform may name a part, `"linear@1/3"`: the HF tensor is split in 3 along its first
axis and part 1 feeds this param (fused projections such as Qwen v1's `c_attn` = [q; k; v]).
An HF name may also contain `{k}`: per-expert tensors (DeepSpeed's `deepspeed_experts.{k}`)
that stack along a new leading axis into one of our `[E, ...]` params. Importing maps every
HF tensor through the rules; exporting runs them backwards. Every
mismatch is an error naming the tensor: a tensor no rule knows, a param no tensor fills, a
shape that disagrees. Imported params are `lazy.LazyTensor`s: nothing is read until a
caller reads them (whole, or one device shard at a time).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from moe_llava_jax.convert import lazy
from moe_llava_jax.convert.lazy import LazyTensor

Rule = tuple[str, str, str]  # (our path, HF name, transform name)


def _patch_to_dense(w: np.ndarray) -> np.ndarray:
    """Conv2d weight [d, c, p, q] -> our patch-embedding Dense kernel [(p q c), d]."""
    d, c, p, q = w.shape
    return w.transpose(2, 3, 1, 0).reshape(p * q * c, d)


def _dense_to_patch(w: np.ndarray, channels: int = 3) -> np.ndarray:
    pqc, d = w.shape
    p = int(round((pqc // channels) ** 0.5))
    return w.reshape(p, p, channels, d).transpose(3, 2, 0, 1)


def _patch_to_dense_lazy(w: LazyTensor) -> LazyTensor:
    d, c, p, q = w.shape
    return lazy.computed(w, _patch_to_dense, (p * q * c, d))


# name -> (HF -> ours on lazy tensors, ours -> HF on arrays)
TRANSFORMS: dict[str, tuple[Callable[[LazyTensor], LazyTensor], Callable]] = {
    "copy": (lambda w: w, lambda w: w),
    "linear": (lazy.transposed, lambda w: w.T),  # torch Linear [out, in] <-> Flax [in, out]
    "patch_conv": (_patch_to_dense_lazy, _dense_to_patch),
}


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for field in ("i", "k"):
        pattern = pattern.replace(re.escape(f"{{{field}}}"), rf"(?P<{field}>\d+)")
    return re.compile(pattern)


def _fill(template: str, match: re.Match) -> str:
    return template.replace("{i}", match.group("i")) if "{i}" in template else template


def _check_shape(name: str, source_shape: tuple, path: str, array: LazyTensor, expected) -> None:
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
) -> dict[str, LazyTensor]:
    """HF tensors (arrays or memmap views: nothing is read) -> {our path: lazy tensor}
    covering exactly `expected` (our path -> shape).

    `ignored(name)` marks tensors the configured model does not use by design (e.g. vision
    layers past `select_layer`, a tied lm_head); any other tensor without a place is an error.
    """
    compiled = [(_regex(hf), ours, transform) for ours, hf, transform in rules]
    out = {}
    experts: dict[str, dict[int, LazyTensor]] = {}  # our path -> {k: one expert's tensor}
    for name, value in tensors.items():
        if ignored(name):
            continue
        matches = [(m, ours, t) for p, ours, t in compiled if (m := p.fullmatch(name))]
        if not matches:
            raise ValueError(f"unexpected tensor {name!r}: no conversion rule knows it")
        for match, ours, transform in matches:
            path = _fill(ours, match)
            if path not in expected:
                raise ValueError(
                    f"tensor {name!r} maps to {path!r}, which the configured model lacks"
                )
            base, part = _parse(transform)
            source = lazy.of_array(np.asarray(value))
            if part is not None:
                source = lazy.part(source, *part)
            array = TRANSFORMS[base][0](source)
            if "k" in match.groupdict():
                experts.setdefault(path, {})[int(match.group("k"))] = array
                continue
            _check_shape(name, source.shape, path, array, expected)
            out[path] = array
    for path, parts in experts.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(
                f"{path!r}: expert tensors {sorted(parts)} are not 0..{len(parts) - 1}"
            )
        stacked = lazy.stacked([parts[k] for k in sorted(parts)])
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
    fused: dict[str, dict[int, np.ndarray]] = {}  # HF name -> {part: array}
    for path, value in params.items():
        for pattern, hf, transform in compiled:
            match = pattern.fullmatch(path)
            if match:
                break
        else:
            raise ValueError(f"param {path!r}: no conversion rule exports it")
        base, part = _parse(transform)
        to_hf = TRANSFORMS[base][1]
        name = _fill(hf, match)
        if part is not None:
            fused.setdefault(name, {})[part[0]] = to_hf(np.asarray(value))
        elif "{k}" in name:  # [E, ...] -> one tensor per expert
            for k, expert in enumerate(np.asarray(value)):
                out[name.replace("{k}", str(k))] = to_hf(expert)
        else:
            out[name] = to_hf(np.asarray(value))
    for name, parts in fused.items():
        out[name] = np.concatenate([parts[j] for j in sorted(parts)], axis=0)
    return out


def _parse(transform: str) -> tuple[str, tuple[int, int] | None]:
    """ "linear@1/3" -> ("linear", (1, 3)); "linear" -> ("linear", None)."""
    base, _, part = transform.partition("@")
    if not part:
        return base, None
    index, count = part.split("/")
    return base, (int(index), int(count))
