"""The trainer: resume mid-stage, init_from between stages, config errors naming keys."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from moe_llava_jax import checkpoint, param_tree, sharding, trainer
from moe_llava_jax.data import from_config
from tests.helpers import first_batch, make_stage


def stage_metrics(config, name):
    lines = (Path(config.workdir) / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def run_stage(config, name):
    data, tokenizer = from_config.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    stage = trainer.Stage(config, name, mesh, tokenizer.vocab_size)
    return trainer.train_stage(stage, from_config.stage_source(config, name, data), tokenizer)


@pytest.mark.slow
def test_resume_mid_stage_continues_step_count_and_schedule(micro_config):
    run_stage(micro_config, "stage1")  # 4 steps, checkpoints at 2 and 4
    uninterrupted = stage_metrics(micro_config, "stage1")
    assert [m["step"] for m in uninterrupted] == [1, 2, 3, 4]
    ckpt_dir = trainer.checkpoint_dir(micro_config, "stage1")
    shutil.rmtree(ckpt_dir / "4")  # as if the process died after step 3
    run_stage(micro_config, "stage1")
    # The log is cut back to the checkpoint (step 2), then steps 3-4 are logged again: with
    # the same data and weights, exactly the uninterrupted run's values.
    assert stage_metrics(micro_config, "stage1") == uninterrupted


@pytest.mark.parametrize("packing", ["first_fit", "bucket"])
def test_a_packed_stage_trains_and_resumes_exactly(micro_config, packing):
    """data.packing through the trainer: first_fit rows hold several captions, bucket
    batches are shorter than max_length; a run resumed from the step-2 checkpoint (the
    packer's state in it) logs what the uninterrupted run logged."""
    micro_config.data.update(packing=packing, packing_bins=4, bucket_window=2)
    run_stage(micro_config, "stage1")
    uninterrupted = stage_metrics(micro_config, "stage1")
    # Unpacked, the 8 rows hold 92-96 answer tokens (one caption each); packed ~4x that.
    if packing == "first_fit":
        assert all(m["answer_tokens"] > 250 for m in uninterrupted)
    else:  # captions of ~30 tokens: the 48 bucket at most
        stage, data, tokenizer = make_stage(micro_config, "stage1")
        assert first_batch(stage, data, tokenizer)["input_ids"].shape[1] <= 48
    shutil.rmtree(trainer.checkpoint_dir(micro_config, "stage1") / "4")
    run_stage(micro_config, "stage1")
    assert stage_metrics(micro_config, "stage1") == uninterrupted


def test_the_loop_dispatches_each_step_before_waiting_for_the_last(micro_config):
    """No per-step host sync: step N + 1 is handed to the devices before step N's metrics
    are first read (the loop's only wait for the device), every step's metrics are read,
    and the checkpoints carry the host's step count."""
    events = []
    stage, data, tokenizer = make_stage(micro_config, "stage1")
    jitted = stage.train_step

    class ReadRecorded(dict):
        def __init__(self, metrics, step):
            super().__init__(metrics)
            self.step = step

        def __getitem__(self, key):
            if key == "nonfinite_streak":
                events.append(("read", self.step))
            return super().__getitem__(key)

    def recorded_step(state, batch):
        step = sum(kind == "dispatch" for kind, _ in events) + 1
        events.append(("dispatch", step))
        state, metrics = jitted(state, batch)
        return state, ReadRecorded(metrics, step)

    stage.train_step = recorded_step
    trainer.train_stage(stage, from_config.stage_source(micro_config, "stage1", data), tokenizer)
    first_read = {}
    for index, (kind, step) in enumerate(events):
        if kind == "read":
            first_read.setdefault(step, index)
    dispatch = {step: index for index, (kind, step) in enumerate(events) if kind == "dispatch"}
    assert sorted(first_read) == sorted(dispatch) == [1, 2, 3, 4]
    assert all(dispatch[n + 1] < first_read[n] for n in (1, 2, 3))
    saved = sorted(int(p.name) for p in trainer.checkpoint_dir(micro_config, "stage1").iterdir()
                   if p.name.isdigit())
    assert saved == [2, 4]


def test_three_stages_chain_through_init_from(micro_config):
    for name in ("stage1", "stage2", "stage3"):
        run_stage(micro_config, name)
    stage3 = stage_metrics(micro_config, "stage3")
    assert len(stage3) == 4 and "aux_loss" in stage3[0]
    assert len(stage3[0]["expert_load"]) == 1  # one MoE layer (sparse: layer 0 of 2)
    stage2_last = stage_metrics(micro_config, "stage2")[-1]["ce"]
    assert stage3[0]["ce"] < stage_metrics(micro_config, "stage2")[0]["ce"]
    assert stage3[0]["ce"] == pytest.approx(stage2_last, rel=0.5)  # starts where stage 2 ended


def test_a_looped_checkpoint_starts_a_scanned_stage(micro_config):
    """Layout is a run-time choice: stage 1 trained with the loop, stage 2 scanned restores
    it through the canonical layout, every param equal."""
    micro_config.model.scan_layers = False
    looped = jax.device_get(run_stage(micro_config, "stage1"))  # the canonical layout
    micro_config.model.scan_layers = True
    data, tokenizer = from_config.prepare_data(micro_config)
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    stage2 = trainer.Stage(micro_config, "stage2", mesh, tokenizer.vocab_size)
    params = stage2.initial_params()
    assert "scan_0" in params["decoder"] and "layers_0" in looped["decoder"]
    restored = param_tree.flatten(jax.device_get(stage2.canonical(params)))
    expected = param_tree.flatten(looped)
    assert restored.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(restored[path], value, err_msg=path)


def test_an_object_store_without_its_package_names_the_key_and_the_package(
    micro_config, monkeypatch
):
    micro_config.checkpoints.root = "gs://bucket/run"
    monkeypatch.setattr(checkpoint.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"checkpoints.root='gs://bucket/run'.*pip install gcsfs"):
        trainer.validate_config(micro_config)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_lean_checkpoints_save_the_frozen_params_once(micro_config, tmp_path):
    """Stage 1 trains the projector alone. Lean (the default): `frozen/` holds the tower and
    the LLM once and each step only the projector (+ its Adam state); `every_save` writes
    them at every step. Both runs train the same params, restored whole either way, and
    stage 2 starts from the lean one (`init_from`) with the same params."""
    runs = {}
    for frozen in ("once", "every_save"):
        micro_config.workdir = str(tmp_path / frozen)
        micro_config.checkpoints.frozen = frozen
        trained = param_tree.flatten(jax.device_get(run_stage(micro_config, "stage1")))
        directory = Path(trainer.checkpoint_dir(micro_config, "stage1"))
        stage, _, _ = make_stage(micro_config, "stage1")
        restored, step = stage.restore_params(directory)
        assert step == 4
        restored = param_tree.flatten(jax.device_get(restored))
        assert restored.keys() == trained.keys()
        for path, value in trained.items():
            np.testing.assert_array_equal(restored[path], value, err_msg=f"{frozen} {path}")
        runs[frozen] = directory, trained, stage
    lean_dir, lean_params, stage = runs["once"]
    full_dir, full_params, _ = runs["every_save"]
    for path, value in full_params.items():
        np.testing.assert_array_equal(lean_params[path], value, err_msg=path)
    assert not (full_dir / "frozen").exists()
    predicted = checkpoint.saved_bytes(stage.abstract_state, stage.mask)
    assert predicted["lean"] < predicted["every_save"] / 10  # the projector is small
    for step in ("2", "4"):
        full, lean = directory_bytes(full_dir / step), directory_bytes(lean_dir / step)
        assert full >= predicted["every_save"] and lean >= predicted["lean"]
        # orbax's own metadata and the data iterator's state come on top of the arrays
        assert full - predicted["every_save"] == pytest.approx(lean - predicted["lean"], rel=0.5)
    assert directory_bytes(lean_dir / "frozen") >= predicted["frozen_once"]

    micro_config.workdir = str(tmp_path / "once")
    stage2, _, _ = make_stage(micro_config, "stage2")
    started = param_tree.flatten(jax.device_get(stage2.initial_params()))
    for path, value in lean_params.items():
        np.testing.assert_array_equal(started[path], value, err_msg=path)


def test_a_stage_that_freezes_nothing_saves_whole_params(micro_config):
    """Nothing to write once: every step holds all params (no `frozen/`), restored whole."""
    del micro_config.stage1.trainable  # a preset name; a config file may give rules instead
    micro_config.stage1.trainable = [[".*", True]]
    trained = param_tree.flatten(jax.device_get(run_stage(micro_config, "stage1")))
    directory = Path(trainer.checkpoint_dir(micro_config, "stage1"))
    assert not (directory / "frozen").exists()
    stage, _, _ = make_stage(micro_config, "stage1")
    restored = param_tree.flatten(jax.device_get(stage.restore_params(directory)[0]))
    for path, value in trained.items():
        np.testing.assert_array_equal(restored[path], value, err_msg=path)


def test_missing_init_from_names_the_command(micro_config):
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    stage = trainer.Stage(micro_config, "stage3", mesh, 300)
    with pytest.raises(FileNotFoundError, match=r"stage3.init_from.*configs/stage2.py"):
        stage.initial_params()


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("model.moe.top_k", 5, "model.moe.top_k=5"),
        ("model.moe.layers", "odd", "model.moe.layers='odd'"),
        ("stage3.trainable", "everything", "trainable='everything'"),
        ("run_stages", "stage1,stage4", "stage4"),
        ("routing.after", "stage2", "routing.after names 'stage2', which has no MoE"),
        ("workdir", "gs://bucket/run", "workdir='gs://bucket/run'.*gcsfuse"),
        ("upcycle.mode", "clone", "upcycle.mode='clone'"),
        ("data.packing", "best_fit", "data.packing='best_fit'"),
        ("model.moe.exchange", "sparse", "model.moe.exchange='sparse'"),
        ("data.reader_threads", -1, "data.reader_threads=-1"),
        ("model.moe.receive_factor", 0.0, "model.moe.receive_factor=0.0"),
        ("checkpoints.frozen", "never", "checkpoints.frozen='never'"),
        ("checkpoints.root", "ftp://host/run", "checkpoints.root='ftp://host/run'"),
    ],
)
def test_bad_config_values_fail_naming_the_key(micro_config, key, value, match):
    node, _, leaf = key.rpartition(".")
    target = micro_config
    for part in filter(None, node.split(".")):
        target = target[part]
    target[leaf] = value
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        trainer.validate_config(micro_config)


def test_non_finite_updates_are_skipped_then_the_run_saves_and_stops(micro_config):
    """A learning rate of 1e30 blows the weights up after the first real update; from then on
    every gradient is non-finite: those updates are skipped (weights stay as they were) and
    counted, and once `max_nonfinite_steps` in a row are seen — one step late, the loop
    reads metrics a step behind — the stage saves the step after them and stops."""
    micro_config.stage1.update(lr=1e30, num_steps=12, warmup_ratio=0.0)
    micro_config.max_nonfinite_steps = 3
    streak_message = r"3 steps in a row \(up to step (\d+)\)"
    with pytest.raises(trainer.NonFiniteLossError, match=streak_message) as error:
        run_stage(micro_config, "stage1")
    logged = stage_metrics(micro_config, "stage1")
    streaks = [m["nonfinite_streak"] for m in logged]
    last = logged[-1]["step"]
    assert streaks[-4:] == [1, 2, 3, 4] and logged[-1]["nonfinite_total"] == 4
    assert f"up to step {last - 1}" in str(error.value)
    assert f"saved at step {last}" in str(error.value)
    assert last < 12  # stopped early
    ckpt = trainer.checkpoint_dir(micro_config, "stage1")
    assert last in [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()]


def trainer_command(micro_config, *extra):
    config = (
        f"tests/micro_config.py:workdir={micro_config.workdir},"
        f"data_root={micro_config.data.root},run_stages=stage2"
    )
    return [sys.executable, "-m", "moe_llava_jax.train", f"--config={config}", *extra]


def test_the_command_line_reports_a_missing_checkpoint_in_one_line(micro_config):
    """Stage 2 without stage 1's checkpoint: one line naming the key and the command that
    makes the checkpoint, exit status 2, no traceback (unless --debug)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    plain = subprocess.run(
        trainer_command(micro_config), capture_output=True, text=True, env=env, timeout=300
    )
    assert plain.returncode == 2, plain.stderr[-2000:]
    assert "Traceback" not in plain.stderr
    error = [line for line in plain.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "stage2.init_from='stage1'" in error[0], plain.stderr[-2000:]
    assert "python -m moe_llava_jax.train --config=configs/stage1.py" in error[0]
    debug = subprocess.run(
        trainer_command(micro_config, "--debug"), capture_output=True, text=True, env=env,
        timeout=300,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "FileNotFoundError" in debug.stderr
