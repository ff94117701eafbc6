"""POPE's official protocol: answers meet their labels by (category, question id) and are
counted exactly as LLaVA's eval_pope.py counts them."""

import json
import random

import pytest

from moe_llava_jax.evaluate import pope_official
from moe_llava_jax.evaluate.benchmark_answers import read_answers, read_jsonl_records

# (answer text, label): strings where a reading that is not eval_pope.py's would differ.
TRICKY = [
    ("Yes, there is a dog in the image.", "yes"),
    ("No.", "no"),
    ("No, there is no cat.", "yes"),  # a wrong "no"
    ("There is not a bus in the image", "no"),
    ("NO", "no"),  # upper case is no negation word: read as yes
    ("Nope", "no"),  # likewise
    ("Yes. No dog, though.", "yes"),  # only the first sentence counts: yes
    ("no,", "no"),  # the comma goes before splitting
    ("", "yes"),  # empty: yes
    ("I do not think so", "yes"),  # "not": no
    ("The answer is no", "no"),
    ("yes", "no"),
]


def eval_pope_transcribed(answers: list[dict], label_file: str) -> tuple[int, int, int, int]:
    """LLaVA's llava/eval/eval_pope.py, literally (answers zipped with labels in file
    order): (TP, FP, TN, FN)."""
    label_list = [json.loads(q)["label"] for q in open(label_file, "r")]
    for answer in answers:
        text = answer["text"]
        if text.find(".") != -1:
            text = text.split(".")[0]
        text = text.replace(",", "")
        words = text.split(" ")
        if "No" in words or "not" in words or "no" in words:
            answer["text"] = "no"
        else:
            answer["text"] = "yes"
    for i in range(len(label_list)):
        if label_list[i] == "no":
            label_list[i] = 0
        else:
            label_list[i] = 1
    pred_list = []
    for answer in answers:
        if answer["text"] == "no":
            pred_list.append(0)
        else:
            pred_list.append(1)
    pos, neg = 1, 0
    TP, TN, FP, FN = 0, 0, 0, 0
    for pred, label in zip(pred_list, label_list):
        if pred == pos and label == pos:
            TP += 1
        elif pred == pos and label == neg:
            FP += 1
        elif pred == neg and label == neg:
            TN += 1
        elif pred == neg and label == pos:
            FN += 1
    return TP, FP, TN, FN


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pope_files(tmp_path):
    """Questions over two categories (ids unique across the file, as LLaVA's), their label
    files, and answers in question order."""
    questions, answers = [], []
    labels = {"random": [], "adversarial": []}
    for category, offset in (("random", 0), ("adversarial", 100)):
        for i, (text, label) in enumerate(TRICKY):
            qid = offset + i
            image = f"COCO_val2014_{i:012d}.jpg"
            asked = f"Is there a thing{i} in the image?"
            questions.append(
                {
                    "question_id": qid,
                    "image": image,
                    "text": asked + "\nAnswer the question using a single word or phrase.",
                    "category": category,
                }
            )
            labels[category].append({"question_id": qid, "image": image, "text": asked, "label": label})
            # the adversarial split gets every answer flipped around, for different counts
            answers.append({"question_id": qid, "text": text if category == "random" else TRICKY[-1 - i][0]})
    label_dir = tmp_path / "pope"
    label_dir.mkdir()
    for category, rows in labels.items():
        write_jsonl(label_dir / f"coco_pope_{category}.json", rows)
    (label_dir / "README.md").write_text("not a label file")
    return (
        write_jsonl(tmp_path / "questions.jsonl", questions),
        label_dir,
        write_jsonl(tmp_path / "answers.jsonl", answers),
        answers,
    )


def mine_random(results):
    return tuple(results["random"][k] for k in ("tp", "fp", "tn", "fn"))


def scored(questions, label_dir, answers_path):
    return pope_official.score_official(
        read_jsonl_records(questions),
        pope_official.read_label_files(label_dir),
        read_answers(answers_path),
    )


def test_counts_equal_eval_pope_transcribed(pope_files):
    questions, label_dir, answers_path, answers = pope_files
    results = scored(questions, label_dir, answers_path)
    categories = {q["question_id"]: q["category"] for q in map(json.loads, open(questions))}
    for category in ("random", "adversarial"):
        mine = tuple(results[category][k] for k in ("tp", "fp", "tn", "fn"))
        theirs = eval_pope_transcribed(
            [dict(a) for a in answers if categories[a["question_id"]] == category],
            str(label_dir / f"coco_pope_{category}.json"),
        )
        assert mine == theirs, category
    assert mine_random(results) == (3, 3, 4, 2)  # the hand count (TRICKY, top to bottom)
    for metric in ("accuracy", "f1"):
        mean = (results["random"][metric] + results["adversarial"][metric]) / 2
        assert results["mean"][metric] == pytest.approx(mean)


def test_answer_order_does_not_matter(pope_files, tmp_path):
    """The original zips in file order (a shuffled answer file scores wrongly there); here
    answers meet labels by id."""
    questions, label_dir, answers_path, answers = pope_files
    shuffled = list(answers)
    random.Random(0).shuffle(shuffled)
    shuffled_path = write_jsonl(tmp_path / "shuffled.jsonl", shuffled)
    assert scored(questions, label_dir, shuffled_path) == scored(questions, label_dir, answers_path)


def test_format_prints_the_table_counts_and_means(pope_files):
    text = pope_official.format_results(scored(*pope_files[:3]))
    assert "| random |" in text and "| adversarial |" in text
    assert "random: 12 questions, TP 3 FP 3 TN 4 FN 2" in text
    assert "mean of 2 categories: accuracy" in text and "| mean | " in text


def test_a_missing_answer_is_named(pope_files, tmp_path):
    questions, label_dir, _, answers = pope_files
    short = write_jsonl(tmp_path / "short.jsonl", answers[:5] + answers[6:])
    with pytest.raises(ValueError, match=r"questions.jsonl: 1 questions have no answer: 5 \(line 6\)"):
        scored(questions, label_dir, short)


def test_an_unknown_answer_id_is_named(pope_files, tmp_path):
    questions, label_dir, _, answers = pope_files
    extra = write_jsonl(tmp_path / "extra.jsonl", answers + [{"question_id": 999, "text": "yes"}])
    with pytest.raises(ValueError, match=r"extra.jsonl: line 25: field 'question_id': unknown id 999"):
        scored(questions, label_dir, extra)


def swap_first_two_images(rows):
    rows[0]["image"], rows[1]["image"] = rows[1]["image"], rows[0]["image"]


def a_bad_label(rows):
    rows[2]["label"] = "maybe"


@pytest.mark.parametrize(
    "category,edit,match",
    [
        # label files that number questions otherwise than the question file
        (
            "random",
            swap_first_two_images,
            r"line 1: image 'COCO_val2014_000000000000.jpg', but .*coco_pope_random.json: line 1",
        ),
        ("adversarial", a_bad_label, r"coco_pope_adversarial.json: line 3: field 'label' is 'maybe'"),
    ],
    ids=["misnumbered", "bad-label"],
)
def test_a_bad_label_file_is_named(pope_files, category, edit, match):
    questions, label_dir, answers_path, _ = pope_files
    path = label_dir / f"coco_pope_{category}.json"
    rows = [json.loads(line) for line in open(path)]
    edit(rows)
    write_jsonl(path, rows)
    with pytest.raises(ValueError, match=match):
        scored(questions, label_dir, answers_path)
