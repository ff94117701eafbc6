"""POPE scored as the papers score it: LLaVA's question file, POPE's released label files and
an answer file, per category (split), with the three-split means.

    python -m moe_llava_jax.predict --checkpoint DIR --questions llava_pope_test.jsonl \\
        --image_folder val2014 --answers pope_answers.jsonl   # greedy, <= 128 new tokens
    python -m moe_llava_jax.evaluate.pope_official --questions llava_pope_test.jsonl \\
        --annotations DIR_WITH_coco_pope_JSONS --answers pope_answers.jsonl [--out pope.json]

Inputs: the questions `{"question_id", "image", "text", "category"}` (LLaVA's
`llava_pope_test.jsonl`, whose texts end with LLaVA's "Answer the question using a single
word or phrase."; predict's defaults are the papers' decoding), a folder of POPE's
`coco_pope_{random,popular,adversarial}.json` (JSON Lines `{"question_id", "image", "text",
"label": "yes"|"no"}`) and the answers `{"question_id", "text"}` (`predict` writes them).

As LLaVA's `eval_pope.py`: an answer's category is its question's; the answer is read from
its first sentence (`pope.parse_answer`); "yes" is the positive class; accuracy, precision,
recall, F1 and the yes-ratio per category, with TP / FP / TN / FN. Departure, a fix: the
original zips each category's answers with its label file *in file order*, so an answer file
in another order, or one answer short, is scored against the wrong labels without a word.
Here an answer meets its label by (category, question id), the label's image must be the
question's (a check that the two files number questions alike), and an unknown, repeated or
missing id fails naming it and its file line. The means over the categories scored (the
papers' single POPE figure is usually the three-split mean F1) come with the table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from absl import app, flags

from moe_llava_jax.evaluate import pope
from moe_llava_jax.evaluate.benchmark_answers import (
    Record,
    index_records,
    read_answers,
    read_jsonl_records,
    unanswered_error,
    unknown_id_error,
)

LABEL_FILE_PREFIX, LABEL_FILE_SUFFIX = "coco_pope_", ".json"


def read_label_files(directory: str | os.PathLike) -> dict[str, dict[str, Record]]:
    """{category: {question id: label record}} from the folder's `coco_pope_<category>.json`
    files (every other file is ignored; at least one must be there)."""
    files = sorted(
        p
        for p in Path(directory).iterdir()
        if p.name.startswith(LABEL_FILE_PREFIX) and p.name.endswith(LABEL_FILE_SUFFIX)
    )
    if not files:
        raise ValueError(f"{directory}: no {LABEL_FILE_PREFIX}<category>{LABEL_FILE_SUFFIX} files")
    labels = {}
    for path in files:
        category = path.name[len(LABEL_FILE_PREFIX) : -len(LABEL_FILE_SUFFIX)]
        records = read_jsonl_records(path)
        for record in records:
            if record.field("label") not in ("yes", "no"):
                raise ValueError(
                    f"{record.where}: field 'label' is {record.data['label']!r}, not yes/no"
                )
        labels[category] = index_records(records, lambda r: r.qid)
    return labels


def _label_of(question: Record, labels: Mapping[str, Mapping[str, Record]]) -> Record:
    """The label record of a question: same category and id, and the same image."""
    category = question.field("category")
    if category not in labels:
        raise ValueError(
            f"{question.where}: category {category!r} has no {LABEL_FILE_PREFIX}{category}"
            f"{LABEL_FILE_SUFFIX} among the label files (has: {sorted(labels)})"
        )
    label = labels[category].get(question.qid)
    if label is None:
        raise unknown_id_error(question, f"{LABEL_FILE_PREFIX}{category}{LABEL_FILE_SUFFIX}")
    if label.field("image") != question.field("image"):
        raise ValueError(
            f"{question.where}: image {question.data['image']!r}, but {label.where} with this "
            f"question_id is about {label.data['image']!r}: the files number questions differently"
        )
    return label


def score_official(
    questions: Sequence[Record],
    labels: Mapping[str, Mapping[str, Record]],
    answers: Sequence[Record],
) -> dict[str, dict]:
    """{category: pope.score metrics} for every category with label files, plus "mean":
    `pope.split_means` over those categories. Every labelled question of a scored
    category must be answered, once; every answer must be a question's."""
    by_id = index_records(questions, lambda q: q.qid)
    answered = index_records(answers, lambda a: a.qid)
    predictions: dict[str, list[str]] = {c: [] for c in labels}
    truths: dict[str, list[str]] = {c: [] for c in labels}
    for qid, answer in answered.items():
        question = by_id.get(qid)
        if question is None:
            raise unknown_id_error(answer, questions[0].source)
        label = _label_of(question, labels)
        category = question.field("category")
        predictions[category].append(answer.text)
        truths[category].append(label.field("label"))
    unanswered = [q for q in questions if q.qid not in answered and q.field("category") in labels]
    if unanswered:
        raise unanswered_error(unanswered)
    results = {c: pope.score(predictions[c], truths[c]) for c in labels if truths[c]}
    if not results:
        raise ValueError("no answered question belongs to a category with a label file")
    results["mean"] = pope.split_means(results)
    return results


def format_results(results: Mapping[str, Mapping]) -> str:
    """The per-category table, the counts eval_pope.py prints, and the means."""
    splits = {c: r for c, r in results.items() if c != "mean"}
    table = pope.markdown_table({**splits, "mean": results["mean"]})
    counts = "\n".join(
        f"{c}: {r['n']} questions, TP {r['tp']} FP {r['fp']} TN {r['tn']} FN {r['fn']}"
        for c, r in splits.items()
    )
    mean = results["mean"]
    means = (
        f"mean of {len(splits)} categories: accuracy {mean['accuracy']:.4f}, "
        f"F1 {mean['f1']:.4f}"
    )
    return "\n".join([table, counts, means])


def main(argv: Sequence[str]) -> None:
    del argv
    results = score_official(
        read_jsonl_records(flags.FLAGS.questions),
        read_label_files(flags.FLAGS.annotations),
        read_answers(flags.FLAGS.answers),
    )
    print(format_results(results))
    if flags.FLAGS.out:
        Path(flags.FLAGS.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    flags.DEFINE_string("questions", None, "POPE questions (LLaVA's llava_pope_test.jsonl).")
    flags.DEFINE_string("annotations", None, "Folder of POPE's coco_pope_<category>.json.")
    flags.DEFINE_string("answers", None, "Answers (predict's batch output).")
    flags.DEFINE_string("out", "", "Also write the scores here (JSON).")
    flags.mark_flags_as_required(["questions", "annotations", "answers"])
    app.run(main)
