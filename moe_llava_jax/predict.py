"""Ask a trained checkpoint questions about images.

    python -m moe_llava_jax.predict --checkpoint workdir/tiny/stage3/checkpoints \\
        --image workdir/tiny/data/images/eval_00000.png --prompt "Is there a red circle in the image?"
    python -m moe_llava_jax.predict --checkpoint DIR --questions q.jsonl --image_folder IMG \\
        --answers answers.jsonl

Batch mode reads LLaVA `model_vqa_loader` question files (`{"question_id", "image", "text"}`
per line) and writes its answer format (`{"question_id", "prompt", "text", "answer_id",
"model_id", "metadata"}`). The model, template and tokenizer come from the checkpoint's saved
config; decoding is greedy with the KV cache.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from moe_llava_jax import checkpoint, sharding, train
from moe_llava_jax.data.conversation import IMAGE_PLACEHOLDER, get_template, tokenize_prompt
from moe_llava_jax.data.jsonl import iter_jsonl, write_jsonl
from moe_llava_jax.data.pipeline import load_model_image
from moe_llava_jax.generate import CachedGreedyDecoder


class Predictor:
    """A checkpoint ready to answer: its model, params, tokenizer, template, preprocessing."""

    def __init__(self, checkpoint_dir: str | Path):
        meta = checkpoint.restore_meta(checkpoint_dir)
        config = ml_collections.ConfigDict(json.loads(meta["config"]))
        self.config = config
        self.tokenizer = train.load_tokenizer(config)
        mesh = sharding.make_mesh(config.mesh.to_dict())
        self.stage = train.Stage(config, meta["stage"], mesh, self.tokenizer.vocab_size)
        self.params, _ = checkpoint.restore_params(
            checkpoint_dir,
            checkpoint.abstract_like(self.stage.abstract_params, self.stage.param_shardings),
        )
        self.template = get_template(config[meta["stage"]].template)
        self.prep = self.stage.preprocessing()
        self.generate = functools.partial(CachedGreedyDecoder(self.stage.model_cfg), self.params)

    def answer(
        self, questions: Sequence[str], images: Sequence[str | None], max_new_tokens: int
    ) -> list[str]:
        """One greedy answer per (question, image path or None)."""
        prompts = [
            tokenize_prompt(
                f"{IMAGE_PLACEHOLDER}\n{q}" if image else q,
                self.template,
                self.tokenizer,
                self.prep.num_image_tokens,
            )
            for q, image in zip(questions, images)
        ]
        pixels = np.stack([load_model_image(image, self.prep) for image in images])
        outputs = self.generate(
            prompts,
            pixels,
            max_new_tokens=max_new_tokens,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
        )
        return [self.tokenizer.decode(ids).strip() for ids in outputs]


def answer_file(
    predictor: Predictor,
    questions_path: str | Path,
    image_folder: str | Path,
    answers_path: str | Path,
    *,
    batch_size: int,
    max_new_tokens: int,
) -> None:
    """LLaVA question jsonl -> answer jsonl, in question order."""
    questions = []
    for lineno, row in iter_jsonl(questions_path):
        missing = [k for k in ("question_id", "text") if k not in row]
        if missing:
            raise ValueError(f"{questions_path}: line {lineno}: missing field {missing[0]!r}")
        questions.append(row)
    model_id = f"moe_llava_jax/{predictor.stage.name}"
    rows = []
    for start in tqdm(range(0, len(questions), batch_size), desc="answering", unit="batch"):
        chunk = questions[start : start + batch_size]
        images = [str(Path(image_folder) / q["image"]) if q.get("image") else None for q in chunk]
        answers = predictor.answer([q["text"] for q in chunk], images, max_new_tokens)
        rows += [
            {
                "question_id": q["question_id"],
                "prompt": q["text"],
                "text": answer,
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "metadata": {},
            }
            for q, answer in zip(chunk, answers)
        ]
    write_jsonl(answers_path, rows)


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    predictor = Predictor(flags.FLAGS.checkpoint)
    if flags.FLAGS.questions:
        if not flags.FLAGS.answers:
            raise app.UsageError("--questions needs --answers")
        answer_file(
            predictor,
            flags.FLAGS.questions,
            flags.FLAGS.image_folder,
            flags.FLAGS.answers,
            batch_size=flags.FLAGS.batch_size,
            max_new_tokens=flags.FLAGS.max_new_tokens,
        )
        print(f"answers written to {flags.FLAGS.answers}")
        return
    if not flags.FLAGS.prompt:
        raise app.UsageError("give --prompt (with --image), or --questions and --answers")
    print(
        predictor.answer([flags.FLAGS.prompt], [flags.FLAGS.image], flags.FLAGS.max_new_tokens)[0]
    )


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (modules import each other)."""
    flags.DEFINE_string("checkpoint", None, "A stage's checkpoints directory.")
    flags.DEFINE_string("image", None, "Image file for a single question.")
    flags.DEFINE_string("prompt", None, "The question (single-question mode).")
    flags.DEFINE_string("questions", None, "Question jsonl (batch mode).")
    flags.DEFINE_string("image_folder", "", "Root of the questions' image paths.")
    flags.DEFINE_string("answers", None, "Answer jsonl to write (batch mode).")
    flags.DEFINE_integer("batch_size", 16, "Questions decoded together.")
    flags.DEFINE_integer("max_new_tokens", 128, "Longest answer in tokens.")


if __name__ == "__main__":
    define_flags()
    flags.mark_flag_as_required("checkpoint")
    app.run(main)
