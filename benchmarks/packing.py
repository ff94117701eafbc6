"""How much of a step is padding, per `data.packing` mode, on a LLaVA-665k-like length mix.

    python -m benchmarks.packing [--examples 20000] [--batch 16] [--json out.json]

The mix: LLaVA-v1.5-mix665k's components with their record counts (LLaVA paper, Table 7),
each drawn in proportion; every record's text length (tokens) from a gamma distribution
(shape 2) around the component's mean, clipped to [16, 2,048], plus 576 image tokens when the
component has images (all but ShareGPT). The per-component mean text lengths are estimates
(this machine cannot download the data), chosen so that the mean real length is ~840 of the
recipe's 2,624 positions, the figure issue 15 quotes. The rows are made by the pipeline's own
code: `pipeline.pack_first_fit` (grain's first-fit packer) and `bucketing.window_batches`.

Printed per mode (`none`, `bucket` at 4 lengths, `first_fit/BINSxSLOTS` at several bin
counts and image slots per row): rows per epoch of the drawn examples, the padded share of
the positions the linear layers compute, the share of the attention score work (T^2 per
row: the xla path and splash compute every segment-masked block of a row) that falls
outside the examples' own n^2 squares, and the share of vision-tower runs spent on empty image slots or on the
zero image of a text-only row.
"""

from __future__ import annotations

import argparse
import json

import grain
import numpy as np

from moe_llava_jax.data import bucketing
from moe_llava_jax.data import images as image_ops
from moe_llava_jax.data.conversation import IGNORE_INDEX
from moe_llava_jax.data.pipeline import Packing, Preprocessing, pack_first_fit

MAX_TEXT, IMAGE_TOKENS = 2048, 576
MAX_LENGTH = MAX_TEXT + IMAGE_TOKENS
# component -> (records in mix665k, has an image, estimated mean text tokens)
MIX = {
    "llava_instruct": (158_000, True, 380),
    "sharegpt": (40_000, False, 1_200),
    "vqav2": (83_000, True, 200),
    "gqa": (72_000, True, 200),
    "okvqa": (9_000, True, 60),
    "ocrvqa": (80_000, True, 150),
    "a_okvqa": (66_000, True, 90),
    "textcaps": (22_000, True, 60),
    "refcoco": (48_000, True, 280),
    "vg": (86_000, True, 260),
}


def draw_lengths(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(text tokens [count], has image [count]) of `count` records drawn from MIX."""
    rng = np.random.default_rng(seed)
    names = list(MIX)
    weights = np.array([MIX[n][0] for n in names], np.float64)
    component = rng.choice(len(names), size=count, p=weights / weights.sum())
    has_image = np.array([MIX[names[c]][1] for c in component])
    means = np.array([MIX[names[c]][2] for c in component], np.float64)
    text = np.clip(np.round(rng.gamma(2.0, means / 2.0)), 16, MAX_TEXT).astype(int)
    return text, has_image


def stand_in_examples(text: np.ndarray, has_image: np.ndarray) -> list[dict]:
    """Unpadded examples of those lengths (1-pixel images: only their count matters)."""
    return [
        {
            "input_ids": np.ones(n + IMAGE_TOKENS * int(image), np.int32),
            "labels": np.full(n + IMAGE_TOKENS * int(image), IGNORE_INDEX, np.int32),
            "images": np.zeros((int(image), 1, 1, 3), np.float32),
        }
        for n, image in zip(text, has_image)
    ]


def report(rows: int, length: int | np.ndarray, lengths: np.ndarray, tower_runs: int,
           images: int) -> dict:
    """Shares of padding for `rows` rows of `length` positions holding examples of `lengths`."""
    positions = np.sum(np.broadcast_to(length, (rows,)).astype(np.float64))
    square = np.sum(np.broadcast_to(length, (rows,)).astype(np.float64) ** 2)
    return {
        "rows": rows,
        "padding": 1.0 - lengths.sum() / positions,
        "attention_outside_examples": 1.0 - np.sum(lengths.astype(np.float64) ** 2) / square,
        "tower_runs_wasted": 1.0 - images / tower_runs,
    }


def measure(examples: int, batch: int, seed: int) -> dict:
    text, has_image = draw_lengths(examples, seed)
    lengths = text + IMAGE_TOKENS * has_image
    images = int(has_image.sum())
    results = {
        "mean_real_length": float(lengths.mean()),
        "none": report(examples, MAX_LENGTH, lengths, examples, images),
    }
    whole = examples - examples % (batch * 16)
    buckets = bucketing.bucket_lengths(MAX_LENGTH, 4)
    batch_lengths = []
    for start in range(0, whole, batch * 16):  # windows of 16 batches
        window = lengths[start : start + batch * 16]
        for members in bucketing.window_batches(window, buckets, batch):
            longest = window[members].max()
            batch_lengths += [buckets[np.searchsorted(buckets, longest)]] * batch
    results["bucket"] = report(
        len(batch_lengths),
        np.array(batch_lengths),
        lengths[:whole],
        whole,
        int(has_image[:whole].sum()),
    )
    prep = Preprocessing(1, image_ops.get_image_processor("clip"), False, IMAGE_TOKENS, MAX_LENGTH)
    stand_ins = stand_in_examples(text, has_image)
    for bins, slots in ((16, 4), (64, 4), (256, 4), (64, 3)):
        packing = Packing("first_fit", bins=bins, image_slots=slots)
        stream = grain.MapDataset.source(stand_ins).to_iter_dataset()
        rows = list(pack_first_fit(stream, prep, 0, packing))
        segment_lengths = np.concatenate(
            [np.bincount(row["segments"])[1:] for row in rows]
        )
        assert segment_lengths.sum() == lengths.sum()  # every example packed, whole
        results[f"first_fit/{bins}x{slots}"] = report(
            len(rows), MAX_LENGTH, segment_lengths, len(rows) * packing.image_slots, images
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=16, help="rows per batch (bucket mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    results = measure(args.examples, args.batch, args.seed)
    print(f"{args.examples} examples, mean real length {results['mean_real_length']:.0f} of "
          f"{MAX_LENGTH} positions")
    print(f"{'mode':<22}{'rows':>8}{'padding':>10}{'attention':>11}{'tower':>8}")
    for mode, r in results.items():
        if isinstance(r, dict):
            print(f"{mode:<22}{r['rows']:>8}{r['padding']:>10.1%}"
                  f"{r['attention_outside_examples']:>11.1%}{r['tower_runs_wasted']:>8.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
