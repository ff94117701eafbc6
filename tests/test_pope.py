"""Tests for POPE probe building, file I/O, answer parsing and scoring."""

import json
from collections import defaultdict

import pytest

from moe_llava_jax.data.jsonl import write_jsonl
from moe_llava_jax.evaluate import pope

# Hand-made annotations. Image frequencies: cat 3; bus, car, dog, tree 2; person, sofa 1.
# Co-occurrences: cat-dog 2, bus-tree 2, cat-sofa 1, dog-sofa 1, cat-car 1, car-tree 1,
# bus-car 1.
ANNOTATIONS = [
    {"image": "img1.jpg", "objects": ["cat", "dog"]},
    {"image": "img2.jpg", "objects": ["dog", "cat", "sofa"]},
    {"image": "img3.jpg", "objects": ["cat", "car"]},
    {"image": "img4.jpg", "objects": ["tree", "car", "bus"]},
    {"image": "img5.jpg", "objects": ["tree", "bus"]},
    {"image": "img6.jpg", "objects": ["person"]},
]


def _by_image(probes, label):
    grouped = defaultdict(list)
    for p in probes:
        if p["label"] == label:
            grouped[p["image"]].append(p["object"])
    return dict(grouped)


def _many_annotations():
    vocab = [f"obj{i:02d}" for i in range(30)]
    return [{"image": f"im{i}.jpg", "objects": vocab[i : i + 4]} for i in range(20)]


# --- parse_answer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes, there is.", "yes"),
        ("No.", "no"),
        ("There is not a cat.", "no"),
        ("I do not know", "no"),
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("No, there is no cat in the image", "no"),
        ("Yes, but no.", "no"),  # comma removed -> "no" is a word
        ("There is a cat. It is not a dog.", "yes"),
        ("NO", "yes"),  # case-sensitive, like the original
        ("Nope", "yes"),
        ("no,there", "yes"),  # comma removal glues the words: "nothere"
        ("No\nit is absent", "yes"),  # splits on spaces only: "No\nit" is one word
        ("", "yes"),
    ],
)
def test_parse_answer(answer, expected):
    assert pope.parse_answer(answer) == expected


# --- score ------------------------------------------------------------------------------


def test_score_hand_computed():
    answers = [
        "Yes, there is a cat.",
        "No.",
        "Yes",
        "There is not a dog.",
        "Yes. No.",
        "I do not know",
        "no",
    ]
    labels = ["yes", "no", "no", "yes", "yes", "no", "yes"]
    result = pope.score(answers, labels)
    assert (result["tp"], result["fp"], result["tn"], result["fn"], result["n"]) == (2, 1, 2, 2, 7)
    assert result["accuracy"] == pytest.approx(4 / 7)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(1 / 2)
    assert result["f1"] == pytest.approx(4 / 7)
    assert result["yes_ratio"] == pytest.approx(3 / 7)


def test_score_undefined_ratios_are_zero():
    result = pope.score(["No.", "No."], ["no", "no"])
    assert result["precision"] == result["recall"] == result["f1"] == 0.0
    assert result["accuracy"] == 1.0
    assert result["yes_ratio"] == 0.0
    assert pope.score([], [])["accuracy"] == 0.0


def test_score_rejects_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope.score(["Yes", "No"], ["yes"])
    with pytest.raises(ValueError, match="maybe"):
        pope.score(["Yes"], ["maybe"])


# --- probe building -------------------------------------------------------------------


@pytest.mark.parametrize("split", pope.SPLITS)
def test_probes_balanced_and_well_formed(split):
    probes = pope.build_pope_probes(ANNOTATIONS, split, num_per_image=2, seed=3)
    objects = {a["image"]: set(a["objects"]) for a in ANNOTATIONS}
    positives, negatives = _by_image(probes, "yes"), _by_image(probes, "no")
    assert [p["question_id"] for p in probes] == list(range(len(probes)))
    for image, present in objects.items():
        assert len(positives[image]) == len(negatives[image]) == min(2, len(present))
        assert set(positives[image]) <= present
        assert not set(negatives[image]) & present
    for p in probes:
        assert p["text"] == f"Is there a {p['object']} in the image?"
        assert p["category"] == split


@pytest.mark.parametrize("split", pope.SPLITS)
def test_probes_deterministic_by_seed(split):
    annotations = _many_annotations()
    first = pope.build_pope_probes(annotations, split, seed=7)
    assert first == pope.build_pope_probes(annotations, split, seed=7)


def test_random_negatives_change_with_seed():
    annotations = _many_annotations()
    a = _by_image(pope.build_pope_probes(annotations, "random", seed=0), "no")
    b = _by_image(pope.build_pope_probes(annotations, "random", seed=1), "no")
    assert a != b


def test_positives_shared_across_splits():
    annotations = _many_annotations()
    positives = [
        _by_image(pope.build_pope_probes(annotations, split, seed=5), "yes")
        for split in pope.SPLITS
    ]
    assert positives[0] == positives[1] == positives[2]


def test_popular_negatives_are_most_frequent_absent():
    negatives = _by_image(pope.build_pope_probes(ANNOTATIONS, "popular", num_per_image=2), "no")
    assert negatives == {
        "img1.jpg": ["bus", "car"],  # freq 2 ties with tree, broken by name
        "img2.jpg": ["bus", "car"],
        "img3.jpg": ["bus", "dog"],
        "img4.jpg": ["cat", "dog"],
        "img5.jpg": ["cat", "car"],
        "img6.jpg": ["cat"],
    }


def test_adversarial_negatives_are_top_cooccurring_absent():
    probes = pope.build_pope_probes(ANNOTATIONS, "adversarial", num_per_image=2)
    assert _by_image(probes, "no") == {
        "img1.jpg": ["sofa", "car"],  # sofa: 1 (cat) + 1 (dog); car: 1 (cat)
        "img2.jpg": ["car", "bus"],  # car: 1 (cat); then ties at 0 by frequency, name
        "img3.jpg": ["dog", "bus"],  # dog: 2; bus, tree, sofa: 1 -> frequency, then name
        "img4.jpg": ["cat", "dog"],  # cat: 1 (car); then dog by frequency
        "img5.jpg": ["car", "cat"],  # car: 1 (tree) + 1 (bus); then cat by frequency
        "img6.jpg": ["cat"],
    }


def test_fewer_absent_objects_than_requested_keeps_balance():
    annotations = [{"image": "a", "objects": ["x", "y", "z"]}, {"image": "b", "objects": ["x"]}]
    probes = pope.build_pope_probes(annotations, "random", num_per_image=3)
    assert _by_image(probes, "yes") == {"b": ["x"]}
    assert _by_image(probes, "no")["b"] in (["y"], ["z"])


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="'frequent'"):
        pope.build_pope_probes(ANNOTATIONS, "frequent")


# --- file formats -----------------------------------------------------------------------


def test_probe_files_round_trip(tmp_path):
    probes = pope.build_pope_probes(ANNOTATIONS, "popular", num_per_image=2)
    questions = [{k: p[k] for k in ("question_id", "image", "text", "category")} for p in probes]
    write_jsonl(tmp_path / "q" / "questions.jsonl", questions)
    write_jsonl(tmp_path / "labels.jsonl", [{"label": p["label"]} for p in probes])
    assert pope.read_pope_questions(tmp_path / "q" / "questions.jsonl") == questions
    assert pope.read_pope_labels(tmp_path / "labels.jsonl") == [p["label"] for p in probes]


def test_read_labels_accepts_original_pope_files(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    rows = [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "no"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert pope.read_pope_labels(path) == ["no", "yes"]


@pytest.mark.parametrize(
    "reader, second_line, message",
    [
        (
            pope.read_pope_labels,
            '{"question_id": 2}',
            "labels.jsonl: line 2: missing field 'label'",
        ),
        (pope.read_pope_labels, '{"label": "Yes"}', "labels.jsonl: line 2: field 'label'"),
        (pope.read_pope_labels, '{"label": ', "labels.jsonl: line 2: invalid JSON"),
        (pope.read_pope_labels, '["no"]', "labels.jsonl: line 2: expected a JSON object"),
        (
            pope.read_pope_questions,
            '{"question_id": 2, "image": "b.jpg"}',
            "labels.jsonl: line 2: missing field 'text'",
        ),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, reader, second_line, message):
    path = tmp_path / "labels.jsonl"
    first = {"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}
    path.write_text(json.dumps(first) + "\n" + second_line + "\n")
    with pytest.raises(ValueError, match=message):
        reader(path)


# --- markdown table ---------------------------------------------------------------------


def test_markdown_table():
    row = {"accuracy": 0.8571, "precision": 0.9, "recall": 0.8, "f1": 0.84705, "yes_ratio": 0.5}
    table = pope.markdown_table({"stage2/random": row, "adversarial": row, "random": row})
    assert table.splitlines() == [
        "| Split | Accuracy | Precision | Recall | F1 | Yes-ratio |",
        "|---|---|---|---|---|---|",
        "| random | 0.857 | 0.900 | 0.800 | 0.847 | 0.500 |",
        "| adversarial | 0.857 | 0.900 | 0.800 | 0.847 | 0.500 |",
        "| stage2/random | 0.857 | 0.900 | 0.800 | 0.847 | 0.500 |",
    ]


def test_split_means_and_their_table_row():
    """The papers' summary of POPE: accuracy and F1 averaged over the splits; the table shows
    the row with its other columns empty."""
    rows = {
        "random": {"accuracy": 0.9, "precision": 0.8, "recall": 0.7, "f1": 0.6, "yes_ratio": 0.5},
        "popular": {"accuracy": 0.8, "precision": 0.8, "recall": 0.7, "f1": 0.5, "yes_ratio": 0.5},
        "adversarial": {"accuracy": 0.4, "precision": 0.8, "recall": 0.7, "f1": 0.1, "yes_ratio": 0.5},
    }
    means = pope.split_means(rows)
    assert means == {"accuracy": pytest.approx(0.7), "f1": pytest.approx(0.4)}
    table = pope.markdown_table({**rows, "stage3/mean": means}).splitlines()
    assert table[-1] == "| stage3/mean | 0.700 | - | - | 0.400 | - |"
