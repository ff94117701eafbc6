"""What a compiled program does, read from its optimised HLO text: the collectives it holds
and the matmul FLOPs it runs per step.

Why not `compiled.cost_analysis()`: XLA counts a while loop's body once, so with scanned
layers (and gradient accumulation) its FLOPs are a fraction of the step's (a 24-layer scan:
~1/24). Here every computation is weighted by how often one step runs it: a while body by
its trip count (read from its condition: `i < N`), a fusion or call once per caller, a
conditional by its most expensive branch (an upper bound of what one step runs). Matmuls
are `dot`s and `convolution`s; TPU writes batched matmuls as convolutions whose spatial
dims, dilated and strided, are the batch dims, so a convolution's FLOPs count only window
taps that land on real (not padding, not dilation-hole) input elements, as XLA's own cost
analysis does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

COLLECTIVES = (
    "all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
    "collective-permute",
)
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s+\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%(\S+)\s+=\s+(.*?)\s+([a-z][\w-]*)\((.*)$")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def shape_bytes(text: str) -> int:
    """Bytes of the arrays in an HLO type (`bf16[4,8]{1,0}`, or a tuple of them)."""
    return sum(
        _DTYPE_BYTES[dtype] * math.prod(_dims(dims)) for dtype, dims in _ARRAY.findall(text)
    )


class Instruction:
    __slots__ = ("name", "shape", "op", "rest")

    def __init__(self, name: str, shape: str, op: str, rest: str):
        self.name, self.shape, self.op, self.rest = name, shape, op, rest

    @property
    def dims(self) -> list[int]:
        found = _ARRAY.findall(self.shape)
        return _dims(found[0][1]) if len(found) == 1 else []

    @property
    def operands(self) -> list[str]:
        """Operand names (`%a, %b), attr=...` -> [a, b])."""
        depth, args = 0, ""
        for char in self.rest:
            if char == "(":
                depth += 1
            elif char == ")":
                if depth == 0:
                    break
                depth -= 1
            args += char
        return re.findall(r"%([\w.\-]+)", args)

    def attribute(self, key: str) -> str | None:
        match = re.search(rf"\b{key}=(\{{[^}}]*\}}|[^,\s]+)", self.rest)
        return match.group(1) if match else None


def parse_module(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """{computation name: instructions} and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if header := _HEADER.match(line):
            current = computations.setdefault(header.group(1), [])
            entry = header.group(1) if line.startswith("ENTRY") else entry
        elif current is not None and (inst := _INSTRUCTION.match(line)):
            current.append(Instruction(*inst.groups()))
    return computations, entry


def collective_ops(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"ops", "bytes"}} over the program's collectives, each op once (a scanned
    body's once, not per iteration), with the bytes of its result; an async pair counts
    once: the op at its `-start`, the bytes at its `-done` (the start's result also holds
    the operands)."""
    found = {kind: {"ops": 0, "bytes": 0} for kind in COLLECTIVES}
    for instructions in parse_module(hlo_text)[0].values():
        for inst in instructions:
            op = inst.op
            if op.endswith("-done") and op.removesuffix("-done") in found:
                found[op.removesuffix("-done")]["bytes"] += shape_bytes(inst.shape)
            elif op.endswith("-start") and op.removesuffix("-start") in found:
                found[op.removesuffix("-start")]["ops"] += 1
            elif op in found:
                found[op]["ops"] += 1
                found[op]["bytes"] += shape_bytes(inst.shape)
    return found


def _trip_count(condition: list[Instruction]) -> int | None:
    """N of a loop condition `i < N` (the one s32 scalar constant it compares with)."""
    constants = [
        int(m.group(1))
        for inst in condition
        if inst.op == "constant" and inst.shape.startswith("s32[]")
        and (m := re.match(r"(-?\d+)\)", inst.rest))
    ]
    return constants[0] if len(constants) == 1 else None


def _window_taps(size: int, window: dict[str, int], out: int) -> int:
    """Sum over one spatial dim's `out` outputs of the window taps on real input elements."""
    lhs_dilate, rhs_dilate = window.get("lhs_dilate", 1), window.get("rhs_dilate", 1)
    stride, low = window.get("stride", 1), window.get("pad_low", 0)
    last = (size - 1) * lhs_dilate
    taps = 0
    for p in range(out):
        for k in range(window.get("size", 1)):
            pos = p * stride + k * rhs_dilate - low
            taps += 0 <= pos <= last and pos % lhs_dilate == 0
    return taps


def _window(attribute: str | None, rank: int) -> list[dict[str, int]]:
    """`window={size=16x16 stride=15x15 pad=0_0x1_1 lhs_dilate=16x16}` -> per spatial dim."""
    dims = [{} for _ in range(rank)]
    for key, value in re.findall(r"(\w+)=([\d_x\-]+)", (attribute or "").strip("{}")):
        for d, item in enumerate(value.split("x")[:rank]):
            if key == "pad":
                low, _, high = item.partition("_")
                dims[d]["pad_low"], dims[d]["pad_high"] = int(low), int(high)
            elif key != "rhs_reversal":
                dims[d][key] = int(item)
    return dims


def _matmul_flops(inst: Instruction, shapes: dict[str, list[int]]) -> float:
    operands = inst.operands
    lhs = shapes.get(operands[0], []) if operands else []
    out = inst.dims
    if inst.op == "dot":
        contracting = _dims((inst.attribute("lhs_contracting_dims") or "{}").strip("{}"))
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)
    labels = inst.attribute("dim_labels")  # e.g. 01bf_01oi->01bf
    if not labels or not lhs:
        return 0.0
    lhs_labels, _, out_labels = re.split(r"_|->", labels)
    spatial = [c for c in lhs_labels if c.isdigit()]
    window = _window(inst.attribute("window"), len(spatial))
    taps = math.prod(
        _window_taps(lhs[lhs_labels.index(c)], window[i], out[out_labels.index(c)])
        for i, c in enumerate(spatial)
    )
    groups = int(inst.attribute("feature_group_count") or 1)
    batch = out[out_labels.index("b")] * out[out_labels.index("f")]  # output batch x features
    return 2.0 * batch * taps * lhs[lhs_labels.index("f")] / groups


def matmul_flops(hlo_text: str) -> float | None:
    """Matmul FLOPs one run of the program does (per device, for an SPMD program); None if
    some while loop's trip count cannot be read."""
    computations, entry = parse_module(hlo_text)
    shapes = {inst.name: inst.dims for insts in computations.values() for inst in insts}
    memo: dict[str, float | None] = {}

    def flops_of(name: str) -> float | None:
        if name not in memo:
            memo[name] = _computation_flops(computations.get(name, []))
        return memo[name]

    def _computation_flops(instructions: Iterable[Instruction]) -> float | None:
        total = 0.0
        for inst in instructions:
            if inst.op in ("dot", "convolution"):
                total += _matmul_flops(inst, shapes)
            elif inst.op == "while":
                trips = _trip_count(computations.get(inst.attribute("condition").lstrip("%"), []))
                body = flops_of(inst.attribute("body").lstrip("%"))
                if trips is None or body is None:
                    return None
                total += trips * body
            elif inst.op == "conditional":
                branches = re.findall(r"%([\w.\-]+)", inst.attribute("branch_computations") or "")
                branches += [
                    inst.attribute(k).lstrip("%")
                    for k in ("true_computation", "false_computation")
                    if inst.attribute(k)
                ]
                costs = [flops_of(b) for b in branches]
                if any(c is None for c in costs):
                    return None
                total += max(costs, default=0.0)
            elif called := inst.attribute("calls"):
                for callee in re.findall(r"%([\w.\-]+)", called):
                    if (cost := flops_of(callee)) is None:
                        return None
                    total += cost
        return total

    return flops_of(entry)
