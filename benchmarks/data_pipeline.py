"""Data pipeline throughput at LLaVA scale, and whether it keeps up with the train step.

    python -m benchmarks.data_pipeline [--images 32] [--examples 48] [--repeats 3]
        [--workers 1,2] [--step_rate STEPS_PER_S]

Timed: LLaVA records -> `make_example`, i.e. phi chat-template tokenization plus 336-px CLIP
preprocessing in LLaVA's pad mode (decode, pad to square, bicubic resize + centre crop to the
uint8 pixels the model normalises on the device; 576 image tokens, max_length 2048), read
through grain from
  - json: `LlavaJsonSource`, one PNG file per record;
  - tfds: `TfdsSource` over the same records converted by `convert_to_tfds` (ArrayRecord);
each with k reader threads in this process (`grain.ReadOptions(num_threads=k)`) and with k
worker processes (`mp_prefetch(grain.MultiprocessingOptions(num_workers=k))`, one reader
thread each). Images are procedurally drawn 640x480 RGB PNGs (COCO's usual size) in a temp
dir. Examples/s is the median over `repeats` windows of `examples` examples, after a warm-up
that starts the workers.

Demand: the tiny config's stage 2 (configs/stage2.py: batch 32) jitted train step, timed
here on a batch of its own data (or `--step_rate`); the ratio column is examples/s over
32 x steps/s, so above 1 the pipeline keeps up with that step.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from configs import stage2
from moe_llava_jax import sharding, trainer
from moe_llava_jax.data import from_config
from moe_llava_jax.data import images as image_ops
from moe_llava_jax.data.conversation import get_template, tokenize_conversation
from moe_llava_jax.data.convert_to_tfds import convert
from moe_llava_jax.data.jsonl import write_jsonl
from moe_llava_jax.data.pipeline import Preprocessing, make_example
from moe_llava_jax.data.sources import LlavaJsonSource
from moe_llava_jax.data.tfds_source import TfdsSource
from moe_llava_jax.data.tokenizer import Tokenizer

# MoE-LLaVA's CLIP-L/14-336 setting: 24 x 24 patches.
PREP = Preprocessing(
    image_size=336,
    processor=image_ops.IMAGE_PROCESSORS["clip"],
    pad_to_square=True,
    num_image_tokens=576,
    max_length=2048,
)
TEMPLATE = get_template("phi")
_WORDS = (
    "the a an of on in near left right above below small large red green blue yellow white "
    "black person dog cat car table chair window street tree sky water building sign people "
    "holding standing sitting looking walking two three several some there is are with and"
).split()


def draw_image(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image.Image:
    """A gradient with shapes and mild noise: compresses and decodes roughly like a photo
    (pure noise would be slower, flat colour far faster)."""
    y, x = np.mgrid[0:height, 0:width]
    slope = rng.uniform(-0.2, 0.2, (2, 3))
    pixels = rng.uniform(40, 215, 3) + x[..., None] * slope[0] + y[..., None] * slope[1]
    pixels += rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = (int(v) for v in rng.integers(20, 200, 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def _sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(_WORDS, words)).capitalize() + "."


def make_record(index: int, image: str, rng: np.random.Generator) -> dict:
    """A LLaVA-Instruct-like record: three exchanges, answers of a few sentences."""
    conversations = []
    for turn in range(3):
        question = _sentence(rng, 12)
        if turn == 0:
            question = "<image>\n" + question
        answer = " ".join(_sentence(rng, 12) for _ in range(4))
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": f"bench_{index:05d}", "image": image, "conversations": conversations}


def write_data(root: Path, num_images: int) -> tuple[Path, Path]:
    """PNG images + a LLaVA JSONL file referring to them; returns (jsonl, image dir)."""
    rng = np.random.default_rng(0)
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    records = []
    for index in range(num_images):
        draw_image(rng).save(image_dir / f"{index:05d}.png")
        records.append(make_record(index, f"{index:05d}.png", rng))
    write_jsonl(root / "records.jsonl", records)
    return root / "records.jsonl", image_dir


def per_example_costs(source: LlavaJsonSource, tokenizer: Tokenizer, count: int) -> dict:
    """Median milliseconds per example of each step, single-threaded, no grain."""
    times: dict[str, list[float]] = {"decode PNG": [], "pad+resize+crop": [], "tokenize": []}
    for index in range(count):
        record = source[index % len(source)]
        start = time.perf_counter()
        pixels = image_ops.load_image(record["image"])
        decoded = time.perf_counter()
        image_ops.preprocess_image(pixels, PREP.image_size, PREP.processor, PREP.pad_to_square)
        preprocessed = time.perf_counter()
        tokenize_conversation(record["conversations"], TEMPLATE, tokenizer, PREP.num_image_tokens)
        tokenized = time.perf_counter()
        times["decode PNG"].append(decoded - start)
        times["pad+resize+crop"].append(preprocessed - decoded)
        times["tokenize"].append(tokenized - preprocessed)
    return {step: 1000 * statistics.median(t) for step, t in times.items()}


def example_stream(source, tokenizer: Tokenizer, reader: str, workers: int) -> grain.IterDataset:
    """Endless examples of `source` read by `workers` threads or processes."""
    examples = (
        grain.MapDataset.source(source)
        .repeat(None)
        .map(functools.partial(make_example, tokenizer=tokenizer, template=TEMPLATE, prep=PREP))
    )
    if reader == "threads":
        return examples.to_iter_dataset(
            grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * workers)
        )
    return examples.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    ).mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def examples_per_second(dataset: grain.IterDataset, examples: int, repeats: int) -> float:
    """Median rate over `repeats` windows after a warm-up (worker start-up, first imports)."""
    iterator = iter(dataset)
    for _ in range(8):
        next(iterator)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(examples):
            next(iterator)
        rates.append(examples / (time.perf_counter() - start))
    if hasattr(iterator, "close"):  # mp_prefetch: stop the worker processes now
        iterator.close()
    return statistics.median(rates)


def tiny_stage2_config(root: Path):
    """configs/stage2.py with its embedded data regenerated small under `root` (same
    vocabulary size and model, so the same tokenizer size and step cost)."""
    config = stage2.get_config()
    config.workdir = str(root / "workdir")
    config.data.root = str(root / "synthetic")
    config.data.synthetic.update(num_train=64, num_eval=8)
    return config


def measure_step_rate(config, data, tokenizer: Tokenizer, steps: int) -> float:
    """Steps/s of the config's stage-2 train step (random init, one batch of its own data;
    compiled first)."""
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = sharding.rules_from_config(config.sharding_rules)
    stage = trainer.Stage(config, "stage2", mesh, tokenizer.vocab_size)
    source = from_config.stage_source(config, "stage2", data)
    prep, template = stage.preprocessing(), get_template(config.stage2.template)
    batch_size = config.stage2.batch_size
    examples = []
    for index in range(len(source)):
        try:
            examples.append(make_example(source[index], tokenizer, template, prep))
        except ValueError:  # a record training would skip (too long)
            continue
        if len(examples) == batch_size:
            break
    batch = {
        key: jax.make_array_from_process_local_data(
            stage.batch_sharding, np.stack([e[key] for e in examples])
        )
        for key in examples[0]
    }
    with sharding.mesh_context(mesh, rules):  # as trainer.run
        params = stage.random_params()
        state = {
            "step": jax.device_put(jnp.zeros((), jnp.int32), stage.state_shardings["step"]),
            "params": params,
            "opt_state": jax.jit(stage.tx.init, out_shardings=stage.state_shardings["opt_state"])(
                params
            ),
        }
        for _ in range(2):  # compile, then one more for steady state
            state, _ = stage.train_step(state, batch)
        jax.block_until_ready(state)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, _ = stage.train_step(state, batch)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
    return 1 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="distinct images / records")
    parser.add_argument("--examples", type=int, default=48, help="examples per timed window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="thread / process counts to try")
    parser.add_argument("--step_rate", type=float, default=None, help="skip measuring it")
    parser.add_argument("--steps", type=int, default=5, help="train steps timed")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read their absl flags' defaults
    worker_counts = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = tiny_stage2_config(root)
        data, tokenizer = from_config.prepare_data(config)
        batch_size = config.stage2.batch_size
        step_rate = args.step_rate or measure_step_rate(config, data, tokenizer, args.steps)
        rate_note = "given" if args.step_rate else "measured"
        jsonl, image_dir = write_data(root / "bench", args.images)
        png_kb = sum(f.stat().st_size for f in image_dir.iterdir()) / args.images / 1024
        sources = {"json": LlavaJsonSource(jsonl, image_dir)}
        convert(jsonl, image_dir, root / "tfds", name="bench_llava", workers=2)
        sources["tfds"] = TfdsSource("bench_llava", "train", root / "tfds")
        costs = per_example_costs(sources["json"], tokenizer, 16)
        demand = step_rate * batch_size
        rows = []
        for name, source in sources.items():
            for reader in ("threads", "processes"):
                for workers in worker_counts:
                    rate = examples_per_second(
                        example_stream(source, tokenizer, reader, workers),
                        args.examples,
                        args.repeats,
                    )
                    rows.append((name, reader, workers, rate))

    print(
        f"\n{os.cpu_count()} CPU cores; jax {jax.default_backend()}; {args.images} 640x480 "
        f"PNGs of {png_kb:.0f} KiB on average; the phi template with the tiny config's "
        f"{tokenizer.vocab_size}-token BPE"
    )
    print(
        "per example, single thread (ms): "
        + ", ".join(f"{step} {ms:.1f}" for step, ms in costs.items())
    )
    print(
        f"demand: tiny stage 2, batch {batch_size} at {step_rate:.2f} steps/s ({rate_note}) "
        f"= {demand:.1f} examples/s\n"
    )
    print("| source | reader | workers | examples/s | ÷ demand |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, reader, workers, rate in rows:
        print(f"| {name} | {reader} | {workers} | {rate:.1f} | {rate / demand:.2f} |")


if __name__ == "__main__":
    main()
