"""The embedded default dataset: procedurally drawn shapes in LLaVA format.

It exists so the three MoE-Tuning stages can be exercised end to end on a CPU in minutes with
nothing downloaded.  Scenes are small enough for a tiny model to learn, yet structured enough
for the usual checks to mean something:

* 12 object kinds (4 shapes x 3 colours) placed in distinct cells of a 2x2 grid, so counting
  and left/right have one right answer;
* scene themes with different preferences over kinds, so object frequency and co-occurrence
  are non-uniform and POPE's popular/adversarial negatives differ from random ones;
* held-out evaluation images with object annotations, from which POPE questions are built.

Everything is drawn from `numpy.random.default_rng` streams derived from the seed, so the same
arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from moe_llava_jax.data.conversation import (
    IMAGE_PLACEHOLDER,
    get_template,
    render_prompt,
    render_segments,
)
from moe_llava_jax.data.tokenizer import train_bpe_tokenizer

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue")
OBJECT_NAMES = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)
_COLOUR_RGB = {"red": (214, 48, 41), "green": (46, 160, 67), "blue": (38, 84, 212)}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four")
_GRID = 2  # the image is a _GRID x _GRID grid of cells, one object per cell at most
_MAX_OBJECTS = _GRID * _GRID
_BACKGROUND_RGB = (238, 236, 230)
_MANIFEST_FORMAT = 2  # bump when the generator changes so old directories are regenerated


@dataclasses.dataclass(frozen=True)
class _Theme:
    """A kind of scene: its probability and the object kinds it favours (others weigh 1)."""

    name: str
    probability: float
    favoured: tuple[tuple[str, float], ...]


_THEMES = (
    _Theme(
        "garden",
        0.45,
        (("green circle", 8), ("green triangle", 6), ("red circle", 5), ("green cross", 3)),
    ),
    _Theme(
        "harbour",
        0.35,
        (("blue square", 8), ("blue triangle", 6), ("red square", 4), ("blue cross", 3)),
    ),
    _Theme(
        "workshop",
        0.20,
        (("red cross", 8), ("red triangle", 6), ("blue circle", 4), ("green square", 3)),
    ),
)


@dataclasses.dataclass(frozen=True)
class _Placed:
    """One object of a scene: an index into OBJECT_NAMES and a grid cell (row-major)."""

    kind: int
    cell: int

    @property
    def name(self) -> str:
        return OBJECT_NAMES[self.kind]

    @property
    def shape(self) -> str:
        return SHAPES[self.kind // len(COLOURS)]

    @property
    def colour(self) -> str:
        return COLOURS[self.kind % len(COLOURS)]

    @property
    def side(self) -> str:
        return "left" if self.cell % _GRID < _GRID / 2 else "right"


Scene = tuple[_Placed, ...]  # sorted by cell, i.e. in reading order


@dataclasses.dataclass(frozen=True)
class _ObjectStats:
    """Training-set statistics that make negatives "popular" or "adversarial"."""

    frequency: np.ndarray  # [K] number of images containing each kind
    cooccurrence: np.ndarray  # [K, K] number of images containing both kinds (zero diagonal)


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a generated dataset; image paths inside the JSON files are relative to `root`."""

    root: Path
    captions_json: Path
    instruct_json: Path
    eval_annotations_json: Path
    tokenizer_json: Path

    @classmethod
    def from_root(cls, root: str | Path) -> SyntheticDataset:
        """The fixed file layout under `root` (does not check that the files exist)."""
        root = Path(root)
        return cls(
            root=root,
            captions_json=root / "captions.json",
            instruct_json=root / "instruct.json",
            eval_annotations_json=root / "eval_annotations.json",
            tokenizer_json=root / "tokenizer.json",
        )


def pope_question(name: str) -> str:
    """The POPE / existence question form, shared by training data and evaluation."""
    return f"Is there a {name} in the image?"


def _theme_weights(theme: _Theme) -> np.ndarray:
    """Normalised `[K]` sampling probabilities of the object kinds in a theme."""
    weights = np.ones(len(OBJECT_NAMES))
    for name, weight in theme.favoured:
        weights[OBJECT_NAMES.index(name)] = weight
    return weights / weights.sum()


def _sample_scene(rng: np.random.Generator) -> Scene:
    """1-4 distinct object kinds in distinct cells, kinds drawn according to a random theme."""
    theme_probs = np.array([theme.probability for theme in _THEMES])
    theme = _THEMES[rng.choice(len(_THEMES), p=theme_probs / theme_probs.sum())]
    count = int(rng.integers(1, _MAX_OBJECTS + 1))
    cells = np.sort(rng.choice(_MAX_OBJECTS, size=count, replace=False))
    kinds = rng.choice(len(OBJECT_NAMES), size=count, replace=False, p=_theme_weights(theme))
    return tuple(_Placed(int(kind), int(cell)) for kind, cell in zip(kinds, cells))


def _draw_object(
    draw: ImageDraw.ImageDraw, obj: _Placed, image_size: int, rng: np.random.Generator
) -> None:
    """Draw one object filling most of its cell, with a little size/position/colour jitter."""
    cell = image_size / _GRID
    row, col = divmod(obj.cell, _GRID)
    half = cell * rng.uniform(0.34, 0.42)
    slack = max(0.0, cell / 2 - half - 1)
    cx, cy = (np.array([col, row]) + 0.5) * cell + rng.uniform(-slack, slack, size=2)
    rgb = np.clip(np.array(_COLOUR_RGB[obj.colour]) + rng.integers(-20, 21, size=3), 0, 255)
    fill = tuple(int(v) for v in rgb)
    box = (cx - half, cy - half, cx + half, cy + half)
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:  # cross: a plus sign whose arms are a third of its extent thick
        arm = half / 3
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)


def _draw_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render a scene on a light background with mild per-pixel noise."""
    noise = rng.integers(-6, 7, size=(image_size, image_size, 3))
    pixels = np.clip(np.array(_BACKGROUND_RGB) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        _draw_object(draw, obj, image_size, rng)
    return image


def _caption(scene: Scene) -> str:
    """'a red circle, a green cross and a blue square.' — all objects in reading order."""
    names = [f"a {obj.name}" for obj in scene]
    if len(names) == 1:
        return names[0] + "."
    return ", ".join(names[:-1]) + " and " + names[-1] + "."


def _object_stats(scenes: Sequence[Scene]) -> _ObjectStats:
    """Per-kind image counts and pairwise co-occurrence counts over the training scenes."""
    num_kinds = len(OBJECT_NAMES)
    presence = np.zeros((len(scenes), num_kinds), dtype=np.int64)  # [N, K]
    for index, scene in enumerate(scenes):
        presence[index, [obj.kind for obj in scene]] = 1
    cooccurrence = presence.T @ presence
    np.fill_diagonal(cooccurrence, 0)
    return _ObjectStats(frequency=presence.sum(axis=0), cooccurrence=cooccurrence)


def _negative_kind(
    present: Sequence[int], excluded: set[int], stats: _ObjectStats, rng: np.random.Generator
) -> int:
    """An absent kind drawn like POPE's negatives: random, popular or adversarial (1/3 each).

    Popular/adversarial pick among the top three absent kinds by frequency / by co-occurrence
    with the present kinds, so the model sees the hard negatives it will be tested on.
    """
    absent = np.array([k for k in range(len(OBJECT_NAMES)) if k not in excluded])
    strategy = int(rng.integers(3))
    if strategy == 0:
        return int(rng.choice(absent))
    if strategy == 1:
        scores = stats.frequency[absent]
    else:
        scores = stats.cooccurrence[np.asarray(present)][:, absent].sum(axis=0)
    top = absent[np.argsort(-scores, kind="stable")[:3]]
    return int(rng.choice(top))


def _existence_turns(
    scene: Scene, num_pairs: int, stats: _ObjectStats, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """`num_pairs` yes-questions and as many no-questions, so yes/no is exactly balanced."""
    present = [obj.kind for obj in scene]
    positives = rng.choice(present, size=num_pairs, replace=False)
    excluded = set(present)
    turns = [(pope_question(OBJECT_NAMES[int(kind)]), "Yes") for kind in positives]
    for _ in range(num_pairs):
        kind = _negative_kind(present, excluded, stats, rng)
        excluded.add(kind)
        turns.append((pope_question(OBJECT_NAMES[kind]), "No"))
    return turns


def _counting_turn(scene: Scene) -> tuple[str, str]:
    """Numbers are spelled out so the answer is plain words the tiny vocabulary already has."""
    count = len(scene)
    answer = "There is one object." if count == 1 else f"There are {_NUMBER_WORDS[count]} objects."
    return "How many objects are there in the image?", answer


def _other_turns(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Counting, colour (only for a shape that appears once) and left/right questions."""
    turns = [_counting_turn(scene)]
    shape_counts = Counter(obj.shape for obj in scene)
    unique = [obj for obj in scene if shape_counts[obj.shape] == 1]
    if unique:
        obj = unique[int(rng.integers(len(unique)))]
        turns.append((f"What color is the {obj.shape}?", f"It is {obj.colour}."))
    obj = scene[int(rng.integers(len(scene)))]  # kinds are distinct, so the name is unambiguous
    turns.append((f"Is the {obj.name} on the left or on the right?", f"On the {obj.side}."))
    return turns


def _instruction_turns(
    scene: Scene, stats: _ObjectStats, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """3-6 shuffled question/answer turns: up to 2 balanced existence pairs plus 1-2 others.

    Existence is POPE's question and the hardest skill here (it binds a colour and a shape to
    image content), so every record asks it as often as the scene allows.
    """
    others = _other_turns(scene, rng)
    num_others = int(rng.integers(1, min(2, len(others)) + 1))
    chosen = [others[i] for i in rng.permutation(len(others))[:num_others]]
    turns = _existence_turns(scene, min(2, len(scene)), stats, rng) + chosen
    return [turns[i] for i in rng.permutation(len(turns))]


def _caption_record(index: int, image: str, scene: Scene) -> dict:
    """Stage-1 record: the bare image as prompt, a caption naming every object as answer."""
    return {
        "id": f"caption_{index:05d}",
        "image": image,
        "conversations": [
            {"from": "human", "value": IMAGE_PLACEHOLDER},
            {"from": "gpt", "value": _caption(scene)},
        ],
    }


def _instruct_record(index: int, image: str, turns: Sequence[tuple[str, str]]) -> dict:
    """Stage-2/3 record; the image placeholder opens the first human turn, as in LLaVA data."""
    conversation = []
    for turn, (question, answer) in enumerate(turns):
        prefix = IMAGE_PLACEHOLDER + "\n" if turn == 0 else ""
        conversation.append({"from": "human", "value": prefix + question})
        conversation.append({"from": "gpt", "value": answer})
    return {"id": f"instruct_{index:05d}", "image": image, "conversations": conversation}


def _write_images(
    root: Path, split: str, scenes: Sequence[Scene], image_size: int, rng: np.random.Generator
) -> list[str]:
    """Draw and save every scene as PNG; returns the image paths relative to `root`."""
    paths = [f"images/{split}_{index:05d}.png" for index in range(len(scenes))]
    for relative, scene in zip(paths, scenes):
        _draw_scene(scene, image_size, rng).save(root / relative, format="PNG")
    return paths


def _tokenizer_corpus(caption_records: list[dict], instruct_records: list[dict]) -> Iterator[str]:
    """The exact text pieces the tokenizer will encode in training and POPE evaluation.

    Pieces are the rendered template chunks with the image placeholder and the end-of-answer
    special token cut out (they never reach BPE), so word boundaries such as " Yes" or
    "\\nIs" are learned as they will be seen.
    """
    chat = get_template("phi")
    plain = get_template("plain")
    texts: list[str] = list(OBJECT_NAMES)
    texts += [
        render_prompt(f"{IMAGE_PLACEHOLDER}\n{pope_question(name)}", chat) for name in OBJECT_NAMES
    ]
    for records, template in ((caption_records, plain), (instruct_records, chat)):
        for record in records:
            texts += [text for text, _ in render_segments(record["conversations"], template)]
    for text in texts:
        for piece in text.replace(chat.sep2, "").split(IMAGE_PLACEHOLDER):
            if piece:
                yield piece


def _write_json(path: Path, data: object) -> None:
    """Indented JSON: the files stay diffable and byte-stable across runs."""
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _manifest(seed: int, num_train: int, num_eval: int, image_size: int, vocab_size: int) -> dict:
    """Everything that determines the output; equal manifests mean reusable files."""
    return {
        "format": _MANIFEST_FORMAT,
        "seed": seed,
        "num_train": num_train,
        "num_eval": num_eval,
        "image_size": image_size,
        "vocab_size": vocab_size,
    }


def _is_complete(dataset: SyntheticDataset, manifest: dict) -> bool:
    """True when a previous run with the same arguments finished (the manifest is written last)."""
    manifest_path = dataset.root / "manifest.json"
    outputs = (
        dataset.captions_json,
        dataset.instruct_json,
        dataset.eval_annotations_json,
        dataset.tokenizer_json,
    )
    if not manifest_path.is_file() or not all(path.is_file() for path in outputs):
        return False
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8")) == manifest
    except json.JSONDecodeError:
        return False


def write_synthetic_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_train: int = 4000,
    num_eval: int = 200,
    image_size: int = 64,
    vocab_size: int = 512,
) -> SyntheticDataset:
    """Generate (or reuse) the dataset under `out_dir` and return its paths.

    Reuse happens when `manifest.json` records the same arguments, so callers can invoke this
    unconditionally at the start of every run.
    """
    if num_train < 1 or num_eval < 0:
        raise ValueError(f"need num_train >= 1 and num_eval >= 0, got {num_train} and {num_eval}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 to draw recognisable shapes, got {image_size}")
    dataset = SyntheticDataset.from_root(out_dir)
    manifest = _manifest(seed, num_train, num_eval, image_size, vocab_size)
    if _is_complete(dataset, manifest):
        return dataset

    manifest_path = dataset.root / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # an interrupted run must not look complete
    (dataset.root / "images").mkdir(parents=True, exist_ok=True)
    # Independent streams: changing how questions are drawn leaves the images untouched.
    scene_rng, pixel_rng, question_rng = (np.random.default_rng([seed, s]) for s in range(3))

    train_scenes = [_sample_scene(scene_rng) for _ in range(num_train)]
    eval_scenes = [_sample_scene(scene_rng) for _ in range(num_eval)]
    train_images = _write_images(dataset.root, "train", train_scenes, image_size, pixel_rng)
    eval_images = _write_images(dataset.root, "eval", eval_scenes, image_size, pixel_rng)
    stats = _object_stats(train_scenes)
    caption_records = [
        _caption_record(index, image, scene)
        for index, (image, scene) in enumerate(zip(train_images, train_scenes))
    ]
    instruct_records = [
        _instruct_record(index, image, _instruction_turns(scene, stats, question_rng))
        for index, (image, scene) in enumerate(zip(train_images, train_scenes))
    ]
    eval_annotations = [
        {"image": image, "objects": [obj.name for obj in scene]}
        for image, scene in zip(eval_images, eval_scenes)
    ]

    _write_json(dataset.captions_json, caption_records)
    _write_json(dataset.instruct_json, instruct_records)
    _write_json(dataset.eval_annotations_json, eval_annotations)
    corpus = _tokenizer_corpus(caption_records, instruct_records)
    tokenizer = train_bpe_tokenizer(corpus, vocab_size)
    tokenizer.save(dataset.tokenizer_json)
    _write_json(manifest_path, manifest)
    return dataset


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: `python -m moe_llava_jax.data.synthetic --out_dir DIR`."""
    parser = argparse.ArgumentParser(
        description="Generate the embedded synthetic LLaVA-format dataset."
    )
    parser.add_argument("--out_dir", required=True, help="directory to write the dataset into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--num_eval", type=int, default=200)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=512)
    args = parser.parse_args(argv)
    dataset = write_synthetic_dataset(
        args.out_dir,
        seed=args.seed,
        num_train=args.num_train,
        num_eval=args.num_eval,
        image_size=args.image_size,
        vocab_size=args.vocab_size,
    )
    for field in dataclasses.fields(dataset):
        print(f"{field.name}: {getattr(dataset, field.name)}")


if __name__ == "__main__":
    main()
