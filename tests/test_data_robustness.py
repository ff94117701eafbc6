"""Bad records are skipped, counted and listed exactly; the data position survives a
checkpoint; processes read disjoint shards."""

import json
import shutil
from collections import Counter
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from moe_llava_jax import checkpoint, sharding, trainer
from moe_llava_jax.data import from_config
from moe_llava_jax.data.sources import LlavaJsonSource

GOOD_IMAGE = "good.png"


def _conversation(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _record(i, kind):
    """Record `i` of `kind`: good, or one of the seven ways a record goes bad."""
    question, image = "<image>\nWhat is drawn?", GOOD_IMAGE
    answer = f"A blue square number {i}."
    if kind == "invalid_record":
        return {"id": f"r{i}", "conversations": [{"from": "robot", "value": "hi"}]}
    if kind == "image_count":
        question = "What is drawn?"  # an image but no placeholder
    if kind == "empty_answer":
        answer = "  "
    if kind == "missing_image":
        image = "nowhere.png"
    if kind == "corrupt_image":
        image = "corrupt.png"
    if kind == "too_long":
        question = "<image>\n" + "why " * 200
    return {"id": f"r{i}", "image": image, "conversations": _conversation(question, answer)}


LOAD_TIME = ("malformed_json", "invalid_record", "image_count", "empty_answer")
RUNTIME = ("missing_image", "corrupt_image", "too_long")


@pytest.fixture
def broken_jsonl(tmp_path):
    """140 lines: 2 of each of the 7 bad kinds (10% bad in all), the rest good."""
    Image.fromarray(np.full((32, 32, 3), (20, 40, 200), np.uint8)).save(tmp_path / GOOD_IMAGE)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    kinds = ["good"] * 140
    for k, kind in enumerate(LOAD_TIME + RUNTIME):
        kinds[10 + 17 * k] = kinds[15 + 17 * k] = kind
    lines = []
    for i, kind in enumerate(kinds):
        if kind == "malformed_json":
            lines.append('{"id": "r%d", "conversations": [' % i)
        else:
            lines.append(json.dumps(_record(i, kind)))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, kinds


def test_source_counts_load_time_problems_and_fails_past_the_threshold(broken_jsonl):
    path, kinds = broken_jsonl
    source = LlavaJsonSource(path, path.parent, max_bad_fraction=0.1)
    assert len(source) == 140 - 8
    assert Counter(e["reason"] for e in source.skipped) == {k: 2 for k in LOAD_TIME}
    lines = {int(e["position"].split()[1]) for e in source.skipped}
    assert lines == {i + 1 for i, kind in enumerate(kinds) if kind in LOAD_TIME}
    with pytest.raises(ValueError, match=r"8 of 140 records are bad.*\n.*train\.jsonl: line 11"):
        LlavaJsonSource(path, path.parent, max_bad_fraction=0.05)


def _stage(config, path, steps):
    config.stage2.update(data=str(path), init_from="", num_steps=steps, checkpoint_every=2)
    config.data.update(image_root=str(path.parent), max_bad_fraction=0.15)
    data, tokenizer = from_config.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    stage = trainer.Stage(config, "stage2", mesh, tokenizer.vocab_size)
    return stage, from_config.stage_source(config, "stage2", data), tokenizer


def test_training_goes_on_and_lists_every_skipped_record_exactly(micro_config, broken_jsonl):
    path, kinds = broken_jsonl
    micro_config.stage2.max_length = 64  # 'too_long' records exceed it, good ones do not
    steps, batch = 18, micro_config.stage2.batch_size
    stage, source, tokenizer = _stage(micro_config, path, steps)
    trainer.train_stage(stage, source, tokenizer)
    metrics = (Path(micro_config.workdir) / "stage2" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == steps

    # The records the stream holds, in order; the run consumed good ones for `steps` batches.
    stream = grain.MapDataset.source(source).shuffle(seed=micro_config.seed).repeat(None)
    expected, good_seen, position = [], 0, 0
    while good_seen < steps * batch:
        record = stream[position]
        kind = kinds[int(record["id"][1:])]
        if kind in RUNTIME:
            expected.append((position, record["id"], kind))
        else:
            good_seen += 1
        position += 1
    skipped = Path(micro_config.workdir) / "stage2" / "skipped.jsonl"
    rows = [json.loads(line) for line in skipped.read_text().splitlines()]
    runtime = [(r["stream_position"], r["id"], r["reason"]) for r in rows if "stream_position" in r]
    assert runtime == expected
    assert len(expected) >= 6  # the stream went through a whole epoch: every runtime kind met
    load_time = Counter(r["reason"] for r in rows if "stream_position" not in r)
    assert load_time == {k: 2 for k in LOAD_TIME}

    # Run again from scratch in the same workdir (as after losing every checkpoint): every
    # skipped record is met again, and listed once.
    shutil.rmtree(trainer.checkpoint_dir(micro_config, "stage2"))
    before = skipped.read_text()
    trainer.train_stage(stage, source, tokenizer)
    assert skipped.read_text() == before


def test_data_position_is_restored_from_the_checkpoint(micro_config, broken_jsonl, tmp_path):
    """Draw 3 batches, checkpoint, draw 4 more; a fresh iterator restored from the checkpoint
    draws the same 4 (record indices and pixels), skips included."""
    path, _ = broken_jsonl
    micro_config.stage2.max_length = 64
    stage, source, tokenizer = _stage(micro_config, path, 8)
    state = {
        "step": jax.numpy.asarray(3),
        "params": {"w": np.zeros(2)},
        "opt_state": {"m": np.ones(2)},
    }

    def iterator(name):
        return iter(stage.dataset(source, tokenizer, stage.skip_log(source, tmp_path / name)))

    first = iterator("a.jsonl")
    for _ in range(3):
        next(first)
    manager = checkpoint.make_manager(tmp_path / "ckpt")
    checkpoint.save(manager, 3, state, first, {"stage": "stage2"}, force=True)
    manager.wait_until_finished()
    expected = [next(first) for _ in range(4)]

    resumed = iterator("b.jsonl")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
    restored = checkpoint.restore_state(manager, abstract, resumed)
    assert int(restored["step"]) == 3
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["images"], want["images"])


def test_two_processes_read_disjoint_shards_covering_the_data(
    micro_config, broken_jsonl, monkeypatch, tmp_path
):
    """Process p of 2 reads rows [4p, 4p + 4) of every 8-record global batch of the stream
    (bad records dropped): checked exactly over more than an epoch; the first epoch's shares
    are disjoint and cover every good record."""
    path, kinds = broken_jsonl
    micro_config.stage2.max_length = 64
    stage, source, tokenizer = _stage(micro_config, path, 8)
    stream = grain.MapDataset.source(source).shuffle(seed=micro_config.seed).repeat(None)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    first_epoch = {}
    for process in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda p=process: p)
        skip_log = stage.skip_log(source, tmp_path / f"skipped_{process}.jsonl")
        batches = iter(stage.dataset(source, tokenizer, skip_log))
        got = np.concatenate([next(batches)["index"] for _ in range(20)]).tolist()  # 80 > 66
        mine = [(i // 4) * 8 + process * 4 + i % 4 for i in range(400)]
        positions = [p for p in mine if kinds[int(stream[p]["id"][1:])] not in RUNTIME]
        positions = positions[: len(got)]
        assert got == [stream[p]["index"] for p in positions]
        first_epoch[process] = {i for i, p in zip(got, positions) if p < len(source)}
    assert not first_epoch[0] & first_epoch[1]
    good = {i for i in range(len(source)) if kinds[int(source[i]["id"][1:])] not in RUNTIME}
    assert first_epoch[0] | first_epoch[1] == good


def test_stage_data_joins_comma_separated_sources(micro_config):
    data, _ = from_config.prepare_data(micro_config)
    sizes = []
    for spec in ("captions", "instruct", "captions, instruct"):
        micro_config.stage2.data = spec
        sizes.append(len(from_config.stage_source(micro_config, "stage2", data)))
    assert sizes[2] == sizes[0] + sizes[1]
    micro_config.stage2.data = "instruct,missing.json"
    with pytest.raises(FileNotFoundError, match="stage2.data: 'missing.json'"):
        from_config.stage_source(micro_config, "stage2", data)
