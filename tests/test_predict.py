"""The predict CLI's pieces: a checkpoint answers single questions and LLaVA question files."""

import json

import pytest

from moe_llava_jax import predict, sharding, train
from moe_llava_jax.data.jsonl import write_jsonl
from moe_llava_jax.generate import Sampling


@pytest.fixture
def trained_checkpoint(micro_config):
    data, tokenizer = train.prepare_data(micro_config)
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    for name in ("stage1", "stage2"):
        stage = train.Stage(micro_config, name, mesh, tokenizer.vocab_size)
        train.train_stage(stage, train.stage_source(micro_config, name, data), tokenizer)
    return train.checkpoint_dir(micro_config, "stage2"), data


def test_answer_file_keeps_order_ids_and_llava_fields(tmp_path, trained_checkpoint):
    checkpoint_dir, data = trained_checkpoint
    predictor = predict.Predictor(checkpoint_dir, batch_size=4, max_new_tokens=3)
    annotations = json.loads(data.eval_annotations_json.read_text())
    questions = [
        {"question_id": f"q{i}", "image": a["image"], "text": "Is there a red circle?"}
        for i, a in enumerate(annotations[:5])
    ] + [{"question_id": "text-only", "text": "Hello?"}]
    write_jsonl(tmp_path / "q.jsonl", questions)
    predict.answer_file(
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
        predict.answer_file(
            predict.Predictor(checkpoint_dir, batch_size=2, max_new_tokens=2),
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
        return predict.Predictor(
            checkpoint_dir, batch_size=4, max_new_tokens=12, sampling=sampling
        ).answer(questions, images)

    first = sampled(0)
    assert sampled(0) == first
    assert sampled(1) != first
