"""Look at a stage's training data the way the model sees it.

Command:
  python -m moe_llava_jax.data.inspect --config=configs/stage2.py [--stage stage2] [--num 4]
      [--out grid.png]

Loads the stage's data through the training code itself (`from_config.prepare_data`,
`from_config.stage_source`, `build.StageModel.preprocessing`, `make_example`), so what it shows is what
a step consumes: a wrong template, image root, aspect mode or label mask is visible before
a run is spent on it. Per example it prints the decoded tokens with the unsupervised parts
(label = IGNORE_INDEX) inside `[prompt]...[/prompt]` and the supervised ones plain, image
placeholder runs as `<image×N>`, padding as `<pad×N>`, and token counts; it saves the
preprocessed images (the uint8 pixels the model normalises) as a PNG grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from moe_llava_jax import build, cli, sharding
from moe_llava_jax.data import from_config
from moe_llava_jax.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    get_template,
    tokenize_conversation,
)
from moe_llava_jax.data.pipeline import make_example
from moe_llava_jax.data.tokenizer import Tokenizer

PROMPT_OPEN, PROMPT_CLOSE = "[prompt]", "[/prompt]"


def _decode_run(ids: Sequence[int], tokenizer: Tokenizer) -> str:
    """Text of `ids` with each run of image placeholders shown as `<image×N>`; special
    tokens are kept (the end-of-answer token is part of what is learned)."""
    pieces = []
    for is_image, run in itertools.groupby(ids, key=lambda i: i == IMAGE_TOKEN_INDEX):
        run = list(run)
        if is_image:
            pieces.append(f"<image×{len(run)}>")
        else:
            pieces.append(tokenizer.decode(run, skip_special_tokens=False))
    return "".join(pieces)


def padding_length(input_ids: np.ndarray, labels: np.ndarray, pad_id: int) -> int:
    """Length of the trailing run of unsupervised pad tokens that `make_example` appends."""
    content = np.flatnonzero((input_ids != pad_id) | (labels != IGNORE_INDEX))
    return len(input_ids) - (int(content[-1]) + 1 if len(content) else 0)


def render_tokens(input_ids: np.ndarray, labels: np.ndarray, tokenizer: Tokenizer) -> str:
    """One example's tokens as text: unsupervised runs in `[prompt]...[/prompt]`,
    supervised runs plain, then `<pad×N>`."""
    pad = padding_length(input_ids, labels, tokenizer.pad_id)
    length = len(input_ids) - pad
    parts = []
    for masked, run in itertools.groupby(range(length), key=lambda t: labels[t] == IGNORE_INDEX):
        text = _decode_run([int(input_ids[t]) for t in run], tokenizer)
        parts.append(f"{PROMPT_OPEN}{text}{PROMPT_CLOSE}" if masked else text)
    if pad:
        parts.append(f"<pad×{pad}>")
    return "".join(parts)


def token_counts(input_ids: np.ndarray, labels: np.ndarray, pad_id: int) -> dict[str, int]:
    """Where an example's max_length goes: image slots, prompt text, answers, padding."""
    pad = padding_length(input_ids, labels, pad_id)
    ids, labels = input_ids[: len(input_ids) - pad], labels[: len(labels) - pad]
    image = int(np.sum(ids == IMAGE_TOKEN_INDEX))
    supervised = int(np.sum(labels != IGNORE_INDEX))
    return {
        "tokens": len(ids),
        "image": image,
        "prompt_text": len(ids) - image - supervised,
        "supervised": supervised,
        "padding": pad,
    }


def save_grid(images: Sequence[np.ndarray], titles: Sequence[str], path: Path) -> None:
    """uint8 images in a grid of at most 4 columns, titled, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(images))
    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def inspect_stage(config: ml_collections.ConfigDict, stage: str, num: int, out: str | Path) -> str:
    """Renders the first `num` records of `stage`'s data (as text, also returned) and writes
    their preprocessed images to `out`. A record training would skip is shown as skipped."""
    data, tokenizer = from_config.prepare_data(config)
    source = from_config.stage_source(config, stage, data)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    prep = build.StageModel(config, stage, mesh, tokenizer.vocab_size).preprocessing()
    template = get_template(config[stage].template)
    lines = [
        f"{stage}: {len(source)} records from {source!r}",
        f"template {template.name!r}, max_length {prep.max_length}, images "
        f"{prep.image_size}px ({prep.num_image_tokens} tokens), pad_to_square "
        f"{prep.pad_to_square}",
    ]
    images, titles = [], []
    for index in range(min(num, len(source))):
        record = source[index]
        header = f"--- record {index} (id {record.get('id')!r})"
        try:
            example = make_example(record, tokenizer, template, prep)
        except ValueError as error:  # what the training pipeline skips
            lines += [f"{header}: skipped: {error}"]
            continue
        counts = token_counts(example["input_ids"], example["labels"], tokenizer.pad_id)
        full, _ = tokenize_conversation(
            record["conversations"], template, tokenizer, prep.num_image_tokens
        )
        counts["cut_by_max_length"] = max(0, len(full) - prep.max_length)
        lines += [
            f"{header}: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
            render_tokens(example["input_ids"], example["labels"], tokenizer),
        ]
        images.append(example["images"])
        no_image = " (no image)" if record.get("image") is None else ""
        titles.append(f"{record.get('id')}{no_image}")
    if images:
        save_grid(images, titles, Path(out))
        lines.append(f"images: {out}")
    return "\n".join(lines)


def define_flags() -> None:
    """Flags of the command; defined only when run as a program, like train.py's."""
    config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
    flags.DEFINE_string("stage", None, "Stage to inspect (default: the config's first).")
    flags.DEFINE_integer("num", 4, "How many records to show.")
    flags.DEFINE_string("out", None, "PNG grid path (default: WORKDIR/STAGE/inspect.png).")
    flags.mark_flag_as_required("config")


def main(argv: Sequence[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # jax's backend probing is chatty at INFO
    config, args = flags.FLAGS.config, flags.FLAGS
    stage = args.stage or build.stage_names(config)[0]
    out = args.out or Path(config.workdir) / stage / "inspect.png"
    print(inspect_stage(config, stage, args.num, out))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
