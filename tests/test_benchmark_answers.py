"""Tests for VQA answer normalisation and the benchmark answer writers and scorers.

Every expected value is worked out by hand in the comments; the fixtures are tiny files
written to tmp_path in the formats of the real benchmarks.
"""

import json
import subprocess
import sys

import pytest

from moe_llava_jax.data.jsonl import write_jsonl
from moe_llava_jax.evaluate import benchmark_answers as ba
from moe_llava_jax.evaluate.answer_normalization import (
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
)


def _answers(path, pairs, prompts=None):
    """An answer file as predict.py writes it, from (question_id, text) pairs."""
    prompts = prompts or [f"question {qid}" for qid, _ in pairs]
    write_jsonl(
        path,
        [
            {
                "question_id": qid,
                "prompt": prompt,
                "text": text,
                "answer_id": f"a{i}",
                "model_id": "test",
                "metadata": {},
            }
            for i, ((qid, text), prompt) in enumerate(zip(pairs, prompts))
        ],
    )
    return path


def _write_json(path, content):
    path.write_text(json.dumps(content))
    return path


# --- normalisation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit, final period dropped
        ("the cat", "cat"),  # article dropped
        ("An apple", "apple"),
        ("None", "0"),
        ("dont", "don't"),  # contraction table
        ("don't", "don't"),  # already contracted: unchanged
        ("Isnt it?", "isn't it"),  # "?" deleted by the tokenisation step
        ("whats that", "what's that"),
        ("1,000", "1000"),  # comma deleted, digits stay together
        ("2.5", "2.5"),  # a period before a digit stays
        ("5.", "5"),
        ("A t-shirt!", "t shirt"),  # "-" inside a word -> space; "!" -> space, then trimmed
        ("man's hat", "man 's hat"),  # the possessive is split off, as EvalAI does
        ("Yes\tsir\n", "yes sir"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        # A comma between digits anywhere deletes every mark, even the "!".
        ("1,000 dogs!", "1000 dogs"),
        # Without it: "!" touches a space -> deleted; "-" inside "x-y" -> space.
        ("dog ! x-y", "dog  x y"),
        # "3.5" keeps its period (a digit follows), "m." loses it.
        ("3.5 m.", "3.5 m"),
    ],
)
def test_process_punctuation(raw, expected):
    assert process_punctuation(raw) == expected


def test_process_punctuation_removes_at_most_32_periods():
    # The official call passes re.UNICODE (32) as the count: of 40 periods, 8 stay.
    assert process_punctuation("." * 40) == "." * 8


# Ten humans; k of them said "cat". Leave-one-out over the 10 subsets of 9 humans:
# - a subset without one of the k "cat" humans holds k - 1 "cat"s, scoring min((k-1)/3, 1);
# - a subset without one of the 10 - k others holds k, scoring min(k/3, 1).
# k=1: (1 * 0/3 + 9 * 1/3) / 10 = 3/10 = 0.3
# k=2: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10 = 0.6
# k=3: (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10 = 0.9
# k=4: (4 * 1 + 6 * 1) / 10 = 1.0
# k=0: 0.0
@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)])
def test_vqa_accuracy_leave_one_out(k, expected):
    others = ["dog", "bird", "fish", "cow", "pig", "hen", "owl", "bat", "ant", "elk"]
    humans = ["cat"] * k + others[: 10 - k]
    assert vqa_accuracy("cat", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    # "Two." -> "2"; humans "2", "two", "The two" all -> "2": k=3 -> 0.9 (see above).
    humans = ["2", "two", "The two"] + ["3"] * 7
    assert vqa_accuracy("Two.", humans) == pytest.approx(0.9)


def test_vqa_accuracy_needs_humans():
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("cat", [])


# --- input errors ----------------------------------------------------------------------


def test_answer_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "answers.jsonl"
    write_jsonl(path, [{"question_id": 1, "text": "a"}, {"question_id": 2}])
    with pytest.raises(ValueError, match=r"answers\.jsonl: line 2: missing field 'text'"):
        ba.read_answers(path)


def test_answer_bad_id_type(tmp_path):
    path = tmp_path / "answers.jsonl"
    write_jsonl(path, [{"question_id": [1], "text": "a"}])
    with pytest.raises(ValueError, match=r"line 1: field 'question_id' is \[1\], expected"):
        ba.read_answers(path)


def test_duplicate_answer_is_an_error(tmp_path):
    answers = ba.read_answers(_answers(tmp_path / "a.jsonl", [(7, "x"), (8, "y"), (7, "z")]))
    with pytest.raises(ValueError, match=r"a\.jsonl: line 3: question '7' repeats .*line 1"):
        ba.gqa_predictions(answers)


# --- VQAv2 -----------------------------------------------------------------------------


def _vqav2_questions(tmp_path, ids):
    path = tmp_path / "llava_vqav2_test.jsonl"
    write_jsonl(path, [{"question_id": qid, "image": f"{qid}.jpg", "text": "?"} for qid in ids])
    return path


def test_vqav2_submission(tmp_path):
    questions = _vqav2_questions(tmp_path, [10, 11, "12"])
    answers = _answers(tmp_path / "a.jsonl", [(11, "Two dogs."), (10, "Yes"), ("12", "the cat")])
    out = tmp_path / "sub" / "vqav2.json"
    assert ba.run("vqav2", answers, out, questions) is None
    # Question-file order, integer ids, normalised answers.
    assert json.loads(out.read_text()) == [
        {"question_id": 10, "answer": "yes"},
        {"question_id": 11, "answer": "2 dogs"},
        {"question_id": 12, "answer": "cat"},
    ]


def test_vqav2_missing_answers_name_count_and_first_ids(tmp_path):
    questions = ba.read_jsonl_records(_vqav2_questions(tmp_path, list(range(1, 9))))
    answers = ba.read_answers(_answers(tmp_path / "a.jsonl", [(2, "yes")]))
    # 7 unanswered (1, 3..8); the first five (1, 3, 4, 5, 6) are shown.
    with pytest.raises(ValueError) as e:
        ba.vqav2_submission(answers, questions)
    assert str(e.value) == (
        f"{tmp_path / 'llava_vqav2_test.jsonl'}: 7 questions have no answer: "
        "1 (line 1), 3 (line 3), 4 (line 4), 5 (line 5), 6 (line 6), ..."
    )
    submission = ba.vqav2_submission(answers, questions, allow_missing=True)
    assert [s["answer"] for s in submission] == ["", "yes", "", "", "", "", "", ""]


def test_vqav2_unknown_answer_id(tmp_path):
    questions = ba.read_jsonl_records(_vqav2_questions(tmp_path, [1]))
    answers = ba.read_answers(_answers(tmp_path / "a.jsonl", [(1, "yes"), (99, "no")]))
    with pytest.raises(ValueError, match=r"a\.jsonl: line 2: field 'question_id': unknown id 99"):
        ba.vqav2_submission(answers, questions, allow_missing=True)


# --- GQA -------------------------------------------------------------------------------


def test_gqa_predictions(tmp_path):
    answers = _answers(
        tmp_path / "a.jsonl", [(201, "Yes."), ("20968140", " Left "), (3, "Red car...")]
    )
    out = tmp_path / "gqa.json"
    assert ba.run("gqa", answers, out) is None
    assert json.loads(out.read_text()) == [
        {"questionId": "201", "prediction": "yes"},
        {"questionId": "20968140", "prediction": "left"},
        {"questionId": "3", "prediction": "red car"},
    ]


# --- TextVQA ---------------------------------------------------------------------------


def test_textvqa_scores(tmp_path):
    annotations = _write_json(
        tmp_path / "TextVQA_val.json",
        {
            "dataset_name": "textvqa",
            "data": [
                # "nokia" x2 among ten: 0.6 (see the leave-one-out table above).
                {"question_id": 1, "image_id": "a", "answers": ["Nokia"] * 2 + ["phone"] * 8},
                # "stop" x10: 1.0.
                {"question_id": 2, "image_id": "b", "answers": ["stop"] * 10},
                # "5" x1 ("five" normalises to "5"): 0.3.
                {"question_id": 3, "image_id": "c", "answers": ["five"] + ["6"] * 9},
            ],
        },
    )
    answers = _answers(tmp_path / "a.jsonl", [(1, "nokia"), (2, "STOP."), (3, "5")])
    out = tmp_path / "textvqa.json"
    scores = ba.run("textvqa", answers, out, annotations)
    # (0.6 + 1.0 + 0.3) / 3 = 1.9 / 3
    assert scores["accuracy"] == pytest.approx(1.9 / 3)
    assert scores["count"] == 3
    written = json.loads(out.read_text())
    assert [q["accuracy"] for q in written["per_question"]] == pytest.approx([0.6, 1.0, 0.3])
    assert [q["prediction"] for q in written["per_question"]] == ["nokia", "stop", "5"]


def test_textvqa_unknown_id(tmp_path):
    annotations = ba.read_textvqa_annotations(
        _write_json(tmp_path / "t.json", {"data": [{"question_id": 1, "answers": ["x"] * 10}]})
    )
    answers = ba.read_answers(_answers(tmp_path / "a.jsonl", [("003a8ae2", "x")]))
    with pytest.raises(ValueError, match="unknown id '003a8ae2'"):
        ba.textvqa_scores(answers, annotations)


def test_textvqa_annotation_without_answers(tmp_path):
    annotations = ba.read_textvqa_annotations(
        _write_json(tmp_path / "t.json", {"data": [{"question_id": 1}]})
    )
    answers = ba.read_answers(_answers(tmp_path / "a.jsonl", [(1, "x")]))
    with pytest.raises(ValueError, match=r"t\.json: data\[0\]: missing field 'answers'"):
        ba.textvqa_scores(answers, annotations)


# --- ScienceQA -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),  # a bare option letter
        ("C. photosynthesis", "C"),  # "C. " prefix
        ("The answer is A.", "A"),
        ("Because of X. The answer is D.", "D"),
        ("The answer is Dx", "D"),  # the pattern's final "." is any character
        ("The answer is D", "FAILED"),  # ...but one must follow
        ("The answer is A. The answer is B.", "FAILED"),  # two matches
        ("b", "FAILED"),  # case-sensitive
        (" B", "FAILED"),  # not stripped
        ("C.", "FAILED"),  # "C." without the space
        ("Answer: B", "FAILED"),
        ("F", "FAILED"),  # not an option letter
    ],
)
def test_parse_scienceqa_letter(text, expected):
    assert ba.parse_scienceqa_letter(text) == expected


def test_scienceqa_scores(tmp_path):
    problems = _write_json(
        tmp_path / "problems.json",
        {
            # answer is an index into choices: 1 -> "B".
            "1": {"question": "q1", "choices": ["x", "y"], "answer": 1, "image": "image.png"},
            "2": {"question": "q2", "choices": ["x", "y", "z"], "answer": 0, "image": None},
            "3": {"question": "q3", "choices": ["x", "y"], "answer": 1, "image": "image.png"},
            "4": {"question": "q4", "choices": ["x", "y"], "answer": 0, "image": "image.png"},
            "5": {"question": "q5", "choices": ["x", "y"], "answer": 0, "image": None},
        },
    )
    answers = _answers(
        tmp_path / "a.jsonl",
        [
            ("1", "B"),  # right, IMG
            ("2", "The answer is A."),  # right, no image
            ("3", "C"),  # "C" parses, but only A/B are offered: wrong, IMG
            ("4", "I am not sure"),  # FAILED: wrong, IMG
            # problem 5 unanswered: only answers count
        ],
    )
    out = tmp_path / "sqa.json"
    scores = ba.run("scienceqa", answers, out, problems)
    # all: 2 right of 4; IMG (1, 3, 4): 1 right of 3.
    assert scores == {
        "acc": pytest.approx(0.5),
        "img_acc": pytest.approx(1 / 3),
        "count": 4,
        "img_count": 3,
        "failed": 1,
    }
    per_question = json.loads(out.read_text())["per_question"]
    assert [(q["prediction"], q["correct"], q["has_image"]) for q in per_question] == [
        ("B", True, True),
        ("A", True, False),
        ("C", False, True),
        ("FAILED", False, True),
    ]


def test_scienceqa_unknown_problem_and_bad_problem(tmp_path):
    problems = ba.read_scienceqa_problems(
        _write_json(tmp_path / "problems.json", {"1": {"choices": ["x", "y"], "image": None}})
    )
    unknown = ba.read_answers(_answers(tmp_path / "a.jsonl", [(9, "A")]))
    with pytest.raises(ValueError, match="unknown id 9"):
        ba.scienceqa_scores(unknown, problems)
    known = ba.read_answers(_answers(tmp_path / "b.jsonl", [(1, "A")]))
    with pytest.raises(ValueError, match=r"problems\.json: problem '1': missing field 'answer'"):
        ba.scienceqa_scores(known, problems)


# --- MME -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("Yes, it is.", "yes"),
        ("No, there is none.", "no"),
        ("not sure", "no"),  # "no" within the first four characters
        ("Nope", "no"),
        (" yes", "yes"),
        ("I don't know", "other"),
        ("The answer is yes", "other"),  # "yes" comes too late
        ("", "other"),
    ],
)
def test_parse_mme_answer(text, expected):
    assert ba.parse_mme_answer(text) == expected


# Two tasks. Questions about an image share their question_id (as in LLaVA's llava_mme.jsonl)
# and are told apart by their text; the question file interleaves color's two images.
_MME_QUESTIONS = [
    # (question_id/image, text, category, truth, prediction)
    ("color/1.jpg", "Is the car red? Please answer yes or no.", "color", "Yes", "Yes"),
    ("color/2.jpg", "Is the sky blue? Please answer yes or no.", "color", "yes", "no"),
    ("color/1.jpg", "Is the car green? Please answer yes or no.", "color", "No", "No, it is red."),
    ("color/2.jpg", "Is the sky pink? Please answer yes or no.", "color", "no", "No"),
    ("code_reasoning/3.png", "Does it print 3?", "code_reasoning", "yes", "I think\tso"),
    ("code_reasoning/3.png", "Does it print 4?", "code_reasoning", "no", "not sure"),
    ("code_reasoning/4.png", "Does it print 5?", "code_reasoning", "yes", "No"),
    ("code_reasoning/4.png", "Does it print 6?", "code_reasoning", "no", "Nope\nreally"),
]


def _mme_files(tmp_path, rows=_MME_QUESTIONS):
    questions = tmp_path / "mme_questions.jsonl"
    write_jsonl(
        questions,
        [
            {"question_id": qid, "image": qid, "text": text, "category": cat, "answer": truth}
            for qid, text, cat, truth, _ in rows
        ],
    )
    answers = _answers(
        tmp_path / "mme_answers.jsonl",
        [(qid, pred) for qid, _, _, _, pred in rows],
        prompts=[text for _, text, _, _, _ in rows],
    )
    return answers, questions


def test_mme_scores_and_txt_files(tmp_path):
    answers, questions = _mme_files(tmp_path)
    out = tmp_path / "eval_tool" / "answers" / "run"
    scores = ba.run("mme", answers, out, questions)
    # color: image 1 both right (yes/yes, no/"No, ..."); image 2: "no" for truth yes is wrong,
    #   "No" right. acc = 3/4 = 0.75, acc+ = 1/2 = 0.5, score = (0.75 + 0.5) * 100 = 125.
    # code_reasoning: image 3: "I think so" is other (wrong), "not sure" reads "no" (right);
    #   image 4: "No" for truth yes (wrong), "Nope really" reads "no" (right).
    #   acc = 2/4 = 0.5, acc+ = 0/2 = 0, score = 50.
    assert scores["tasks"] == {
        "color": {"acc": 0.75, "acc_plus": 0.5, "score": 125.0},
        "code_reasoning": {"acc": 0.5, "acc_plus": 0.0, "score": 50.0},
    }
    assert scores["perception"] == 125.0
    assert scores["cognition"] == 50.0
    assert sorted(p.name for p in out.iterdir()) == ["code_reasoning.txt", "color.txt"]
    # An image's two questions are adjacent; truths lower-cased; tabs and newlines of the
    # predictions become spaces.
    assert (out / "color.txt").read_text() == (
        "1.jpg\tIs the car red? Please answer yes or no.\tyes\tYes\n"
        "1.jpg\tIs the car green? Please answer yes or no.\tno\tNo, it is red.\n"
        "2.jpg\tIs the sky blue? Please answer yes or no.\tyes\tno\n"
        "2.jpg\tIs the sky pink? Please answer yes or no.\tno\tNo\n"
    )
    assert (out / "code_reasoning.txt").read_text() == (
        "3.png\tDoes it print 3?\tyes\tI think so\n"
        "3.png\tDoes it print 4?\tno\tnot sure\n"
        "4.png\tDoes it print 5?\tyes\tNo\n"
        "4.png\tDoes it print 6?\tno\tNope really\n"
    )


def test_mme_missing_answer(tmp_path):
    answers, questions = _mme_files(tmp_path)
    rows = ba.read_answers(answers)[:-1]
    with pytest.raises(ValueError, match=r"1 questions have no answer: 'code_reasoning/4\.png'"):
        ba.mme_items(rows, ba.read_jsonl_records(questions))


def test_mme_answer_to_no_question(tmp_path):
    answers, questions = _mme_files(tmp_path)
    extra = _answers(tmp_path / "extra.jsonl", [("color/1.jpg", "yes")], prompts=["Other?"])
    with pytest.raises(ValueError, match=r"extra\.jsonl: line 1: no MME question"):
        ba.mme_items(
            ba.read_answers(answers) + ba.read_answers(extra), ba.read_jsonl_records(questions)
        )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("category", "colour", r"field 'category' is 'colour', not an MME task"),
        ("answer", "maybe", r"field 'answer' is 'maybe', expected yes or no"),
    ],
)
def test_mme_bad_question(tmp_path, field, value, message):
    answers, questions = _mme_files(tmp_path, _MME_QUESTIONS[:1])
    rows = [json.loads(questions.read_text())]
    rows[0][field] = value
    write_jsonl(questions, rows)
    with pytest.raises(ValueError, match=r"mme_questions\.jsonl: line 1: " + message):
        ba.mme_items(ba.read_answers(answers), ba.read_jsonl_records(questions))


# --- command line ----------------------------------------------------------------------


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "moe_llava_jax.evaluate.benchmark_answers", *args],
        capture_output=True,
        text=True,
    )


def test_cli_scores_and_writes(tmp_path):
    answers, questions = _mme_files(tmp_path)
    out = tmp_path / "mme_out"
    result = _cli(
        "--benchmark=mme", f"--answers={answers}", f"--questions={questions}", f"--out={out}"
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert printed["perception"] == 125.0 and printed["cognition"] == 50.0
    assert (out / "color.txt").exists()


def test_cli_needs_the_reference_file(tmp_path):
    answers = _answers(tmp_path / "a.jsonl", [(1, "yes")])
    result = _cli("--benchmark=vqav2", f"--answers={answers}", f"--out={tmp_path / 'o.json'}")
    assert result.returncode != 0
    assert "--benchmark vqav2 needs --questions" in result.stderr
