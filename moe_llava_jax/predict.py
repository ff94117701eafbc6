"""Ask a trained checkpoint, or a released MoE-LLaVA model, questions about images.

    python -m moe_llava_jax.predict --checkpoint workdir/tiny/stage3/checkpoints \\
        --image workdir/tiny/data/images/eval_00000.png --prompt "Is there a red circle in the image?"
    python -m moe_llava_jax.predict --checkpoint DIR --questions q.jsonl --image_folder IMG \\
        --answers answers.jsonl
    python -m moe_llava_jax.predict --config=configs/moe_llava.py:llm=stablelm,release=DIR,\\
run_stages=stage3 --config.model.vision_from=CLIP_DIR --preset=pope --questions ... --answers ...

Batch mode reads LLaVA `model_vqa_loader` question files (`{"question_id", "image", "text"}`
per line) and writes its answer format (`{"question_id", "prompt", "text", "answer_id",
"model_id", "metadata"}`). With `--checkpoint` the model, template and tokenizer come from
the checkpoint's saved config; with `--config` from that config, the weights from the release
its `model.init_from_hf` names (`answering.Predictor`). Decoding uses the KV cache, greedy by
default (`--temperature`, `--top_p`, `--seed` sample), and stops at EOS or the template's stop
strings. `--preset=pope` is the papers' POPE protocol: greedy, up to 128 new tokens, each
question ending with LLaVA's "Answer the question using a single word or phrase." (added
where the question file lacks it). The model runs on the devices at hand
(`answering.local_mesh`), whatever mesh it was trained on.
"""

from __future__ import annotations

import dataclasses

from absl import app, flags, logging
from ml_collections import config_flags

from moe_llava_jax import cli
from moe_llava_jax.answering import Predictor, answer_file, with_suffix
from moe_llava_jax.data.conversation import SHORT_ANSWER_INSTRUCTION
from moe_llava_jax.generate import Sampling

flags.DEFINE_string("checkpoint", None, "A stage's checkpoints directory.")
config_flags.DEFINE_config_file(
    "config", None, "Instead of --checkpoint: a config whose model.init_from_hf is a release."
)
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
flags.DEFINE_enum("preset", "none", ["none", "pope"], "A benchmark's protocol (see above).")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A benchmark's decoding protocol: what it appends to each question, how long it lets
    answers run, greedy."""

    question_suffix: str
    max_new_tokens: int


PRESETS = {"pope": Preset(SHORT_ANSWER_INSTRUCTION, 128)}


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    FLAGS = flags.FLAGS
    if (FLAGS.checkpoint is None) == (FLAGS.config is None):
        raise app.UsageError("give one of --checkpoint and --config")
    preset = PRESETS.get(FLAGS.preset)
    if preset and FLAGS.temperature > 0:
        raise app.UsageError(f"--preset={FLAGS.preset} decodes greedily: drop --temperature")
    predictor = Predictor(
        FLAGS.checkpoint or FLAGS.config,
        batch_size=FLAGS.batch_size if FLAGS.questions else 1,
        max_new_tokens=preset.max_new_tokens if preset else FLAGS.max_new_tokens,
        sampling=Sampling(FLAGS.temperature, FLAGS.top_p, FLAGS.seed),
    )
    suffix = preset.question_suffix if preset else ""
    if FLAGS.questions:
        if not FLAGS.answers:
            raise app.UsageError("--questions needs --answers")
        answer_file(
            predictor, FLAGS.questions, FLAGS.image_folder, FLAGS.answers, question_suffix=suffix
        )
        print(f"answers written to {FLAGS.answers}")
        return
    if not FLAGS.prompt:
        raise app.UsageError("give --prompt (with --image), or --questions and --answers")
    print(predictor.answer([with_suffix(FLAGS.prompt, suffix)], [FLAGS.image])[0])


if __name__ == "__main__":
    cli.run(main)
