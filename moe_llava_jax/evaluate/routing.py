"""Which experts do image and text tokens choose? Per-layer, per-modality routing statistics
and plots, as in the MoE-LLaVA paper's routing figures.

    python -m moe_llava_jax.evaluate.routing --checkpoint workdir/tiny/stage3/checkpoints \\
        --out workdir/tiny/stage3/routing --num_batches 8 [--data eval.json --image_root DIR]

Runs the checkpoint (eval mode) on its stage's data, records every token's chosen experts in
each MoE layer, and writes `routing.json` (top-1 and top-k load per layer and modality, token
counts, most frequent top-1 pathways across layers) and `routing.png` (load heatmaps).
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from absl import flags, logging
from einops import rearrange

from moe_llava_jax import cli
from moe_llava_jax.answering import Predictor
from moe_llava_jax.data import from_config
from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
from moe_llava_jax.data.sources import LlavaJsonSource
from moe_llava_jax.models import scan
from moe_llava_jax.models.lvlm import layer_plans

MODALITIES = ("image", "text")


def routing_intermediates(model, params: Mapping, input_ids: jax.Array, images: jax.Array):
    """The model's eval forward, keeping what each MoE layer sowed (its expert choices), in
    the canonical per-layer layout (`models/scan.py`: scanned layers sow stacked values)."""
    _, state = model.apply(
        {"params": params}, input_ids, images, deterministic=True, mutable=["intermediates"]
    )
    return scan.unstack_layers(state["intermediates"], layer_plans(model.config))


def expert_choices(intermediates: Mapping, batch: int) -> np.ndarray:
    """[moe_layers, batch, seq, k] expert indices chosen by every token."""
    layers = intermediates["decoder"]
    per_layer = [
        np.asarray(layers[name]["moe"]["expert_index"][0])  # [groups, tokens, k]
        for name in sorted(layers, key=lambda n: int(n.split("_")[1]))
        if "moe" in layers[name]
    ]
    return np.stack(
        [rearrange(x, "g (b t) k -> (g b) t k", b=batch // x.shape[0]) for x in per_layer]
    )


class RoutingStatistics:
    """Counts accumulated over batches; pads (`valid` False) are left out."""

    def __init__(self, num_layers: int, num_experts: int):
        self.top1 = np.zeros((num_layers, len(MODALITIES), num_experts), np.int64)
        self.topk = np.zeros((num_layers, len(MODALITIES), num_experts), np.int64)
        self.tokens = np.zeros(len(MODALITIES), np.int64)
        self.paths = {m: collections.Counter() for m in MODALITIES}

    def add(self, choices: np.ndarray, input_ids: np.ndarray, valid: np.ndarray) -> None:
        """choices [layers, b, t, k]; input_ids, valid [b, t]."""
        num_experts = self.top1.shape[-1]
        for m, modality in enumerate(MODALITIES):
            is_image = input_ids == IMAGE_TOKEN_INDEX
            selected = valid & (is_image if modality == "image" else ~is_image)  # [b, t]
            picked = choices[:, selected]  # [layers, n, k]
            self.tokens[m] += picked.shape[1]
            for layer in range(picked.shape[0]):
                self.top1[layer, m] += np.bincount(picked[layer, :, 0], minlength=num_experts)
                self.topk[layer, m] += np.bincount(picked[layer].ravel(), minlength=num_experts)
            self.paths[modality].update(map(tuple, picked[:, :, 0].T.tolist()))

    def summary(self, moe_layers: tuple[int, ...], top_paths: int = 10) -> dict:
        def load(counts: np.ndarray) -> list:
            total = counts.sum(axis=-1, keepdims=True)
            return np.round(counts / np.maximum(total, 1), 4).tolist()

        return {
            "moe_layers": list(moe_layers),
            "modalities": list(MODALITIES),
            "tokens": dict(zip(MODALITIES, self.tokens.tolist())),
            "top1_counts": self.top1.tolist(),
            "top1_load": load(self.top1),  # [layer][modality][expert], rows sum to 1
            "topk_load": load(self.topk),
            "top_paths": {
                m: [[list(path), n] for path, n in self.paths[m].most_common(top_paths)]
                for m in MODALITIES
            },
        }


def plot(summary: Mapping, path: str | Path) -> None:
    """Heatmaps of top-k expert load: one panel per modality, MoE layers x experts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = np.asarray(summary["topk_load"])  # [layers, modalities, experts]
    fig, axes = plt.subplots(1, len(MODALITIES), figsize=(4 * len(MODALITIES), 3), sharey=True)
    for m, (ax, modality) in enumerate(zip(axes, MODALITIES)):
        image = ax.imshow(load[:, m], vmin=0, vmax=max(float(load.max()), 1e-6), cmap="viridis")
        ax.set_title(f"{modality} tokens ({summary['tokens'][modality]:,})")
        ax.set_xlabel("expert")
        ax.set_xticks(range(load.shape[-1]))
        ax.set_yticks(range(load.shape[0]), [f"layer {i}" for i in summary["moe_layers"]])
        for (row, col), value in np.ndenumerate(load[:, m]):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=axes, label="share of top-k assignments")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def analyse(stage, params: Mapping, source, tokenizer, num_batches: int, out_dir) -> dict:
    """Routing statistics of `stage`'s model on the first `num_batches` of its training
    batches from `source` -> summary; writes routing.json and routing.png under `out_dir`.
    `stage` is a `build.StageModel` (a trainer's `train.Stage` or a `Predictor`'s)."""
    out_dir = Path(out_dir)
    moe = stage.model_cfg.decoder.moe
    if moe is None:
        raise ValueError(f"stage {stage.name!r} has no MoE layers to analyse")
    forward = jax.jit(functools.partial(routing_intermediates, stage.model))
    stats = RoutingStatistics(len(stage.model_cfg.decoder.moe_layers), moe.num_experts)
    skip_log = stage.skip_log(source, out_dir / "skipped.jsonl")
    batches = itertools.islice(stage.dataset(source, tokenizer, skip_log), num_batches)
    for batch in batches:
        intermediates = forward(params, batch["input_ids"], batch["images"])
        choices = expert_choices(intermediates, len(batch["input_ids"]))
        stats.add(choices, batch["input_ids"], batch["input_ids"] != tokenizer.pad_id)
    summary = stats.summary(stage.model_cfg.decoder.moe_layers)
    (out_dir / "routing.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out_dir / "routing.png")
    return summary


def analyse_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    num_batches: int,
    data: str | None = None,
    image_root: str | None = None,
) -> dict:
    """`analyse` for a saved stage, on its own training data or on a LLaVA JSON/JSONL `data`
    file (image paths relative to `image_root`, default: the file's folder)."""
    predictor = Predictor(checkpoint_dir)
    stage, config = predictor.stage, predictor.config
    tokenizer = predictor.tokenizer
    if data:
        source = LlavaJsonSource(
            data, image_root or Path(data).parent, config.data.max_bad_fraction
        )
    else:
        source = from_config.stage_source(config, stage.name, from_config.prepare_data(config)[0])
    return analyse(stage, predictor.params, source, tokenizer, num_batches, out_dir)


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    out = flags.FLAGS.out or Path(flags.FLAGS.checkpoint).parent / "routing"
    summary = analyse_checkpoint(
        flags.FLAGS.checkpoint,
        out,
        flags.FLAGS.num_batches,
        flags.FLAGS.data,
        flags.FLAGS.image_root,
    )
    print(f"{summary['tokens']} tokens analysed; wrote {out}/routing.json and routing.png")


def define_flags() -> None:
    """Command-line flags, defined only when run as a program: the trainer imports `analyse`
    and must not grow these flags."""
    flags.DEFINE_string("checkpoint", None, "A stage-3 (MoE) checkpoints directory.")
    flags.DEFINE_string("out", None, "Output folder (default: next to the checkpoints).")
    flags.DEFINE_integer("num_batches", 8, "Batches of the stage's data to analyse.")
    flags.DEFINE_string("data", None, "LLaVA JSON/JSONL to analyse (default: the stage's data).")
    flags.DEFINE_string("image_root", None, "Root of --data's image paths (default: its folder).")


if __name__ == "__main__":
    define_flags()
    flags.mark_flag_as_required("checkpoint")
    cli.run(main)
