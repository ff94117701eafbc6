"""The predict CLI's pieces: a checkpoint answers single questions and LLaVA question files,
on the devices at hand whatever mesh it trained on."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from moe_llava_jax import answering, sharding, trainer
from moe_llava_jax.data import from_config
from moe_llava_jax.data.jsonl import write_jsonl
from moe_llava_jax.generate import Sampling
from tests import micro_config as micro


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, data_root):
    """Stages 1-2 trained once for the module's tests (they only read the checkpoint)."""
    workdir = tmp_path_factory.mktemp("predict") / "workdir"
    micro_config = micro.get_config(
        f"workdir={workdir},data_root={data_root},run_stages=stage1+stage2+stage3"
    )
    data, tokenizer = from_config.prepare_data(micro_config)
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    for name in ("stage1", "stage2"):
        stage = trainer.Stage(micro_config, name, mesh, tokenizer.vocab_size)
        trainer.train_stage(stage, from_config.stage_source(micro_config, name, data), tokenizer)
    return trainer.checkpoint_dir(micro_config, "stage2"), data


def test_answer_file_keeps_order_ids_and_llava_fields(tmp_path, trained_checkpoint):
    checkpoint_dir, data = trained_checkpoint
    predictor = answering.Predictor(checkpoint_dir, batch_size=4, max_new_tokens=3)
    annotations = json.loads(data.eval_annotations_json.read_text())
    questions = [
        {"question_id": f"q{i}", "image": a["image"], "text": "Is there a red circle?"}
        for i, a in enumerate(annotations[:5])
    ] + [{"question_id": "text-only", "text": "Hello?"}]
    write_jsonl(tmp_path / "q.jsonl", questions)
    answering.answer_file(
        predictor,
        tmp_path / "q.jsonl",
        data.root,
        tmp_path / "a.jsonl",
    )
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    for answer in answers:
        assert set(answer) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert isinstance(answer["text"], str) and answer["model_id"] == "moe_llava_jax/stage2"
    single = predictor.answer(["Is there a red circle?"], [str(data.root / questions[0]["image"])])
    assert single == [answers[0]["text"]]  # batch composition does not change an answer


def test_bad_question_line_names_file_and_line(tmp_path, trained_checkpoint):
    checkpoint_dir, data = trained_checkpoint
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "a"}, {"question_id": 2}])
    with pytest.raises(ValueError, match=r"q.jsonl: line 2: missing field 'text'"):
        answering.answer_file(
            answering.Predictor(checkpoint_dir, batch_size=2, max_new_tokens=2),
            tmp_path / "q.jsonl",
            data.root,
            tmp_path / "a.jsonl",
        )


def test_sampling_is_reproducible_by_seed(trained_checkpoint):
    """Same seed -> same sampled answers, another seed -> others (through the whole CLI path)."""
    checkpoint_dir, data = trained_checkpoint
    questions = ["Describe the image."] * 4
    images = [None] * 4

    def sampled(seed):
        sampling = Sampling(temperature=1.5, top_p=0.95, seed=seed)
        return answering.Predictor(
            checkpoint_dir, batch_size=4, max_new_tokens=12, sampling=sampling
        ).answer(questions, images)

    first = sampled(0)
    assert sampled(0) == first
    assert sampled(1) != first


@pytest.mark.slow
def test_a_checkpoint_trained_on_four_expert_devices_answers_on_one(micro_config):
    """Stage 3 trained by the command line on mesh.expert=4 (4 simulated devices, dropless
    all-to-alls) opens here, on this process's one device, with all 4 experts on it."""
    workdir, root = micro_config.workdir, micro_config.data.root
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    config = f"tests/micro_config.py:workdir={workdir},data_root={root},run_stages=stage3"
    overrides = [
        "--config.mesh.expert=4",
        "--config.stage3.init_from=",
        "--config.model.moe.dispatch=dropless",
        "--config.stage3.num_steps=2",
    ]
    command = [sys.executable, "-m", "moe_llava_jax.train", f"--config={config}", *overrides]
    trained = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "'expert': 4" in trained.stdout

    checkpoint_dir = trainer.checkpoint_dir(micro_config, "stage3")
    predictor = answering.Predictor(checkpoint_dir, batch_size=2, max_new_tokens=4)
    assert jax.device_count() == 1 and predictor.mesh.devices.size == 1
    saved = json.loads(predictor.config.to_json())
    assert saved["mesh"]["expert"] == 4  # trained on 4 expert devices, opened on 1
    kernel = predictor.params["decoder"]["scan_0"]["block_0"]["moe"]["experts"]["wo"]["kernel"]
    assert kernel.shape[1] == 4 and np.isfinite(np.asarray(kernel)).all()  # all 4 experts here
    data = from_config.prepare_data(micro_config)[0]
    image = str(data.root / json.loads(data.eval_annotations_json.read_text())[0]["image"])
    answers = predictor.answer(["Is there a red circle?", "Hello?"], [image, None])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
