"""The embedded synthetic dataset: reproducible, well-formed, and answers match the images."""

import json
import re

import numpy as np
import pytest

from moe_llava_jax.data.conversation import get_template, tokenize_conversation
from moe_llava_jax.data.images import load_image
from moe_llava_jax.data.synthetic import OBJECT_NAMES, write_synthetic_dataset
from moe_llava_jax.data.tokenizer import Tokenizer

SMALL = dict(seed=3, num_train=40, num_eval=10, image_size=32, vocab_size=400)
EXISTENCE = re.compile(r"^(?:<image>\n)?Is there a (\w+ \w+) in the image\?$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("a"), **SMALL)


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _objects_by_image(dataset) -> dict[str, set[str]]:
    """Recover each training image's objects from its caption, which names all of them."""
    objects = {}
    for record in _load(dataset.captions_json):
        caption = record["conversations"][1]["value"]
        objects[record["image"]] = {name for name in OBJECT_NAMES if f"a {name}" in caption}
    return objects


def test_same_seed_gives_identical_bytes(dataset, tmp_path):
    again = write_synthetic_dataset(tmp_path, **SMALL)
    for field in ("captions_json", "instruct_json", "eval_annotations_json", "tokenizer_json"):
        assert getattr(dataset, field).read_bytes() == getattr(again, field).read_bytes(), field
    png = "images/train_00007.png"
    assert (dataset.root / png).read_bytes() == (again.root / png).read_bytes()
    other = write_synthetic_dataset(tmp_path / "other", **{**SMALL, "seed": 4})
    assert other.instruct_json.read_bytes() != dataset.instruct_json.read_bytes()


def test_rerun_with_same_arguments_reuses_files(dataset):
    before = dataset.instruct_json.stat().st_mtime_ns
    write_synthetic_dataset(dataset.root, **SMALL)
    assert dataset.instruct_json.stat().st_mtime_ns == before


def test_records_are_well_formed(dataset):
    captions, instruct = _load(dataset.captions_json), _load(dataset.instruct_json)
    assert len(captions) == len(instruct) == SMALL["num_train"]
    ids = [record["id"] for record in captions + instruct]
    assert len(set(ids)) == len(ids)
    tokenizer = Tokenizer.from_file(dataset.tokenizer_json)
    for record in instruct:
        conversation = record["conversations"]
        assert 3 <= len(conversation) // 2 <= 6
        assert conversation[0]["value"].startswith("<image>\n")
        assert sum("<image>" in turn["value"] for turn in conversation) == 1
        tokenize_conversation(conversation, get_template("phi"), tokenizer, num_image_tokens=4)
    for record in captions:
        image = load_image(dataset.root / record["image"])
        assert image.shape == (SMALL["image_size"], SMALL["image_size"], 3)
        tokenize_conversation(record["conversations"], get_template("plain"), tokenizer, 4)


def test_existence_answers_match_the_objects_and_are_balanced(dataset):
    objects = _objects_by_image(dataset)
    answers = []
    for record in _load(dataset.instruct_json):
        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2]):
            match = EXISTENCE.match(question["value"])
            if match:
                expected = "Yes" if match.group(1) in objects[record["image"]] else "No"
                assert answer["value"] == expected, (record["id"], question["value"])
                answers.append(answer["value"])
    assert answers.count("Yes") == answers.count("No") > 0


def test_counting_answers_match_the_captions(dataset):
    objects = _objects_by_image(dataset)
    words = ("one", "two", "three", "four")
    for record in _load(dataset.instruct_json):
        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2]):
            if question["value"].endswith("How many objects are there in the image?"):
                assert words[len(objects[record["image"]]) - 1] in answer["value"]


def test_eval_images_are_held_out_and_annotated(dataset):
    annotations = _load(dataset.eval_annotations_json)
    assert len(annotations) == SMALL["num_eval"]
    train_images = {record["image"] for record in _load(dataset.instruct_json)}
    for entry in annotations:
        assert entry["image"] not in train_images
        assert (dataset.root / entry["image"]).is_file()
        assert 1 <= len(entry["objects"]) <= 4
        assert len(set(entry["objects"])) == len(entry["objects"])
        assert set(entry["objects"]) <= set(OBJECT_NAMES)


def test_images_show_the_annotated_colours(dataset):
    """Each annotated colour must dominate some pixels; absent colours must not appear."""
    palette = {"red": (214, 48, 41), "green": (46, 160, 67), "blue": (38, 84, 212)}
    for entry in _load(dataset.eval_annotations_json):
        pixels = load_image(dataset.root / entry["image"]).reshape(-1, 3).astype(int)
        present = {name.split()[0] for name in entry["objects"]}
        for colour, rgb in palette.items():
            close = (np.abs(pixels - np.asarray(rgb)).max(axis=1) <= 25).sum()
            assert (close > 10) == (colour in present), (entry, colour)


def test_tokenizer_encodes_eos_as_one_id(dataset):
    tokenizer = Tokenizer.from_file(dataset.tokenizer_json)
    assert tokenizer.encode("<|endoftext|>") == [tokenizer.eos_id]
    assert tokenizer.vocab_size <= SMALL["vocab_size"]
    question = "Is there a green triangle in the image?"
    assert tokenizer.decode(tokenizer.encode(question)) == question
