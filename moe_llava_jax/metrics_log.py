"""A stage's training log: `metrics.jsonl`, `throughput.jsonl`, TensorBoard and the progress
bar, written by process 0 only, and kept consistent with the checkpoint a run resumes from.

A run killed between two checkpoints has logged steps that the resumed run repeats; on
resume the JSONLs keep only steps <= the resumed step (a half-written last line included)
and TensorBoard purges later events, so each step appears once, with the values of the run
that produced the final weights.

Wall-clock measures (step time, tokens/s, MFU) go to `throughput.jsonl` and TensorBoard's
`perf/`, not to `metrics.jsonl`: that one holds only what the data and weights determine,
so a resumed run's file is identical to an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

# Router statistics with one value per MoE layer ([L_moe]), logged as moe/layer{i}/{key}.
PER_LAYER_METRICS = ("dropped_fraction", "router_entropy", "router_z_loss")


def log_metrics(
    writer: SummaryWriter, log_file, step: int, metrics: dict, section: str = "train"
) -> dict:
    """Writes scalars (TensorBoard: `{section}/{key}`) and per-MoE-layer router statistics
    to TensorBoard and a JSONL file."""
    metrics = jax.device_get(metrics)
    scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    for key, value in scalars.items():
        writer.add_scalar(f"{section}/{key}", value, step)
    for layer, load in enumerate(metrics.get("expert_load", [])):
        for expert, value in enumerate(load):
            writer.add_scalar(f"moe/layer{layer}/expert{expert}_load", float(value), step)
    record = {"step": step, **scalars}
    for key in PER_LAYER_METRICS:
        for layer, value in enumerate(metrics.get(key, [])):
            writer.add_scalar(f"moe/layer{layer}/{key}", float(value), step)
    for key in ("expert_load", *PER_LAYER_METRICS):
        if key in metrics:
            record[key] = np.round(metrics[key], 4).tolist()
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    return scalars


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the records of steps <= last_step; drops a torn (unparsable) line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= last_step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


class Throughput:
    """Step time, real tokens/s, padding and MFU from wall-clock time between the loop's
    per-step syncs, counting the work of each step's real examples (`flops.batch_work`).

    The loop already waits for every step's result (it reads `nonfinite_streak`); `tick()`
    right after that wait marks the step's end, so the timing adds no device sync. The
    time between two ticks is everything a step costs the run (input pipeline and
    checkpointing included); the first tick of a run only starts the clock, so the first
    step's compilation is not counted.
    """

    def __init__(self, peak_flops: float, clock: Callable[[], float] = time.perf_counter):
        """`peak_flops`: of all devices together; 0 = unknown (no "mfu")."""
        self.peak_flops, self.clock = peak_flops, clock
        self.start: float | None = None  # the tick that opened the current interval
        self.last = 0.0  # the latest tick
        self.steps = 0  # steps timed since `start`
        self.positions = self.tokens = self.flops = 0.0  # their work

    def tick(self, positions: int, tokens: int, flops: float) -> None:
        """The step that just ended: its batch's positions, real tokens and the model FLOPs
        of its real examples."""
        self.last = self.clock()
        if self.start is None:
            self.start = self.last
            return
        self.steps += 1
        self.positions += positions
        self.tokens += tokens
        self.flops += flops

    def rates(self) -> dict[str, float]:
        """Means over the steps since the last call ({} before a step has been timed):
        `step_time_s`, `tokens_per_s` (real tokens), `padding` (the share of positions
        that are not) and `mfu` (real examples' model FLOPs per second / `peak_flops`,
        when it is known)."""
        if not self.steps:
            return {}
        elapsed = self.last - self.start
        rates = {
            "step_time_s": elapsed / self.steps,
            "tokens_per_s": self.tokens / elapsed,
            "padding": 1.0 - self.tokens / max(self.positions, 1),
        }
        if self.peak_flops > 0:
            rates["mfu"] = self.flops / elapsed / self.peak_flops
        self.start, self.steps = self.last, 0
        self.positions = self.tokens = self.flops = 0.0
        return rates


class StageLog:
    """Context manager: the stage's log from `start` on (process 0 writes; others only run)."""

    def __init__(self, stage_dir: Path, name: str, start: int, num_steps: int):
        self.chief = jax.process_index() == 0
        self.stage_dir, self.name, self.start, self.num_steps = stage_dir, name, start, num_steps

    def __enter__(self) -> StageLog:
        if self.chief:
            for name in ("metrics.jsonl", "throughput.jsonl"):
                truncate_jsonl(self.stage_dir / name, self.start)
            self.writer = SummaryWriter(
                str(self.stage_dir / "tensorboard"), purge_step=self.start + 1 or None
            )
            self.file = open(self.stage_dir / "metrics.jsonl", "a")
            self.throughput_file = open(self.stage_dir / "throughput.jsonl", "a")
        self.bar = tqdm(
            total=self.num_steps,
            initial=self.start,
            desc=self.name,
            unit="step",
            disable=not self.chief,
        )
        return self

    def log(self, step: int, metrics: dict, rates: dict[str, float]) -> None:
        """`metrics`: the step's; `rates`: `Throughput.rates()` (may be empty)."""
        if self.chief:
            scalars = log_metrics(self.writer, self.file, step, metrics)
            postfix = {"loss": f"{scalars['loss']:.3f}", "lr": f"{scalars['lr']:.1e}"}
            if rates:
                log_metrics(self.writer, self.throughput_file, step, rates, section="perf")
                postfix["tok/s"] = f"{rates['tokens_per_s']:.0f}"
            self.bar.set_postfix(postfix)

    def message(self, text: str) -> None:
        if self.chief:
            tqdm.write(text)

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.chief:
            self.writer.close()
            self.file.close()
            self.throughput_file.close()
