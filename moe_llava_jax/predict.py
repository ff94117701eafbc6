"""Ask a trained checkpoint questions about images.

    python -m moe_llava_jax.predict --checkpoint workdir/tiny/stage3/checkpoints \\
        --image workdir/tiny/data/images/eval_00000.png --prompt "Is there a red circle in the image?"
    python -m moe_llava_jax.predict --checkpoint DIR --questions q.jsonl --image_folder IMG \\
        --answers answers.jsonl

Batch mode reads LLaVA `model_vqa_loader` question files (`{"question_id", "image", "text"}`
per line) and writes its answer format (`{"question_id", "prompt", "text", "answer_id",
"model_id", "metadata"}`). The model, template and tokenizer come from the checkpoint's saved
config; decoding uses the KV cache, greedy by default (`--temperature`, `--top_p`, `--seed`
sample), and stops at EOS or the template's stop strings. The model runs on the devices at
hand (`answering.local_mesh`), whatever mesh the checkpoint was trained on.
"""

from __future__ import annotations

from absl import app, flags, logging

from moe_llava_jax import cli
from moe_llava_jax.answering import Predictor, answer_file
from moe_llava_jax.generate import Sampling

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


if __name__ == "__main__":
    flags.mark_flag_as_required("checkpoint")
    cli.run(main)
