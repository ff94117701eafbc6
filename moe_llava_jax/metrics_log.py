"""A stage's training log: `metrics.jsonl`, TensorBoard and the progress bar, written by
process 0 only, and kept consistent with the checkpoint a run resumes from.

A run killed between two checkpoints has logged steps that the resumed run repeats; on
resume the JSONL keeps only steps <= the resumed step (a half-written last line included)
and TensorBoard purges later events, so each step appears once, with the values of the run
that produced the final weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

# Router statistics with one value per MoE layer ([L_moe]), logged as moe/layer{i}/{key}.
PER_LAYER_METRICS = ("dropped_fraction", "router_entropy", "router_z_loss")


def log_metrics(writer: SummaryWriter, log_file, step: int, metrics: dict) -> dict:
    """Writes scalars (and per-MoE-layer router statistics) to TensorBoard and a JSONL file."""
    metrics = jax.device_get(metrics)
    scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    for key, value in scalars.items():
        writer.add_scalar(f"train/{key}", value, step)
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


class StageLog:
    """Context manager: the stage's log from `start` on (process 0 writes; others only run)."""

    def __init__(self, stage_dir: Path, name: str, start: int, num_steps: int):
        self.chief = jax.process_index() == 0
        self.stage_dir, self.name, self.start, self.num_steps = stage_dir, name, start, num_steps

    def __enter__(self) -> StageLog:
        if self.chief:
            truncate_jsonl(self.stage_dir / "metrics.jsonl", self.start)
            self.writer = SummaryWriter(
                str(self.stage_dir / "tensorboard"), purge_step=self.start + 1 or None
            )
            self.file = open(self.stage_dir / "metrics.jsonl", "a")
        self.bar = tqdm(
            total=self.num_steps,
            initial=self.start,
            desc=self.name,
            unit="step",
            disable=not self.chief,
        )
        return self

    def log(self, step: int, metrics: dict) -> None:
        if self.chief:
            scalars = log_metrics(self.writer, self.file, step, metrics)
            self.bar.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{scalars['lr']:.1e}")

    def message(self, text: str) -> None:
        if self.chief:
            tqdm.write(text)

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.chief:
            self.writer.close()
            self.file.close()
