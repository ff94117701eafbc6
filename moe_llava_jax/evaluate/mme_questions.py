"""MME's released folder -> the question file that `predict` answers and
`benchmark_answers --benchmark mme` scores.

    python -m moe_llava_jax.evaluate.mme_questions \\
        --mme_root MME_Benchmark_release_version --out mme_questions.jsonl

MME ships no question file, only one folder per task (the 14 of `MME_PERCEPTION` and
`MME_COGNITION`) in one of two layouts:

- `<task>/images/<name>.jpg` with `<task>/questions_answers_YN/<name>.txt` (artwork,
  celebrity, landmark, posters, scene);
- `<task>/<name>.png|.jpg` next to `<task>/<name>.txt` (the other nine).

Each txt holds one `question<TAB>Yes|No` line per question, two per image. As LLaVA's
`convert_answer_to_mme.py` does, the layout of a task is told by whether it has an `images`
folder, every `.txt` of the question folder is a question file, and a line is stripped before
it is split on its tab.

Each line becomes `{"question_id", "image", "text", "category", "answer"}`. The first four
are named as in LLaVA's `llava_mme.jsonl` (which MoE-LLaVA evaluates with too):
`question_id` and `image` are both the image path relative to the MME root
("artwork/images/14777.jpg", "code_reasoning/0020.png"), so an image's two questions share
their id, and `category` is the task folder. `answer` is the ground truth, lower-cased, which
`benchmark_answers` reads in place of LLaVA's second pass over the MME folder.

The text (`--prompt_style`): `llava` (default) is LLaVA-1.5's MME prompt: the MME question
without its closing "Please answer yes or no." and with "\\nAnswer the question using a single
word or phrase." appended (every line of llava_mme.jsonl has this form, and
convert_answer_to_mme.py undoes it to look the truth up), so scores compare with the
LLaVA-1.5 and MoE-LLaVA papers. `mme` keeps the MME question as it is.

Records come in a fixed order, task (MME's table order), then txt file name, then line;
llava_mme.jsonl follows `os.listdir` order instead, which no copy reproduces. Scores do not
depend on the order. Bad input fails with a ValueError naming the file and line; nothing is
skipped but blank lines.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from absl import app, flags

from moe_llava_jax import cli
from moe_llava_jax.data.conversation import SHORT_ANSWER_INSTRUCTION
from moe_llava_jax.data.jsonl import write_jsonl
from moe_llava_jax.evaluate.benchmark_answers import MME_COGNITION, MME_PERCEPTION

MME_TASKS = MME_PERCEPTION + MME_COGNITION
IMAGES_DIR = "images"  # its presence marks the images/ + questions_answers_YN/ layout
QUESTIONS_DIR = "questions_answers_YN"
IMAGE_SUFFIXES = (".jpg", ".png")
QUESTIONS_PER_IMAGE = 2  # calculation.py pairs consecutive lines as one image's questions
MME_INSTRUCTION = "Please answer yes or no."
PROMPT_STYLES = ("llava", "mme")
_TRUTHS = ("yes", "no")


@dataclasses.dataclass(frozen=True)
class Conversion:
    """The records of an MME root and what the caller should be told about it.

    `unknown_folders`: folders of the root that are no MME task (not converted);
    `unused_images`: images no txt file asks about; `odd_files`: txt files whose number of
    questions is not QUESTIONS_PER_IMAGE (MME's calculation.py would mis-pair their lines;
    this package's scorer does not)."""

    records: list[dict]
    unknown_folders: list[str]
    unused_images: list[str]
    odd_files: list[tuple[str, int]]


def _relative(path: Path, root: Path) -> str:
    """The path relative to the MME root with "/" separators: the form of LLaVA's ids, and
    what `predict --image_folder ROOT` joins back onto the root."""
    return path.relative_to(root).as_posix()


def select_tasks(root: Path, tasks: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(tasks to convert in MME's order, unknown folders of the root).

    Without `tasks` all 14 must be there: MME totals are sums over tasks, so a missing one
    would give a smaller total that looks like a worse model. With `tasks`, only those (each
    an MME task) must be there. Folders that are no MME task are returned to be reported,
    never converted (a copy named "ocr" is not "OCR")."""
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder (expected MME_Benchmark_release_version)")
    if tasks is not None:
        unknown = [t for t in tasks if t not in MME_TASKS]
        if unknown:
            raise ValueError(f"unknown MME task(s) {unknown}; the tasks are {list(MME_TASKS)}")
        if not tasks:
            raise ValueError("no tasks selected")
    wanted = [t for t in MME_TASKS if tasks is None or t in tasks]
    folders = {p.name for p in root.iterdir() if p.is_dir()}
    missing = [t for t in wanted if t not in folders]
    if missing:
        hint = "" if tasks is not None else " (pass --tasks to convert only some tasks)"
        raise ValueError(f"{root}: missing MME task folder(s) {missing}{hint}")
    extra = sorted(f for f in folders if f not in MME_TASKS and not f.startswith("."))
    return wanted, extra


def task_folders(root: Path, task: str) -> tuple[Path, Path]:
    """(image folder, question folder) of a task, by its layout."""
    task_dir = root / task
    if (task_dir / IMAGES_DIR).is_dir():
        questions_dir = task_dir / QUESTIONS_DIR
        if not questions_dir.is_dir():
            raise ValueError(f"{task_dir}: has {IMAGES_DIR}/ but no {QUESTIONS_DIR}/ folder")
        return task_dir / IMAGES_DIR, questions_dir
    return task_dir, task_dir


def image_of(txt: Path, image_dir: Path) -> Path:
    """The image a question file is about: same name, .jpg or .png. None or both is an
    error, since the questions cannot be asked about a missing or an uncertain image."""
    found = [image_dir / (txt.stem + s) for s in IMAGE_SUFFIXES]
    found = [p for p in found if p.is_file()]
    if not found:
        tried = ", ".join(txt.stem + s for s in IMAGE_SUFFIXES)
        raise ValueError(f"{txt}: no image for these questions (looked for {tried} in {image_dir})")
    if len(found) > 1:
        raise ValueError(f"{txt}: ambiguous image, both {found[0].name} and {found[1].name} exist")
    return found[0]


def parse_line(line: str, where: str) -> tuple[str, str]:
    """(question, "yes"|"no") of one `question<TAB>answer` line. Both parts are stripped (as
    LLaVA strips the line), so a CR of a Windows copy or a stray space is no part of the
    answer; a tab inside the question could not be told from the separator, so a line must
    have exactly one (split before stripping, so that a missing part is named as missing)."""
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != 2:
        raise ValueError(
            f"{where}: expected 'question<TAB>answer', found {len(parts) - 1} tabs: {line!r}"
        )
    question, answer = parts[0].strip(), parts[1].strip()
    if not question:
        raise ValueError(f"{where}: empty question")
    if answer.lower() not in _TRUTHS:
        raise ValueError(f"{where}: answer {answer!r} is not Yes or No")
    return question, answer.lower()


def prompt_text(question: str, style: str, where: str) -> str:
    """The text the model is asked (see the module docstring for the two styles).

    In the llava style a question must end with "Please answer yes or no.": LLaVA's
    convert_answer_to_mme.py finds the truth by putting that sentence back, so a question
    without it could not be LLaVA's, and a guessed prompt would not compare."""
    if style == "mme":
        return question
    if not question.endswith(MME_INSTRUCTION):
        raise ValueError(
            f"{where}: question does not end with {MME_INSTRUCTION!r}, so it has no LLaVA "
            f"prompt (use prompt style 'mme'): {question!r}"
        )
    body = question[: -len(MME_INSTRUCTION)].rstrip()
    if not body:
        raise ValueError(f"{where}: question is only {MME_INSTRUCTION!r}")
    return body + SHORT_ANSWER_INSTRUCTION


def file_records(txt: Path, image: str, task: str, style: str) -> list[dict]:
    """The records of one question file. Two lines with the same text would be one question
    to the scorer (it matches answers on id and text), so they are an error here already."""
    try:
        lines = txt.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{txt}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    records, seen = [], {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{txt}: line {lineno}"
        question, truth = parse_line(line, where)
        text = prompt_text(question, style, where)
        if text in seen:
            raise ValueError(f"{where}: same question as line {seen[text]}: {text!r}")
        seen[text] = lineno
        records.append(
            {"question_id": image, "image": image, "text": text, "category": task, "answer": truth}
        )
    if not records:
        raise ValueError(f"{txt}: no questions")
    return records


def _images_in(image_dir: Path) -> list[Path]:
    return sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES)


def convert(
    root: str | Path, tasks: Sequence[str] | None = None, prompt_style: str = "llava"
) -> Conversion:
    """Walks an MME root: records of the selected tasks (all 14 by default) in task, file
    name, line order, with what is to be reported (see `Conversion`)."""
    root = Path(root)
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {prompt_style!r}; expected one of {PROMPT_STYLES}")
    selected, unknown_folders = select_tasks(root, tasks)
    records: list[dict] = []
    unused: list[str] = []
    odd: list[tuple[str, int]] = []
    for task in selected:
        image_dir, questions_dir = task_folders(root, task)
        txts = sorted(p for p in questions_dir.iterdir() if p.is_file() and p.suffix == ".txt")
        if not txts:
            raise ValueError(f"{questions_dir}: no question (.txt) files")
        used = set()
        for txt in txts:
            image = image_of(txt, image_dir)
            used.add(image)
            rows = file_records(txt, _relative(image, root), task, prompt_style)
            if len(rows) != QUESTIONS_PER_IMAGE:
                odd.append((str(txt), len(rows)))
            records += rows
        unused += [_relative(p, root) for p in _images_in(image_dir) if p not in used]
    return Conversion(records, unknown_folders, unused, odd)


def counts_by_task(records: Iterable[Mapping]) -> dict[str, int]:
    """Questions per task, in MME's task order."""
    counts = Counter(r["category"] for r in records)
    return {t: counts[t] for t in MME_TASKS if t in counts}


def report(conversion: Conversion, out: str | Path) -> str:
    """What the command line prints: questions (and images) per task, the total, and a
    warning line for each thing not converted or not in MME's two-per-image form."""
    images = Counter(task for task, _ in {(r["category"], r["image"]) for r in conversion.records})
    lines = [
        f"{task}: {n} questions, {images[task]} images"
        for task, n in counts_by_task(conversion.records).items()
    ]
    lines.append(f"{len(conversion.records)} questions written to {out}")
    lines += [f"warning: {f}: not an MME task, not converted" for f in conversion.unknown_folders]
    lines += [
        f"warning: {txt}: {n} questions (MME asks {QUESTIONS_PER_IMAGE} per image)"
        for txt, n in conversion.odd_files
    ]
    lines += [
        f"warning: {image}: no questions about this image" for image in conversion.unused_images
    ]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    conversion = convert(flags.FLAGS.mme_root, flags.FLAGS.tasks or None, flags.FLAGS.prompt_style)
    write_jsonl(flags.FLAGS.out, conversion.records)
    print(report(conversion, flags.FLAGS.out))


def define_flags() -> None:
    """Command-line flags, defined only when run as a program."""
    flags.DEFINE_string("mme_root", None, "MME's MME_Benchmark_release_version folder.")
    flags.DEFINE_string("out", None, "Question jsonl to write.")
    flags.DEFINE_list("tasks", [], "Convert only these tasks (default: all 14, all required).")
    flags.DEFINE_enum(
        "prompt_style",
        "llava",
        PROMPT_STYLES,
        "llava: LLaVA-1.5's MME prompt (papers' numbers); mme: the MME question as is.",
    )


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["mme_root", "out"])
    cli.run(main)
