"""Tests for the LLaVA JSON/JSONL grain data source and source mixing."""

import json
import os

import grain
import pytest

from moe_llava_jax.data.sources import ConcatSource, LlavaJsonSource, mixture

RECORDS = [
    {
        "id": "img-0",
        "image": "coco/0001.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": "Black."},
        ],
    },
    {
        "id": "text-1",
        "conversations": [
            {"from": "human", "value": "Say hi."},
            {"from": "gpt", "value": "Hi."},
        ],
    },
    {
        "id": 2,
        "image": "/abs/0002.jpg",
        "conversations": [
            {"from": "human", "value": "Describe it.\n<image>"},
            {"from": "gpt", "value": "A dog."},
        ],
    },
]


def _write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _check_loaded(source, image_root):
    assert len(source) == len(RECORDS)
    first = source[0]
    assert first["id"] == "img-0"
    assert first["image"] == os.path.join(str(image_root), "coco", "0001.jpg")
    assert os.path.isabs(first["image"])
    assert first["conversations"] == RECORDS[0]["conversations"]
    assert first["index"] == 0
    assert source[1]["image"] is None
    assert source[1]["index"] == 1
    assert source[2]["image"] == "/abs/0002.jpg"
    assert source[-1]["index"] == 2
    with pytest.raises(IndexError):
        source[3]


def test_loads_json_list(tmp_path):
    source = LlavaJsonSource(_write_json(tmp_path / "data.json", RECORDS), tmp_path / "images")
    _check_loaded(source, tmp_path / "images")


def test_loads_jsonl_skipping_blank_lines(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", RECORDS)
    path.write_text(path.read_text() + "\n")
    _check_loaded(LlavaJsonSource(path, tmp_path / "images"), tmp_path / "images")


def test_items_are_copies(tmp_path):
    source = LlavaJsonSource(_write_json(tmp_path / "data.json", RECORDS), tmp_path)
    source[0]["conversations"][0]["value"] = "changed"
    assert source[0]["conversations"][0]["value"].startswith("<image>")


def test_repr_is_stable_and_informative(tmp_path):
    path = _write_json(tmp_path / "data.json", RECORDS)
    source = LlavaJsonSource(path, tmp_path)
    assert repr(source) == repr(LlavaJsonSource(path, tmp_path))
    assert "data.json" in repr(source) and "size=3" in repr(source)


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


BAD_RECORDS = {
    "not_object": ("just a string", "not an object"),
    "no_conversations": ({"id": "bad"}, "conversations"),
    "empty_conversations": ({"id": "bad", "conversations": []}, "conversations"),
    "turn_without_from": (
        {"id": "bad", "conversations": [{"value": "hi"}]},
        r"conversations\[0\]\.from",
    ),
    "turn_without_value": (
        {"id": "bad", "conversations": _turns(("human", "hi")) + [{"from": "gpt"}]},
        r"conversations\[1\]\.value",
    ),
    "bad_role": (
        {"id": "bad", "conversations": _turns(("human", "hi"), ("assistant", "yo"))},
        r"conversations\[1\]\.from.*'assistant'",
    ),
    "image_without_token": (
        {"id": "bad", "image": "a.jpg", "conversations": _turns(("human", "hi"), ("gpt", "yo"))},
        "exactly one <image>",
    ),
    "token_without_image": (
        {"id": "bad", "conversations": _turns(("human", "<image>\nhi"), ("gpt", "yo"))},
        "'image' is not set",
    ),
    "two_tokens": (
        {
            "id": "bad",
            "image": "a.jpg",
            "conversations": _turns(("human", "<image>\nhi"), ("gpt", "yo"), ("human", "<image>")),
        },
        r"exactly one <image>.*found 2",
    ),
    "token_in_gpt_turn": (
        {
            "id": "bad",
            "image": "a.jpg",
            "conversations": _turns(("human", "hi"), ("gpt", "<image>")),
        },
        "first human turn",
    ),
    "empty_image": (
        {"id": "bad", "image": "", "conversations": _turns(("human", "<image>"), ("gpt", "yo"))},
        "'image'",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_in_json_names_file_index_id_and_field(tmp_path, kind):
    bad, field = BAD_RECORDS[kind]
    path = _write_json(tmp_path / "train.json", RECORDS[:2] + [bad] + RECORDS[2:])
    with pytest.raises(ValueError, match=field) as info:
        LlavaJsonSource(path, tmp_path)
    message = str(info.value)
    assert "train.json: record 2" in message
    if isinstance(bad, dict):
        assert "(id 'bad')" in message


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_in_jsonl_names_file_line_and_field(tmp_path, kind):
    bad, field = BAD_RECORDS[kind]
    path = _write_jsonl(tmp_path / "train.jsonl", [RECORDS[0], bad, RECORDS[1]])
    with pytest.raises(ValueError, match=field) as info:
        LlavaJsonSource(path, tmp_path)
    assert "train.jsonl: line 2" in str(info.value)
    if isinstance(bad, dict):
        assert "(id 'bad')" in str(info.value)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"id": "x", "conversations": [\n')
    with pytest.raises(ValueError, match=r"train\.jsonl: line 2: invalid JSON"):
        LlavaJsonSource(path, tmp_path)


def test_json_file_must_hold_a_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RECORDS[0]))
    with pytest.raises(ValueError, match=r"train\.json: expected a JSON list"):
        LlavaJsonSource(path, tmp_path)


def test_grain_map_dataset_source(tmp_path):
    source = LlavaJsonSource(_write_json(tmp_path / "data.json", RECORDS), tmp_path)
    assert isinstance(source, grain.sources.RandomAccessDataSource)
    dataset = grain.MapDataset.source(source).map(lambda r: r["id"])
    assert list(dataset) == ["img-0", "text-1", 2]


def test_mixture_interleaves_by_weight(tmp_path):
    a = LlavaJsonSource(_write_json(tmp_path / "a.json", RECORDS), tmp_path)
    b = grain.MapDataset.source(["b0", "b1", "b2", "b3", "b4", "b5"])
    mixed = mixture([a, b], weights=[1, 2])
    assert isinstance(mixed, grain.MapDataset)
    items = [x if isinstance(x, str) else x["id"] for x in mixed]
    assert items == ["img-0", "b0", "b1", "text-1", "b2", "b3", 2, "b4", "b5"]


def test_concat_source_reads_files_as_one_with_global_indices(tmp_path):
    a = LlavaJsonSource(_write_json(tmp_path / "a.json", RECORDS), tmp_path)
    bad = {"id": "bad", "conversations": []}
    b = LlavaJsonSource(
        _write_jsonl(tmp_path / "b.jsonl", [bad, RECORDS[1]]), tmp_path, max_bad_fraction=0.5
    )
    joined = ConcatSource([a, b])
    assert len(joined) == 4
    assert [joined[i]["id"] for i in range(4)] == ["img-0", "text-1", 2, "text-1"]
    assert [joined[i]["index"] for i in range(4)] == [0, 1, 2, 3]
    assert joined[-1]["conversations"] == RECORDS[1]["conversations"]
    assert [e["id"] for e in joined.skipped] == ["bad"]
    assert "a.json" in repr(joined) and "b.jsonl" in repr(joined)
    with pytest.raises(IndexError):
        joined[4]
