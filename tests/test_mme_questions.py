"""Tests for the MME folder -> question file converter.

A fake MME_Benchmark_release_version is written to tmp_path with both layouts (images/ +
questions_answers_YN/, and image next to txt), tiny real images, a CRLF file, a lower-case
answer, a double space before "Please answer yes or no.", an image nobody asks about and a
folder that is no MME task. Every expected record and score is written out by hand.
"""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

from moe_llava_jax.data.jsonl import iter_jsonl, write_jsonl
from moe_llava_jax.evaluate import benchmark_answers as ba
from moe_llava_jax.evaluate import mme_questions as mq

SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's MME prompt end
TASKS = ["artwork", "count", "code_reasoning"]


def _image(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), color).save(path)


def _txt(path, lines, newline="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())


@pytest.fixture
def mme_root(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    # flat layout, .jpg
    _image(root / "count" / "0001.jpg")
    _txt(
        root / "count" / "0001.txt",
        [
            "Is there one dog in the image? Please answer yes or no.\tYes",
            "Are there two dogs in the image? Please answer yes or no.\tNo",
        ],
    )
    _image(root / "count" / "0002.jpg", (0, 0, 255))
    _txt(
        root / "count" / "0002.txt",
        [
            "Are there three cats? Please answer yes or no.\tYes",
            "Are there four cats?  Please answer yes or no.\tNo",  # two spaces, as some MME lines
        ],
    )
    # images/ + questions_answers_YN/ layout; 10002.txt has CRLF and a trailing blank line;
    # "10002" sorts before "9" (file names compare as strings).
    _image(root / "artwork" / "images" / "10002.jpg")
    _txt(
        root / "artwork" / "questions_answers_YN" / "10002.txt",
        [
            "Is this artwork created by doe, jane? Please answer yes or no.\tYes",
            "Is this artwork created by roe, rick? Please answer yes or no.\tNo",
            "",
        ],
        newline="\r\n",
    )
    _image(root / "artwork" / "images" / "9.jpg")
    _txt(
        root / "artwork" / "questions_answers_YN" / "9.txt",
        [
            "Is this artwork displayed in musée d'orsay, paris? Please answer yes or no.\tno",
            "Is this artwork displayed in louvre, paris? Please answer yes or no.\tyes",
        ],
    )
    _image(root / "artwork" / "images" / "77.jpg")  # no questions: reported
    # flat layout, .png
    _image(root / "code_reasoning" / "0003.png")
    _txt(
        root / "code_reasoning" / "0003.txt",
        [
            "The image shows a python code. Is the output of the code '3'? "
            "Please answer yes or no.\tYes",
            "The image shows a python code. Is the output of the code '4'? "
            "Please answer yes or no.\tNo",
        ],
    )
    (root / "eval_tool").mkdir()  # not an MME task: reported, not converted
    (root / "readme.txt").write_text("not a task\n")
    return root


def _rec(image, text, category, answer):
    return {
        "question_id": image,
        "image": image,
        "text": text,
        "category": category,
        "answer": answer,
    }


# Task order is MME's table order (count is perception #2, artwork #9, code_reasoning is
# cognition), then file name, then line.
EXPECTED = [
    _rec("count/0001.jpg", "Is there one dog in the image?" + SUFFIX, "count", "yes"),
    _rec("count/0001.jpg", "Are there two dogs in the image?" + SUFFIX, "count", "no"),
    _rec("count/0002.jpg", "Are there three cats?" + SUFFIX, "count", "yes"),
    _rec("count/0002.jpg", "Are there four cats?" + SUFFIX, "count", "no"),
    _rec(
        "artwork/images/10002.jpg",
        "Is this artwork created by doe, jane?" + SUFFIX,
        "artwork",
        "yes",
    ),
    _rec(
        "artwork/images/10002.jpg",
        "Is this artwork created by roe, rick?" + SUFFIX,
        "artwork",
        "no",
    ),
    _rec(
        "artwork/images/9.jpg",
        "Is this artwork displayed in musée d'orsay, paris?" + SUFFIX,
        "artwork",
        "no",
    ),
    _rec(
        "artwork/images/9.jpg",
        "Is this artwork displayed in louvre, paris?" + SUFFIX,
        "artwork",
        "yes",
    ),
    _rec(
        "code_reasoning/0003.png",
        "The image shows a python code. Is the output of the code '3'?" + SUFFIX,
        "code_reasoning",
        "yes",
    ),
    _rec(
        "code_reasoning/0003.png",
        "The image shows a python code. Is the output of the code '4'?" + SUFFIX,
        "code_reasoning",
        "no",
    ),
]


def test_records_llava_style(mme_root):
    conversion = mq.convert(mme_root, TASKS)
    assert conversion.records == EXPECTED
    assert conversion.unknown_folders == ["eval_tool"]
    assert conversion.unused_images == ["artwork/images/77.jpg"]
    assert conversion.odd_files == []
    for record in conversion.records:
        assert (mme_root / record["image"]).is_file()
        with Image.open(mme_root / record["image"]) as image:
            assert image.size == (4, 3)


def test_records_mme_style_keep_the_question(mme_root):
    records = mq.convert(mme_root, ["count"], prompt_style="mme").records
    assert [r["text"] for r in records] == [
        "Is there one dog in the image? Please answer yes or no.",
        "Are there two dogs in the image? Please answer yes or no.",
        "Are there three cats? Please answer yes or no.",
        "Are there four cats?  Please answer yes or no.",
    ]
    assert [r["answer"] for r in records] == ["yes", "no", "yes", "no"]


def test_tasks_subset_is_in_mme_order_whatever_the_flag_order(mme_root):
    records = mq.convert(mme_root, ["code_reasoning", "count"]).records
    assert [r["category"] for r in records] == ["count"] * 4 + ["code_reasoning"] * 2


ALL_TASKS = [  # MME's table order, written out here rather than imported
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "OCR", "commonsense_reasoning", "numerical_calculation", "text_translation",
    "code_reasoning",
]  # fmt: skip
IMAGE_LAYOUT = {"artwork", "celebrity", "landmark", "posters", "scene"}


def _full_root(tmp_path):
    """All 14 tasks, one image and two questions each, in the layout each uses in MME."""
    root = tmp_path / "full"
    for task in ALL_TASKS:
        suffix = ".png" if task in {"code_reasoning", "commonsense_reasoning"} else ".jpg"
        if task in IMAGE_LAYOUT:
            image, txt = root / task / "images" / f"a{suffix}", root / task / "questions_answers_YN"
        else:
            image, txt = root / task / f"a{suffix}", root / task
        _image(image)
        _txt(
            txt / "a.txt",
            [f"Q1 {task}? Please answer yes or no.\tYes", f"Q2? {mq.MME_INSTRUCTION}\tNo"],
        )
    return root


def test_all_tasks_by_default(tmp_path):
    root = _full_root(tmp_path)
    records = mq.convert(root).records
    assert len(records) == 28
    assert [r["category"] for r in records[::2]] == ALL_TASKS
    assert records[16]["image"] == "artwork/images/a.jpg"
    assert records[18]["image"] == "OCR/a.jpg"
    assert records[26] == _rec(
        "code_reasoning/a.png", "Q1 code_reasoning?" + SUFFIX, "code_reasoning", "yes"
    )
    assert mq.counts_by_task(records) == {task: 2 for task in ALL_TASKS}


def test_missing_task_is_an_error_unless_tasks_are_named(tmp_path):
    root = _full_root(tmp_path)
    for path in sorted((root / "OCR").iterdir()):
        path.unlink()
    (root / "OCR").rmdir()
    with pytest.raises(
        ValueError, match=r"full: missing MME task folder\(s\) \['OCR'\] \(pass --tasks"
    ):
        mq.convert(root)
    assert len(mq.convert(root, ["count", "scene"]).records) == 4
    with pytest.raises(ValueError, match=r"missing MME task folder\(s\) \['OCR'\]$"):
        mq.convert(root, ["count", "OCR"])


def test_unknown_task_name(mme_root):
    with pytest.raises(ValueError, match=r"unknown MME task\(s\) \['ocr'\]"):
        mq.convert(mme_root, ["count", "ocr"])


# --- bad input: each error names its file and line ------------------------------------


def _count_root(tmp_path, lines, newline="\n"):
    root = tmp_path / "mme"
    _image(root / "count" / "0001.jpg")
    _txt(root / "count" / "0001.txt", lines, newline)
    return root, root / "count" / "0001.txt"


GOOD = "Is there a dog? Please answer yes or no.\tYes"


@pytest.mark.parametrize(
    "second_line, message",
    [
        (
            "Is there a cat? Please answer yes or no. No",
            r"line 2: expected 'question<TAB>answer', found 0 tabs",
        ),
        (
            "Is there a cat?\tPlease answer yes or no.\tNo",
            r"line 2: expected 'question<TAB>answer', found 2 tabs",
        ),
        (
            "Is there a cat? Please answer yes or no.\tMaybe",
            r"line 2: answer 'Maybe' is not Yes or No",
        ),
        ("Is there a cat? Please answer yes or no.\t", r"line 2: answer '' is not Yes or No"),
        ("\tNo", r"line 2: empty question"),
        ("Is there a cat?\tNo", r"line 2: question does not end with 'Please answer yes or no\.'"),
        ("Please answer yes or no.\tNo", r"line 2: question is only 'Please answer yes or no\.'"),
        ("Is there a dog?  Please answer yes or no.\tNo", r"line 2: same question as line 1"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, second_line, message):
    root, txt = _count_root(tmp_path, [GOOD, second_line])
    with pytest.raises(ValueError, match=r"count/0001\.txt: " + message):
        mq.convert(root, ["count"])


def test_bad_line_after_blank_line_keeps_its_number(tmp_path):
    root, _ = _count_root(tmp_path, [GOOD, "", "Is there a cat? Yes"], newline="\r\n")
    with pytest.raises(ValueError, match=r"count/0001\.txt: line 3: expected 'question<TAB>"):
        mq.convert(root, ["count"])


def test_txt_without_image(tmp_path):
    root, _ = _count_root(tmp_path, [GOOD])
    _txt(root / "count" / "0002.txt", [GOOD])
    with pytest.raises(
        ValueError,
        match=r"count/0002\.txt: no image for these questions \(looked for 0002\.jpg, 0002\.png",
    ):
        mq.convert(root, ["count"])


def test_images_layout_txt_without_image(mme_root):
    (mme_root / "artwork" / "images" / "9.jpg").unlink()
    with pytest.raises(
        ValueError, match=r"artwork/questions_answers_YN/9\.txt: no image .* in \S*artwork/images\)"
    ):
        mq.convert(mme_root, TASKS)


def test_ambiguous_image(tmp_path):
    root, _ = _count_root(tmp_path, [GOOD])
    _image(root / "count" / "0001.png")
    with pytest.raises(
        ValueError, match=r"count/0001\.txt: ambiguous image, both 0001\.jpg and 0001\.png"
    ):
        mq.convert(root, ["count"])


def test_images_folder_without_questions_folder(mme_root):
    (mme_root / "artwork" / "questions_answers_YN").rename(mme_root / "artwork" / "qa")
    with pytest.raises(ValueError, match=r"artwork: has images/ but no questions_answers_YN/"):
        mq.convert(mme_root, TASKS)


def test_empty_and_undecodable_files(tmp_path):
    root, txt = _count_root(tmp_path, [""])
    with pytest.raises(ValueError, match=r"count/0001\.txt: no questions"):
        mq.convert(root, ["count"])
    txt.write_bytes(b"Is it caf\xe9? Please answer yes or no.\tYes\n")
    with pytest.raises(ValueError, match=r"count/0001\.txt: not UTF-8"):
        mq.convert(root, ["count"])


def test_odd_number_of_questions_is_reported(tmp_path):
    root, _ = _count_root(
        tmp_path,
        [
            GOOD,
            "Is there a cat? Please answer yes or no.\tNo",
            "Is there a cow? Please answer yes or no.\tNo",
        ],
    )
    conversion = mq.convert(root, ["count"])
    assert len(conversion.records) == 3
    assert conversion.odd_files == [(str(root / "count" / "0001.txt"), 3)]


# --- command line ---------------------------------------------------------------------


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "moe_llava_jax.evaluate.mme_questions", *args],
        capture_output=True,
        text=True,
    )


def test_cli_writes_and_reports(mme_root, tmp_path):
    out = tmp_path / "q" / "mme_questions.jsonl"
    result = _cli(f"--mme_root={mme_root}", f"--out={out}", "--tasks=artwork,count,code_reasoning")
    assert result.returncode == 0, result.stderr
    assert [row for _, row in iter_jsonl(out)] == EXPECTED
    assert result.stdout.splitlines() == [
        "count: 4 questions, 2 images",
        "artwork: 4 questions, 2 images",
        "code_reasoning: 2 questions, 1 images",
        f"10 questions written to {out}",
        "warning: eval_tool: not an MME task, not converted",
        "warning: artwork/images/77.jpg: no questions about this image",
    ]


def test_cli_mme_style_and_missing_tasks(mme_root, tmp_path):
    out = tmp_path / "mme_questions.jsonl"
    result = _cli(f"--mme_root={mme_root}", f"--out={out}")  # 11 of 14 tasks absent
    assert result.returncode != 0
    assert "missing MME task folder(s) ['existence', 'position'" in result.stderr
    assert not out.exists()
    result = _cli(f"--mme_root={mme_root}", f"--out={out}", "--tasks=count", "--prompt_style=mme")
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text().splitlines()[3])["text"] == (
        "Are there four cats?  Please answer yes or no."
    )


def test_cli_bad_line_exits_naming_file_and_line(tmp_path):
    root, txt = _count_root(tmp_path, [GOOD, "Is there a cat? Please answer yes or no.\tperhaps"])
    out = tmp_path / "q.jsonl"
    result = _cli(f"--mme_root={root}", f"--out={out}", "--tasks=count")
    assert result.returncode == 2  # cli.run: one-line error, exit status 2
    assert f"error: {txt}: line 2: answer 'perhaps' is not Yes or No" in result.stderr
    assert not out.exists()


# --- through predict's answer_file and benchmark_answers' MME scorer -------------------

# The hand-made model: an answer per (image, question text).
CODE = "The image shows a python code. Is the output of the code"
PREDICTIONS = {
    ("count/0001.jpg", "Is there one dog in the image?"): "Yes",  # truth yes: right
    ("count/0001.jpg", "Are there two dogs in the image?"): "No",  # truth no: right
    ("count/0002.jpg", "Are there three cats?"): "No",  # truth yes: wrong
    ("count/0002.jpg", "Are there four cats?"): "No, there are none.",  # truth no: right
    ("artwork/images/10002.jpg", "Is this artwork created by doe, jane?"): "yes",  # right
    ("artwork/images/10002.jpg", "Is this artwork created by roe, rick?"): "Yes",  # truth no
    # "i ca" has neither yes nor no: "other", wrong whatever the truth (no)
    ("artwork/images/9.jpg", "Is this artwork displayed in musée d'orsay, paris?"): "I can't",
    ("artwork/images/9.jpg", "Is this artwork displayed in louvre, paris?"): "Yes.",  # right
    ("code_reasoning/0003.png", f"{CODE} '3'?"): "Yes",  # truth yes: right
    ("code_reasoning/0003.png", f"{CODE} '4'?"): "no",  # truth no: right
}


def test_answer_file_and_mme_scores(mme_root, tmp_path):
    from moe_llava_jax.answering import answer_file

    questions = tmp_path / "mme_questions.jsonl"
    write_jsonl(questions, mq.convert(mme_root, TASKS).records)

    def answer(texts, images, progress=False):
        # predict joins --image_folder and `image`: the files must be there
        answers = []
        for text, image in zip(texts, images):
            with Image.open(image) as im:
                assert im.size == (4, 3)
            assert text.endswith(SUFFIX)
            relative = image[len(str(mme_root)) + 1 :].replace("\\", "/")
            answers.append(PREDICTIONS[relative, text[: -len(SUFFIX)]])
        return answers

    predictor = SimpleNamespace(answer=answer, stage=SimpleNamespace(name="stub"))
    answers = tmp_path / "mme_answers.jsonl"
    answer_file(predictor, questions, mme_root, answers)

    scores = ba.run("mme", answers, tmp_path / "mme_txt", questions)
    # count: 3 of 4 right (acc 0.75); image 0001 both right, 0002 not (acc+ 0.5): 125.
    # artwork: 2 of 4 right (0.5); neither image has both right (0): 50.
    # code_reasoning: both right: acc 1, acc+ 1: 200.
    assert scores["tasks"] == {
        "count": {"acc": 0.75, "acc_plus": 0.5, "score": 125.0},
        "artwork": {"acc": 0.5, "acc_plus": 0.0, "score": 50.0},
        "code_reasoning": {"acc": 1.0, "acc_plus": 1.0, "score": 200.0},
    }
    assert scores["perception"] == 175.0  # 125 + 50
    assert scores["cognition"] == 200.0
    # calculation.py's files: an image's two questions on adjacent lines, truths from the folder
    assert (tmp_path / "mme_txt" / "count.txt").read_text().splitlines() == [
        "0001.jpg\tIs there one dog in the image? Answer the question using a single word or "
        "phrase.\tyes\tYes",
        "0001.jpg\tAre there two dogs in the image? Answer the question using a single word or "
        "phrase.\tno\tNo",
        "0002.jpg\tAre there three cats? Answer the question using a single word or phrase."
        "\tyes\tNo",
        "0002.jpg\tAre there four cats? Answer the question using a single word or phrase.\tno\t"
        "No, there are none.",
    ]
