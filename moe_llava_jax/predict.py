"""Ask a trained checkpoint questions about images.

    python -m moe_llava_jax.predict --checkpoint workdir/tiny/stage3/checkpoints \\
        --image workdir/tiny/data/images/eval_00000.png --prompt "Is there a red circle in the image?"
    python -m moe_llava_jax.predict --checkpoint DIR --questions q.jsonl --image_folder IMG \\
        --answers answers.jsonl

Batch mode reads LLaVA `model_vqa_loader` question files (`{"question_id", "image", "text"}`
per line) and writes its answer format (`{"question_id", "prompt", "text", "answer_id",
"model_id", "metadata"}`). The model, template and tokenizer come from the checkpoint's saved
config; decoding uses the KV cache, greedy by default (`--temperature`, `--top_p`, `--seed`
sample), and stops at EOS or the template's stop strings.
"""

from __future__ import annotations

import functools
import json
import uuid
from pathlib import Path

import ml_collections
from absl import app, flags, logging

from moe_llava_jax import checkpoint, sharding, train
from moe_llava_jax.answering import Answerer
from moe_llava_jax.data.conversation import get_template
from moe_llava_jax.data.jsonl import iter_jsonl, write_jsonl
from moe_llava_jax.generate import GREEDY, CachedDecoder, Sampling


class Predictor:
    """A checkpoint ready to answer: its model, params, tokenizer, template, preprocessing."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        batch_size: int = 16,
        max_new_tokens: int = 128,
        sampling: Sampling = GREEDY,
    ):
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
        self.answer = Answerer(
            functools.partial(CachedDecoder(self.stage.model_cfg), self.params),
            self.tokenizer,
            get_template(config[meta["stage"]].template),
            self.stage.preprocessing(),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
        )


def answer_file(
    predictor: Predictor,
    questions_path: str | Path,
    image_folder: str | Path,
    answers_path: str | Path,
) -> None:
    """LLaVA question jsonl -> answer jsonl, in question order."""
    questions = []
    for lineno, row in iter_jsonl(questions_path):
        missing = [k for k in ("question_id", "text") if k not in row]
        if missing:
            raise ValueError(f"{questions_path}: line {lineno}: missing field {missing[0]!r}")
        questions.append(row)
    images = [str(Path(image_folder) / q["image"]) if q.get("image") else None for q in questions]
    answers = predictor.answer([q["text"] for q in questions], images, progress=True)
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


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    predictor = Predictor(
        flags.FLAGS.checkpoint,
        batch_size=flags.FLAGS.batch_size if flags.FLAGS.questions else 1,
        max_new_tokens=flags.FLAGS.max_new_tokens,
        sampling=Sampling(flags.FLAGS.temperature, flags.FLAGS.top_p, flags.FLAGS.seed),
    )
    if flags.FLAGS.questions:
        if not flags.FLAGS.answers:
            raise app.UsageError("--questions needs --answers")
        answer_file(
            predictor,
            flags.FLAGS.questions,
            flags.FLAGS.image_folder,
            flags.FLAGS.answers,
        )
        print(f"answers written to {flags.FLAGS.answers}")
        return
    if not flags.FLAGS.prompt:
        raise app.UsageError("give --prompt (with --image), or --questions and --answers")
    print(predictor.answer([flags.FLAGS.prompt], [flags.FLAGS.image])[0])


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
    flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample from softmax(logits / T).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most probable tokens up to p.")
    flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same batch -> same answers).")


if __name__ == "__main__":
    define_flags()
    flags.mark_flag_as_required("checkpoint")
    app.run(main)
