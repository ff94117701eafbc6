"""The trainer: resume mid-stage, init_from between stages, config errors naming keys."""

import json
import shutil
from pathlib import Path

import pytest

from moe_llava_jax import sharding, train


def stage_metrics(config, name):
    lines = (Path(config.workdir) / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def run_stage(config, name):
    data, tokenizer = train.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    stage = train.Stage(config, name, mesh, tokenizer.vocab_size)
    return train.train_stage(stage, train.stage_source(config, name, data), tokenizer)


def test_resume_mid_stage_continues_step_count_and_schedule(micro_config):
    run_stage(micro_config, "stage1")  # 4 steps, checkpoints at 2 and 4
    uninterrupted = stage_metrics(micro_config, "stage1")
    assert [m["step"] for m in uninterrupted] == [1, 2, 3, 4]
    ckpt_dir = train.checkpoint_dir(micro_config, "stage1")
    shutil.rmtree(ckpt_dir / "4")  # as if the process died after step 3
    run_stage(micro_config, "stage1")
    # The log is cut back to the checkpoint (step 2), then steps 3-4 are logged again: with
    # the same data and weights, exactly the uninterrupted run's values.
    assert stage_metrics(micro_config, "stage1") == uninterrupted


def test_three_stages_chain_through_init_from(micro_config):
    for name in ("stage1", "stage2", "stage3"):
        run_stage(micro_config, name)
    stage3 = stage_metrics(micro_config, "stage3")
    assert len(stage3) == 4 and "aux_loss" in stage3[0]
    assert len(stage3[0]["expert_load"]) == 1  # one MoE layer (sparse: layer 0 of 2)
    stage2_last = stage_metrics(micro_config, "stage2")[-1]["ce"]
    assert stage3[0]["ce"] < stage_metrics(micro_config, "stage2")[0]["ce"]
    assert stage3[0]["ce"] == pytest.approx(stage2_last, rel=0.5)  # starts where stage 2 ended


def test_missing_init_from_names_the_command(micro_config):
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    stage = train.Stage(micro_config, "stage3", mesh, 300)
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
    ],
)
def test_bad_config_values_fail_naming_the_key(micro_config, key, value, match):
    node, _, leaf = key.rpartition(".")
    target = micro_config
    for part in filter(None, node.split(".")):
        target = target[part]
    target[leaf] = value
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        train.validate_config(micro_config)


def test_non_finite_updates_are_skipped_then_the_run_saves_and_stops(micro_config):
    """A learning rate of 1e30 blows the weights up after the first real update; from then on
    every gradient is non-finite: those updates are skipped (weights stay as they were) and
    counted, and after `max_nonfinite_steps` in a row the stage saves and stops."""
    micro_config.stage1.update(lr=1e30, num_steps=12, warmup_ratio=0.0)
    micro_config.max_nonfinite_steps = 3
    with pytest.raises(train.NonFiniteLossError, match=r"3 steps in a row \(up to step (\d+)\)"):
        run_stage(micro_config, "stage1")
    logged = stage_metrics(micro_config, "stage1")
    streaks = [m["nonfinite_streak"] for m in logged]
    last = logged[-1]["step"]
    assert streaks[-3:] == [1, 2, 3] and logged[-1]["nonfinite_total"] == 3
    assert last < 12  # stopped early
    ckpt = train.checkpoint_dir(micro_config, "stage1")
    assert last in [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()]
