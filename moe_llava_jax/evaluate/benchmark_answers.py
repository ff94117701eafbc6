"""Benchmark answer files: official submission formats and local scores.

`predict.py` writes LLaVA `model_vqa_loader` answer files, one `{"question_id", "prompt",
"text", ...}` per line. The benchmarks of the MoE-LLaVA paper each want something else, and
this module does the conversions and scoring that LLaVA's and MoE-LLaVA's eval scripts do, so
that numbers compare with the paper's:

- VQAv2 test-dev: the EvalAI submission `[{"question_id": int, "answer": str}]`, answers
  normalised as LLaVA does before uploading (the server scores it).
- GQA testdev-balanced: `[{"questionId": str, "prediction": str}]` for GQA's own eval.py.
- TextVQA val: VQA accuracy against the ten human answers, scored here.
- ScienceQA-IMG: multiple-choice accuracy, overall and on the problems with an image.
- MME: the per-category txt files that MME's `eval_tool/calculation.py` reads, and the same
  score computed here.

Question ids are compared as strings because the same id is a number in one file and a string
in another (ScienceQA problem ids are JSON object keys). Bad input fails with a ValueError
naming the file, the line or record, and the field.

    python -m moe_llava_jax.evaluate.benchmark_answers --benchmark textvqa \\
        --answers textvqa_answers.jsonl --annotations TextVQA_0.5.1_val.json \\
        --out textvqa_scores.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from absl import app, flags

from moe_llava_jax.data.jsonl import iter_jsonl
from moe_llava_jax.evaluate.answer_normalization import normalize_answer, vqa_accuracy

BENCHMARKS = ("vqav2", "gqa", "textvqa", "scienceqa", "mme")

_JSON_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", type(None): "null"}
_MISSING_SHOWN = 5


# ---------------------------------------------------------------------------
# Input records
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Record:
    """One JSON object of an input file and where it came from (file, and "line 3" or
    "data[2]"), so that a problem found later can still name its file and line."""

    source: str
    location: str
    data: Mapping[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source}: {self.location}"

    def field(self, name: str, kinds: type | tuple[type, ...] = str) -> Any:
        """A required field's value, which must be one of `kinds` (a bool is no integer)."""
        if name not in self.data:
            raise ValueError(f"{self.where}: missing field {name!r}")
        value = self.data[name]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            expected = " or ".join(_JSON_TYPE_NAMES[kind] for kind in kinds)
            raise ValueError(f"{self.where}: field {name!r} is {value!r}, expected {expected}")
        return value

    @property
    def qid(self) -> str:
        """The question id as a string, the form ids are matched in."""
        return str(self.field("question_id", (int, str)))

    @property
    def text(self) -> str:
        return self.field("text")


def _record(path: str | os.PathLike, location: str, row: Any) -> Record:
    if not isinstance(row, dict):
        raise ValueError(f"{path}: {location}: expected a JSON object")
    return Record(str(path), location, row)


def read_jsonl_records(path: str | os.PathLike) -> list[Record]:
    """Every line of a JSON Lines file as a Record."""
    return [_record(path, f"line {lineno}", row) for lineno, row in iter_jsonl(path)]


def read_answers(path: str | os.PathLike) -> list[Record]:
    """An answer file as predict.py (or LLaVA) writes it; `question_id` and `text` are checked
    up front so that a broken file fails before any output is written."""
    answers = read_jsonl_records(path)
    if not answers:
        raise ValueError(f"{path}: no answers")
    for answer in answers:
        answer.field("question_id", (int, str))
        answer.field("text")
    return answers


def _load_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def read_textvqa_annotations(path: str | os.PathLike) -> list[Record]:
    """TextVQA's annotation file, `{"data": [{"question_id", "answers": [10 strings], ...}]}`."""
    content = _load_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'data' list")
    return [_record(path, f"data[{i}]", row) for i, row in enumerate(content["data"])]


def read_scienceqa_problems(path: str | os.PathLike) -> dict[str, Record]:
    """ScienceQA's problems.json: problem id -> {"choices", "answer" (index), "image", ...}."""
    content = _load_json(path)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object of problems keyed by problem id")
    return {pid: _record(path, f"problem {pid!r}", row) for pid, row in content.items()}


def index_records(records: Sequence[Record], key: Callable[[Record], Hashable]) -> dict[Any, Record]:
    """Records by key, in file order; a repeated key is an error (e.g. a merged answer file
    holding a chunk twice), where LLaVA's scripts would silently keep the last one."""
    index: dict[Any, Record] = {}
    for record in records:
        k = key(record)
        if k in index:
            raise ValueError(f"{record.where}: question {k!r} repeats {index[k].where}")
        index[k] = record
    return index


def _by_qid(record: Record) -> str:
    return record.qid


def unknown_id_error(answer: Record, reference: str) -> ValueError:
    return ValueError(
        f"{answer.where}: field 'question_id': unknown id {answer.data['question_id']!r} "
        f"(not in {reference})"
    )


def unanswered_error(questions: Sequence[Record]) -> ValueError:
    """Names how many questions went unanswered and the first few, with their lines."""
    shown = ", ".join(
        f"{q.data['question_id']!r} ({q.location})" for q in questions[:_MISSING_SHOWN]
    )
    more = ", ..." if len(questions) > _MISSING_SHOWN else ""
    return ValueError(
        f"{questions[0].source}: {len(questions)} questions have no answer: {shown}{more}"
    )


def _mean(values: Sequence[float]) -> float:
    """0.0 for no values, so that an empty subset still gives a table entry."""
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------
# VQAv2 and GQA: submission files
# ---------------------------------------------------------------------------


def _int_id(record: Record) -> int:
    value = record.field("question_id", (int, str))
    if isinstance(value, str) and not value.isdigit():
        raise ValueError(f"{record.where}: field 'question_id' is {value!r}, expected an integer")
    return int(value)


def vqav2_submission(
    answers: Sequence[Record], questions: Sequence[Record], *, allow_missing: bool = False
) -> list[dict]:
    """The EvalAI VQAv2 submission: one `{"question_id": int, "answer": str}` per question of
    `questions`, in their order, answers normalised with `normalize_answer`.

    LLaVA lists every test2015 question (llava_vqav2_mscoco_test2015.jsonl) while answering
    only test-dev, and gives the unanswered questions the answer "": pass `allow_missing=True`
    for that. By default an unanswered question is an error, which catches a truncated answer
    file. An answer to a question not in `questions` is always an error.
    """
    by_qid = index_records(answers, _by_qid)
    known = {q.qid for q in questions}
    for answer in by_qid.values():
        if answer.qid not in known:
            raise unknown_id_error(answer, "the question file")
    missing = [q for q in questions if q.qid not in by_qid]
    if missing and not allow_missing:
        raise unanswered_error(missing)
    return [
        {
            "question_id": _int_id(q),
            "answer": normalize_answer(by_qid[q.qid].text) if q.qid in by_qid else "",
        }
        for q in questions
    ]


def gqa_prediction(text: str) -> str:
    """LLaVA's GQA answer cleaning: trailing periods removed, lower-cased (surrounding
    whitespace is stripped first, which LLaVA leaves to the model)."""
    return text.strip().rstrip(".").lower()


def gqa_predictions(answers: Sequence[Record]) -> list[dict]:
    """The file GQA's eval.py reads: one `{"questionId": str, "prediction": str}` per answer."""
    return [
        {"questionId": a.qid, "prediction": gqa_prediction(a.text)}
        for a in index_records(answers, _by_qid).values()
    ]


# ---------------------------------------------------------------------------
# TextVQA
# ---------------------------------------------------------------------------


def _human_answers(annotation: Record) -> list[str]:
    answers = annotation.field("answers", list)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{annotation.where}: field 'answers' must be a non-empty string list")
    return answers


def textvqa_scores(
    answers: Sequence[Record], annotations: Sequence[Record]
) -> tuple[dict, list[dict]]:
    """TextVQA accuracy: mean VQA accuracy over the answers, and one entry per answer.

    Answers are matched to annotations by TextVQA `question_id`. (LLaVA's own question file,
    llava_textvqa_val_v051_ocr.jsonl, carries image ids in `question_id` and its scorer
    matches on image id and question text instead; a question file for this scorer must carry
    TextVQA's question ids.)
    """
    humans = {qid: _human_answers(a) for qid, a in index_records(annotations, _by_qid).items()}
    per_question = []
    for answer in index_records(answers, _by_qid).values():
        if answer.qid not in humans:
            raise unknown_id_error(answer, "the TextVQA annotations")
        per_question.append(
            {
                "question_id": answer.data["question_id"],
                "prediction": normalize_answer(answer.text),
                "accuracy": vqa_accuracy(answer.text, humans[answer.qid]),
            }
        )
    accuracy = _mean([entry["accuracy"] for entry in per_question])
    return {"accuracy": accuracy, "count": len(per_question)}, per_question


# ---------------------------------------------------------------------------
# ScienceQA
# ---------------------------------------------------------------------------

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
# As in LLaVA: the final "." is unescaped (any character), and only a single match counts.
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_letter(text: str) -> str:
    """The option letter of an answer, as LLaVA's eval_science_qa.py reads it: the whole text
    if it is an option letter ("B"), the first character of "B. <choice text>", else the
    letter of "The answer is B." if that occurs exactly once, else "FAILED" (counted wrong).
    No stripping and no case folding, as in LLaVA."""
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def _scienceqa_correct(letter: str, problem: Record) -> bool:
    """A letter beyond the problem's number of choices (or FAILED) is wrong."""
    offered = SCIENCEQA_OPTIONS[: len(problem.field("choices", list))]
    return letter in offered and offered.index(letter) == problem.field("answer", int)


def scienceqa_scores(
    answers: Sequence[Record], problems: Mapping[str, Record]
) -> tuple[dict, list[dict]]:
    """ScienceQA accuracy over the answers, and on the IMG subset (problems whose `image` is
    set), with the number of answers whose letter could not be parsed; one entry per answer.

    The answers' `question_id`s are ScienceQA problem ids. Only answered problems count, so
    the answers should cover the whole test split, as LLaVA's question file does.
    """
    per_question = []
    for answer in index_records(answers, _by_qid).values():
        problem = problems.get(answer.qid)
        if problem is None:
            raise unknown_id_error(answer, "the ScienceQA problems")
        letter = parse_scienceqa_letter(answer.text)
        per_question.append(
            {
                "question_id": answer.qid,
                "prediction": letter,
                "correct": _scienceqa_correct(letter, problem),
                "has_image": bool(problem.field("image", (str, type(None)))),
            }
        )
    with_image = [entry["correct"] for entry in per_question if entry["has_image"]]
    metrics = {
        "acc": _mean([entry["correct"] for entry in per_question]),
        "img_acc": _mean(with_image),
        "count": len(per_question),
        "img_count": len(with_image),
        "failed": sum(entry["prediction"] == FAILED for entry in per_question),
    }
    return metrics, per_question


# ---------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)
_YES_NO = ("yes", "no")
_OTHER = "other"
_LINE_BREAKS = re.compile(r"[\t\r\n]")


@dataclasses.dataclass(frozen=True)
class MMEItem:
    """One answered MME question."""

    category: str
    image: str  # as in the question file, e.g. "artwork/10002.jpg"
    question: str
    truth: str  # "yes" or "no"
    prediction: str  # the model's raw text


def _one_line(text: str) -> str:
    """Tabs and line breaks become spaces: calculation.py splits its files on them."""
    return _LINE_BREAKS.sub(" ", text)


def _mme_question(question: Record) -> tuple[str, str, str]:
    """(category, image, truth) of a question record, validated."""
    category = question.field("category")
    if category not in MME_PERCEPTION + MME_COGNITION:
        raise ValueError(f"{question.where}: field 'category' is {category!r}, not an MME task")
    truth = question.field("answer").lower()
    if truth not in _YES_NO:
        raise ValueError(f"{question.where}: field 'answer' is {truth!r}, expected yes or no")
    return category, question.field("image"), truth


def _by_question_and_prompt(record: Record) -> tuple[str, str]:
    return record.qid, record.field("prompt")


def _by_question_and_text(record: Record) -> tuple[str, str]:
    return record.qid, record.text


def mme_items(answers: Sequence[Record], questions: Sequence[Record]) -> list[MMEItem]:
    """Joins answers to MME questions, in question-file order.

    The question file (LLaVA's llava_mme.jsonl with the ground truth added fits) has per line
    `{"question_id", "image", "text", "category", "answer": "yes"|"no"}`, category one of the
    14 MME tasks. As in LLaVA, both questions about an image may share their `question_id`,
    so an answer is matched on `question_id` and `prompt` (the question text, which
    predict.py copies into the answer). Every question must be answered: MME totals are sums
    over tasks, meaningless on part of them.
    """
    by_key = index_records(answers, _by_question_and_prompt)
    items, missing = [], []
    for key, question in index_records(questions, _by_question_and_text).items():
        category, image, truth = _mme_question(question)
        answer = by_key.pop(key, None)
        if answer is None:
            missing.append(question)
        else:
            items.append(MMEItem(category, image, question.text, truth, answer.text))
    if missing:
        raise unanswered_error(missing)
    if by_key:
        answer = next(iter(by_key.values()))
        raise ValueError(
            f"{answer.where}: no MME question has this question_id and prompt "
            f"({answer.data['question_id']!r}, {answer.data['prompt']!r})"
        )
    return items


def parse_mme_answer(text: str) -> str:
    """Reads an answer as MME's calculation.py does, as "yes", "no" or "other": lower-cased,
    "yes" anywhere in its first four characters, else "no" there ("not sure" is "no"), else
    "other", which is wrong whatever the truth."""
    prefix = text.lower()[:4]
    for label in _YES_NO:
        if label in prefix:
            return label
    return _OTHER


def _images(items: Sequence[MMEItem]) -> dict[str, dict[str, list[MMEItem]]]:
    """category -> image -> its items, all in first-appearance order."""
    grouped: dict[str, dict[str, list[MMEItem]]] = {}
    for item in items:
        grouped.setdefault(item.category, {}).setdefault(item.image, []).append(item)
    return grouped


def mme_txt_files(items: Sequence[MMEItem]) -> dict[str, str]:
    """Contents of the files calculation.py reads, by category ("artwork" -> artwork.txt).

    One `image_name<TAB>question<TAB>truth<TAB>prediction` line per question; an image's
    questions are adjacent because calculation.py pairs consecutive lines as one image's two
    questions (MME asks exactly two per image).
    """
    return {
        category: "".join(
            f"{PurePosixPath(item.image).name}\t{_one_line(item.question)}\t{item.truth}\t"
            f"{_one_line(item.prediction)}\n"
            for image_items in images.values()
            for item in image_items
        )
        for category, images in _images(items).items()
    }


def write_mme_txt(out_dir: str | os.PathLike, items: Sequence[MMEItem]) -> list[Path]:
    """Writes `mme_txt_files` into `out_dir` (calculation.py's results folder)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for category, content in mme_txt_files(items).items():
        path = out_dir / f"{category}.txt"
        path.write_text(content, encoding="utf-8")
        paths.append(path)
    return paths


def _mme_task_score(images: Mapping[str, Sequence[MMEItem]]) -> dict:
    correct_per_image = [
        [parse_mme_answer(_one_line(item.prediction)) == item.truth for item in image_items]
        for image_items in images.values()
    ]
    acc = _mean([c for image in correct_per_image for c in image])
    acc_plus = _mean([all(image) for image in correct_per_image])
    return {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}


def mme_scores(items: Sequence[MMEItem]) -> dict:
    """MME scores as calculation.py computes them.

    Per task: acc over questions, acc+ over images (all of an image's questions right), score
    = (acc + acc+) * 100, so at most 200. Perception is the sum over the 10 perception tasks
    (at most 2000), cognition over the 4 cognition tasks (at most 800), each over the tasks
    present.
    """
    grouped = _images(items)
    tasks = {
        name: _mme_task_score(grouped[name])
        for name in MME_PERCEPTION + MME_COGNITION
        if name in grouped
    }
    return {
        "perception": sum(tasks[name]["score"] for name in MME_PERCEPTION if name in tasks),
        "cognition": sum(tasks[name]["score"] for name in MME_COGNITION if name in tasks),
        "tasks": tasks,
    }


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

# The flag naming each benchmark's reference file; GQA needs none (its eval.py has the truth).
REFERENCE_FLAG = {
    "vqav2": "questions",
    "textvqa": "annotations",
    "scienceqa": "annotations",
    "mme": "questions",
}


def _write_json(path: str | os.PathLike, content: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f)


def run(
    benchmark: str,
    answers_path: str | os.PathLike,
    out: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    *,
    allow_missing: bool = False,
) -> dict | None:
    """Writes `benchmark`'s file(s) at `out` and returns its scores (None for VQAv2 and GQA,
    which their servers and tools score). `reference` is the file named by REFERENCE_FLAG.

    vqav2 and gqa write the submission JSON; textvqa and scienceqa write their scores with
    the per-question entries as JSON; mme writes its txt files into the folder `out`.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    answers = read_answers(answers_path)
    if benchmark == "vqav2":
        questions = read_jsonl_records(reference)
        _write_json(out, vqav2_submission(answers, questions, allow_missing=allow_missing))
        return None
    if benchmark == "gqa":
        _write_json(out, gqa_predictions(answers))
        return None
    if benchmark == "mme":
        items = mme_items(answers, read_jsonl_records(reference))
        write_mme_txt(out, items)
        return mme_scores(items)
    if benchmark == "textvqa":
        scores, per_question = textvqa_scores(answers, read_textvqa_annotations(reference))
    else:
        scores, per_question = scienceqa_scores(answers, read_scienceqa_problems(reference))
    _write_json(out, {**scores, "per_question": per_question})
    return scores


def main(argv) -> None:
    del argv
    benchmark = flags.FLAGS.benchmark
    reference_flag = REFERENCE_FLAG.get(benchmark)
    reference = flags.FLAGS[reference_flag].value if reference_flag else None
    if reference_flag and not reference:
        raise app.UsageError(f"--benchmark {benchmark} needs --{reference_flag}")
    scores = run(
        benchmark,
        flags.FLAGS.answers,
        flags.FLAGS.out,
        reference,
        allow_missing=flags.FLAGS.allow_missing,
    )
    if scores is not None:
        print(json.dumps(scores, indent=2))
    print(f"{benchmark} written to {flags.FLAGS.out}")


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (modules import each other)."""
    flags.DEFINE_enum("benchmark", None, BENCHMARKS, "Which benchmark's files to write.")
    flags.DEFINE_string("answers", None, "Answer jsonl written by predict.py (LLaVA format).")
    flags.DEFINE_string(
        "questions", None, "Question jsonl: vqav2, every question id; mme, with ground truth."
    )
    flags.DEFINE_string(
        "annotations", None, "textvqa: TextVQA annotation json; scienceqa: problems.json."
    )
    flags.DEFINE_string(
        "out", None, "Submission or scores JSON to write; for mme, the folder of txt files."
    )
    flags.DEFINE_bool(
        "allow_missing", False, 'vqav2: answer unanswered questions with "" (as LLaVA does).'
    )


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["benchmark", "answers", "out"])
    app.run(main)
