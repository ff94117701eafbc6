"""Questions about images -> answer texts: the one path `predict`, POPE and the benchmark
answer files all go through, so they prompt, batch, decode and stop identically.

`Predictor` opens a stage's checkpoint for this: its saved config rebuilds the model (no
optimizer, no train step) on a mesh of the devices at hand, whatever mesh it trained on.

A question becomes the template's single-turn prompt (`<image>\\n` + question when there is an
image), encoded exactly as in training; batches have a fixed size (the last one is padded
with copies of its last question) so decoding compiles once per prompt-length bucket
(`generate.prompt_bucket`); each answer stops at EOS or at
the template's stop strings and is cut before the first stop string it contains.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from moe_llava_jax import checkpoint, sharding
from moe_llava_jax.build import StageModel, check_release_start, stage_names
from moe_llava_jax.data import from_config
from moe_llava_jax.data.conversation import (
    IMAGE_PLACEHOLDER,
    ChatTemplate,
    get_template,
    tokenize_prompt,
)
from moe_llava_jax.data.jsonl import iter_jsonl, write_jsonl
from moe_llava_jax.data.pipeline import Preprocessing, load_model_images, row_image
from moe_llava_jax.data.tokenizer import Tokenizer
from moe_llava_jax.generate import GREEDY, CachedDecoder, GenerateFn, Sampling, StopFn


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the earliest stop string (all of it when none occurs)."""
    ends = [text.find(s) for s in stop_strings if s and s in text]
    return text[: min(ends)] if ends else text


def stop_at_strings(tokenizer: Tokenizer, stop_strings: Sequence[str]) -> StopFn | None:
    """A decoding stop predicate: the ids so far decode to text containing a stop string.

    Checked on text, not on token ids, because a BPE tokenizer spells a string differently
    depending on its neighbours. Only the last few tokens are decoded: the stop string was
    absent one token earlier, so it must end inside the newest token and start within
    `len(stop string)` characters (>= that many tokens) before it."""
    strings = [s for s in stop_strings if s]
    if not strings:
        return None
    window = max(len(s) for s in strings) + 1

    def stop(ids: Sequence[int]) -> bool:
        text = tokenizer.decode(ids[-window:])
        return any(s in text for s in strings)

    return stop


@dataclasses.dataclass(frozen=True)
class Answerer:
    """Answers questions in fixed-size batches with a `GenerateFn` bound to params."""

    generate: GenerateFn
    tokenizer: Tokenizer
    template: ChatTemplate
    prep: Preprocessing
    batch_size: int
    max_new_tokens: int
    sampling: Sampling = GREEDY

    def _prompt(self, question: str, image: str | None) -> np.ndarray:
        text = f"{IMAGE_PLACEHOLDER}\n{question}" if image else question
        return tokenize_prompt(text, self.template, self.tokenizer, self.prep.num_image_tokens)

    def _answer_batch(self, questions: Sequence[str], images: Sequence[str | None]) -> list[str]:
        real = len(questions)
        padding = self.batch_size - real
        questions = list(questions) + [questions[-1]] * padding
        images = list(images) + [images[-1]] * padding
        outputs = self.generate(
            [self._prompt(q, image) for q, image in zip(questions, images)],
            np.stack([row_image(load_model_images(image, self.prep)) for image in images]),
            max_new_tokens=self.max_new_tokens,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            stop=stop_at_strings(self.tokenizer, self.template.stop_strings),
            sampling=self.sampling,
        )
        return [
            cut_at_stop_strings(self.tokenizer.decode(ids), self.template.stop_strings).strip()
            for ids in outputs[:real]
        ]

    def __call__(
        self, questions: Sequence[str], images: Sequence[str | None], progress: bool = False
    ) -> list[str]:
        """One answer per (question, image path or None), in order."""
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions but {len(images)} images")
        starts = range(0, len(questions), self.batch_size)
        if progress:
            starts = tqdm(starts, desc="answering", unit="batch")
        answers = []
        for start in starts:
            end = start + self.batch_size
            answers += self._answer_batch(questions[start:end], images[start:end])
        return answers


def release_stage(config: ml_collections.ConfigDict) -> str:
    """The stage of `config` that answers from the release `model.init_from_hf` names: the
    last of `run_stages` (its template and model), checked as training would check it."""
    if not config.model.get("init_from_hf", ""):
        raise ValueError(
            "config key model.init_from_hf is empty: answering from a config needs a released "
            "MoE-LLaVA directory there (or give a checkpoints directory instead)"
        )
    name = stage_names(config)[-1]
    check_release_start(config, name)
    return name


def local_mesh() -> jax.sharding.Mesh:
    """Every device of this process on the `data` axis: answering needs no other split
    (experts and weights replicated, questions split over the devices)."""
    return sharding.make_mesh({"data": -1})


class Predictor:
    """A model ready to answer: its model (rebuilt on `mesh`, default `local_mesh()`),
    params, tokenizer, template and preprocessing, from either

    - a stage's checkpoints directory: its saved config rebuilds the model, whatever mesh it
      trained on; or
    - a config whose `model.init_from_hf` names a released MoE-LLaVA directory: the last
      stage of its `run_stages` as that stage would start training (`fresh_params`: the
      release's decoder and projector, the tower from `model.vision_from`)."""

    def __init__(
        self,
        source: str | Path | ml_collections.ConfigDict,
        *,
        batch_size: int = 16,
        max_new_tokens: int = 128,
        sampling: Sampling = GREEDY,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.mesh = mesh or local_mesh()
        if isinstance(source, ml_collections.ConfigDict):
            config, name = source, release_stage(source)
            load = lambda stage: stage.fresh_params()
        else:
            meta = checkpoint.restore_meta(source)
            config = ml_collections.ConfigDict(json.loads(meta["config"]))
            name = meta["stage"]
            load = lambda stage: stage.restore_params(source)[0]
        self.config = config
        self.tokenizer = from_config.load_tokenizer(config)
        self.stage = StageModel(config, name, self.mesh, self.tokenizer.vocab_size)
        with sharding.mesh_context(self.mesh, self.stage.rules):
            self.params = load(self.stage)
        self.answerer = Answerer(
            functools.partial(CachedDecoder(self.stage.model_cfg), self.params),
            self.tokenizer,
            get_template(config[name].template),
            self.stage.preprocessing(),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
        )

    def answer(
        self, questions: Sequence[str], images: Sequence[str | None], progress: bool = False
    ) -> list[str]:
        """The answerer's answers, decoded under this mesh and the checkpoint's sharding
        rules (the context the models read their constraints from)."""
        with sharding.mesh_context(self.mesh, self.stage.rules):
            return self.answerer(questions, images, progress)


def with_suffix(question: str, suffix: str) -> str:
    """`question` ending with `suffix` (a benchmark's instruction), added only where absent:
    LLaVA's question files for some benchmarks carry it already."""
    return question if question.endswith(suffix) else question + suffix


def answer_file(
    predictor: Predictor,
    questions_path: str | Path,
    image_folder: str | Path,
    answers_path: str | Path,
    *,
    question_suffix: str = "",
) -> None:
    """LLaVA question jsonl -> answer jsonl, in question order; each question asked ending
    with `question_suffix` (`with_suffix`), its `prompt` field as the file has it."""
    questions = []
    for lineno, row in iter_jsonl(questions_path):
        missing = [k for k in ("question_id", "text") if k not in row]
        if missing:
            raise ValueError(f"{questions_path}: line {lineno}: missing field {missing[0]!r}")
        questions.append(row)
    images = [str(Path(image_folder) / q["image"]) if q.get("image") else None for q in questions]
    texts = [with_suffix(q["text"], question_suffix) for q in questions]
    answers = predictor.answer(texts, images, progress=True)
    model_id = f"moe_llava_jax/{predictor.stage.name}"
    write_jsonl(
        answers_path,
        [
            {
                "question_id": q["question_id"],
                "prompt": q["text"],
                "text": answer,
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "metadata": {},
            }
            for q, answer in zip(questions, answers)
        ],
    )
