"""LLaVA JSON -> TFDS ArrayRecord -> TfdsSource round trip; caption mapping; specs; errors."""

import io
import json
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from moe_llava_jax.data import convert_to_tfds
from moe_llava_jax.data.conversation import get_template
from moe_llava_jax.data.images import IMAGE_PROCESSORS, load_image
from moe_llava_jax.data.pipeline import Preprocessing, make_example
from moe_llava_jax.data.tfds_source import TfdsSource, tfds_source_from_spec
from moe_llava_jax.data.tokenizer import train_bpe_tokenizer


def turns(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def png_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = [
    {"id": "rgb_0", "image": "rgb_0.png", "conversations": turns("<image>\nWhat?", "A thing.")},
    {"id": 17, "image": "sub/rgb_1.png", "conversations": turns("Describe <image>", "Red.")},
    {"id": "grey", "image": "grey.png", "conversations": turns("<image>\nColour?", "Grey.")},
    {"id": "text", "conversations": turns("Say hi ü", "Hi!") + turns("Again", "Hi again.")},
    {"id": "jpeg", "image": "photo.jpg", "conversations": turns("<image>\nWhat?", "A photo.")},
]
BAD = [  # (record, reason), at positions after the good ones
    ({"id": "missing", "image": "nope.png", "conversations": turns("<image>\nQ", "A")}, "missing_image"),
    ({"id": "corrupt", "image": "corrupt.png", "conversations": turns("<image>\nQ", "A")}, "corrupt_image"),
    ({"id": "cut", "image": "truncated.jpg", "conversations": turns("<image>\nQ", "A")}, "corrupt_image"),
    ({"id": "two", "image": "rgb_0.png", "conversations": turns("<image><image>\nQ", "A")}, "image_count"),
    ({"id": "noturns", "image": "rgb_0.png"}, "invalid_record"),
]  # fmt: skip


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """GOOD and BAD interleaved in a JSON file, converted by the command; returns paths."""
    root = tmp_path_factory.mktemp("llava")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 24, 3), dtype=np.uint8)).save(images / "rgb_0.png")
    Image.fromarray(rng.integers(0, 256, (20, 32, 3), dtype=np.uint8)).save(
        images / "sub/rgb_1.png"
    )
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(
        images / "grey.png"
    )
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / "photo.jpg")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    jpeg = (images / "photo.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    records = [GOOD[0], BAD[0][0], GOOD[1], BAD[1][0], GOOD[2], BAD[2][0], GOOD[3]]
    records += [BAD[3][0], GOOD[4], BAD[4][0]]
    (root / "data.json").write_text(json.dumps(records))
    out = root / "out"
    args = ["--json", str(root / "data.json"), "--image_root", str(images)]
    convert_to_tfds.main(args + ["--out_dir", str(out), "--shards", "2", "--workers", "2"])
    return {"root": root, "images": images, "out": out}


def test_convert_lists_every_skipped_record_with_its_reason(converted):
    skipped = [json.loads(line) for line in (converted["out"] / "skipped.jsonl").open()]
    assert [(s["position"], s["id"], s["reason"]) for s in skipped] == [
        ("record 1", "missing", "missing_image"),
        ("record 3", "corrupt", "corrupt_image"),
        ("record 5", "cut", "corrupt_image"),
        ("record 7", "two", "image_count"),
        ("record 9", "noturns", "invalid_record"),
    ]
    assert all(s["source"] == str(converted["root"] / "data.json") for s in skipped)
    assert "nope.png" in skipped[0]["detail"] and "truncated.jpg" in skipped[2]["detail"]
    builder = tfds.builder_from_directory(str(converted["out"] / "llava_custom" / "1.0.0"))
    assert builder.info.splits["train"].num_examples == 5
    assert builder.info.splits["train"].num_shards == 2


def test_convert_prints_counts_per_reason(tmp_path, capsys):
    (tmp_path / "data.json").write_text(json.dumps([GOOD[3], BAD[0][0], BAD[3][0], BAD[4][0]]))
    convert_to_tfds.main(
        ["--json", str(tmp_path / "data.json"), "--image_root", str(tmp_path)]
        + ["--out_dir", str(tmp_path / "out"), "--name", "counts"]
    )
    printed = capsys.readouterr().out
    assert "wrote 1 records" in printed and "skipped 3" in printed
    assert "  image_count: 1\n  invalid_record: 1\n  missing_image: 1\n" in printed
    with pytest.raises(FileExistsError, match="counts"):  # never mixed with an earlier run
        convert_to_tfds.convert(tmp_path / "data.json", tmp_path, tmp_path / "out", name="counts")


def test_records_read_back_equal_the_json(converted):
    source = TfdsSource("llava_custom", "train", converted["out"])
    assert len(source) == len(GOOD)
    for index, expected in enumerate(GOOD):
        record = source[index]
        assert record["id"] == str(expected["id"])
        assert record["conversations"] == expected["conversations"]
        assert record["index"] == index
        if "image" in expected:
            pixels = load_image(converted["images"] / expected["image"])
            assert record["image"].dtype == np.uint8
            np.testing.assert_array_equal(record["image"], pixels)
        else:
            assert record["image"] is None
    assert source[-1]["id"] == "jpeg"
    with pytest.raises(IndexError):
        source[len(GOOD)]
    assert pickle.loads(pickle.dumps(source))[1]["id"] == "17"  # grain worker processes


def test_make_example_is_the_same_from_tfds_and_from_files(converted):
    template = get_template("phi")
    tokenizer = train_bpe_tokenizer(
        [template.system] + [t["value"] for r in GOOD for t in r["conversations"]], 300
    )
    prep = Preprocessing(
        image_size=16,
        processor=IMAGE_PROCESSORS["clip"],
        pad_to_square=True,
        num_image_tokens=4,
        max_length=256,
    )
    source = TfdsSource("llava_custom", "train", converted["out"])
    for index, expected in enumerate(GOOD):
        from_files = dict(expected, image=None)
        if "image" in expected:
            from_files["image"] = str(converted["images"] / expected["image"])
        got = make_example(source[index], tokenizer, template, prep)
        want = make_example(from_files, tokenizer, template, prep)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{index} {key}")


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """An image-caption dataset shaped like coco_captions: several captions per image."""
    out = tmp_path_factory.mktemp("captions")
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image_id": np.int64,
            "question": tfds.features.Text(),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        }
    )
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in range(3)]
    examples = [
        (
            i,
            {
                "image": png_bytes(pixels[i]),
                "image_id": 100 + i,
                "question": f"What is in picture {i}?",
                "captions": {"text": [f"first caption {i}", f"second caption {i}"]},
            },
        )
        for i in range(3)
    ]
    convert_to_tfds.write_dataset("captions_like", out, "validation", features, examples)
    return out, pixels


def test_caption_dataset_becomes_single_turn_conversations(captions):
    out, pixels = captions
    source = TfdsSource(
        "captions_like",
        "validation",
        out,
        answer_key="captions/text",
        prompt="Describe the image briefly.",
        id_key="image_id",
    )
    record = source[2]
    assert record["id"] == "102"
    assert record["conversations"] == [
        {"from": "human", "value": "<image>\nDescribe the image briefly."},
        {"from": "gpt", "value": "first caption 2"},
    ]
    np.testing.assert_array_equal(record["image"], pixels[2])
    asked = TfdsSource("captions_like", "validation", out, answer_key="captions/text",
                       question_key="question")  # fmt: skip
    assert asked[0]["conversations"][0]["value"] == "<image>\nWhat is in picture 0?"
    assert asked[0]["id"] == "captions_like/validation/0"  # no `id` feature
    text_only = TfdsSource(
        "captions_like", "validation", out, image_key=None, answer_key="question", prompt="Q?"
    )
    assert text_only[1]["image"] is None
    assert text_only[1]["conversations"][0]["value"] == "Q?"


def test_spec_builds_the_source_and_repr_is_stable(captions, converted):
    out, _ = captions
    spec = (
        f"tfds:captions_like/validation@{out}"
        "?answer_key=captions/text&prompt=Describe+it.%0AShort.&id_key=image_id"
    )
    source = tfds_source_from_spec(spec)
    assert source[0]["conversations"][0]["value"] == "<image>\nDescribe it.\nShort."
    assert repr(source) == repr(tfds_source_from_spec(spec))
    assert repr(source) == (
        f"TfdsSource(name='captions_like', split='validation', data_dir='{out}', "
        "image_key='image', answer_key='captions/text', prompt='Describe it.\\nShort.', size=3)"
    )
    sliced = tfds_source_from_spec(f"tfds:llava_custom/train[1:3]@{converted['out']}")
    assert [sliced[i]["id"] for i in range(len(sliced))] == ["17", "grey"]


@pytest.mark.parametrize(
    "spec,match",
    [
        ("llava_custom/train", "does not start with 'tfds:'"),
        ("tfds:llava_custom", "expected tfds:NAME/SPLIT"),
        ("tfds:x/train?colour=red", "unknown options \\['colour'\\]"),
        ("tfds:x/train?prompt", "malformed options"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, match):
    with pytest.raises(ValueError, match=match):
        tfds_source_from_spec(spec)


def test_mapping_errors_name_the_dataset_and_feature(captions):
    out, _ = captions
    with pytest.raises(ValueError, match="'captions_like'.*answer_key='caption' is not a feature"):
        TfdsSource("captions_like", "validation", out, answer_key="caption", prompt="Q")
    with pytest.raises(ValueError, match="exactly one of question_key, prompt"):
        TfdsSource("captions_like", "validation", out, answer_key="question")
    with pytest.raises(ValueError, match="conversations_key='conversations' is not a feature"):
        TfdsSource("captions_like", "validation", out)


def test_bad_records_fail_naming_dataset_split_index_and_field(tmp_path):
    good = json.dumps(turns("Hi", "Hello"))
    rows = [good, "[{not json", json.dumps(turns("<image>\nWhat?", "x")), good]
    examples = [
        (i, {"id": f"r{i}", "image": png_bytes(np.zeros((2, 2, 3), np.uint8)),
             "has_image": False, "conversations": row})
        for i, row in enumerate(rows)
    ]  # fmt: skip
    features = convert_to_tfds.llava_features()
    convert_to_tfds.write_dataset("broken", tmp_path, "train", features, examples)
    source = TfdsSource("broken", "train", tmp_path)
    assert source[0]["image"] is None  # has_image False: the stored pixels are a placeholder
    with pytest.raises(
        ValueError,
        match=r"'broken' split 'train' record 1: field 'conversations' is not valid JSON",
    ):
        source[1]
    with pytest.raises(ValueError, match=r"record 2 \(id 'r2'\): field 'conversations' has 1"):
        source[2]
