"""Starting from a released MoE-LLaVA directory (`model.init_from_hf`): a stage trains from
its weights, `predict --config` answers from it, and contradicting keys are refused.

The "release" is written by `hf.export_moe_llava` (the original's tensor names and config.json
keys, checked against transformers in test_convert_hf.py) from a micro model's random
weights, next to a tiny transformers CLIP tower: nothing is downloaded."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from moe_llava_jax import answering, build, export, param_tree, sharding, trainer  # noqa: E402
from moe_llava_jax.convert import hf  # noqa: E402
from moe_llava_jax.data import from_config  # noqa: E402
from tests import micro_config as micro  # noqa: E402

# A StableLM-2-like micro decoder (LayerNorm, SwiGLU, partial rotary) and a tiny CLIP tower.
STABLELM_LIKE = dict(norm="layernorm", partial_rotary_factor=0.25, qkv_bias=True)
TOWER = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    image_size=32, patch_size=8,
)


def flat(tree):
    return {k: np.asarray(v) for k, v in param_tree.flatten(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def released(tmp_path_factory, data_root):
    """A MoE release and a tower written once for the module: (dir, the tower's dir, the
    release's params, the model config they were exported from)."""
    root = tmp_path_factory.mktemp("release")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TOWER)).save_pretrained(
        root / "tower"
    )
    config = _micro_config(root, data_root)
    config.model.vision_from = str(root / "tower")
    _, tokenizer = from_config.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    source = build.StageModel(config, "stage3", mesh, tokenizer.vocab_size)
    params = source.canonical(source.random_params())
    weights = {"decoder": params["decoder"], "projector": params["projector"]}
    hf.export_moe_llava(
        jax.device_get(weights), "moe_llava_stablelm", source.model_cfg.projector,
        root / "release", decoder=source.model_cfg.decoder,
        mm_image_tower="openai/clip-vit-large-patch14-336",
    )
    return root / "release", root / "tower", flat(weights), source.model_cfg


@pytest.fixture
def release(released, tmp_path, data_root):
    """(a micro config set to start stage 3 from the release, release dir, its params, the
    model config it was exported from)."""
    release_dir, tower_dir, weights, model_cfg = released
    config = _micro_config(tmp_path, data_root)
    config.model.update(init_from_hf=str(release_dir), vision_from=str(tower_dir))
    config.model.decoder.update(num_layers=5, hidden_size=64)  # replaced by the release's
    config.run_stages = "stage3"
    config.stage3.update(init_from="", num_steps=2, checkpoint_every=2)
    return config, release_dir, weights, model_cfg


def _micro_config(root, data_root):
    config = micro.get_config(f"workdir={root / 'workdir'},data_root={data_root}")
    config.model.decoder.update(**STABLELM_LIKE)
    return config


def test_stage3_fine_tunes_from_a_moe_release(release):
    config, _, released, released_cfg = release
    config.model.residual_dropout = 0.1  # a recipe switch over the release's (0 here)
    stage, data, tokenizer = _stage(config, "stage3")
    assert stage.model_cfg.decoder.residual_dropout == 0.1
    # Dims and the MoE architecture come from the release's config.json (not model.decoder).
    ours, theirs = stage.model_cfg.decoder, released_cfg.decoder
    same = lambda c: dataclasses.replace(c, moe=None, residual_dropout=0.0)
    assert same(ours) == same(theirs)
    assert ours.moe_layers == theirs.moe_layers
    assert ours.moe == dataclasses.replace(theirs.moe, layers=ours.moe.layers)
    start = flat(stage.canonical(stage.fresh_params()))
    _, tower = hf.load_vision(config.model.vision_from)
    for path, value in released.items():
        np.testing.assert_array_equal(start[path], value, err_msg=path)
    for path, value in flat(tower).items():
        np.testing.assert_array_equal(start[f"vision/{path}"], value, err_msg=path)

    trainer.run(config)
    losses = [
        json.loads(line)["loss"] for line in open(f"{config.workdir}/stage3/metrics.jsonl")
    ]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    trained, step = stage.restore_params(trainer.checkpoint_dir(config, "stage3"))
    assert step == 2
    trained = flat(stage.canonical(trained))
    moved = {p for p, v in released.items() if not np.array_equal(trained[p], v)}
    # stage3_paper: the MoE layers (experts and routers) train, the rest stays the release's.
    assert moved and all("/moe/" in p for p in moved), sorted(moved)
    assert any("/moe/router/" in p for p in moved) and any("/moe/experts/" in p for p in moved)

    # The fine-tuned model exported as a release again: the original's layout, read back
    # bit-identical (frozen tensors were stored in float32 here, so no rounding either).
    out = f"{config.workdir}/exported"
    assert export.export_checkpoint(trainer.checkpoint_dir(config, "stage3"), out) == (
        "moe_llava_stablelm"
    )
    decoder, _, exported = hf.load_moe_llava(out)
    assert decoder.moe_layers == stage.model_cfg.decoder.moe_layers
    exported = flat(exported)
    assert exported.keys() == released.keys()
    for path, value in exported.items():
        np.testing.assert_array_equal(value, trained[path], err_msg=path)
    written = json.loads(open(f"{out}/config.json").read())
    assert written["mm_image_tower"] == "openai/clip-vit-large-patch14-336"


def test_a_dense_release_is_upcycled_into_stage3(release, tmp_path):
    config, release_dir, released, _ = release
    dense_params = {
        "decoder": param_tree.unflatten(
            {p[len("decoder/"):]: v for p, v in released.items() if p.startswith("decoder/")}
        ),
        "projector": param_tree.unflatten(
            {p[len("projector/"):]: v for p, v in released.items() if p.startswith("projector/")}
        ),
    }
    # The release's decoder without experts: layer 0's FFN is expert 0 of the MoE release.
    dense_decoder = dense_params["decoder"]
    for i in (0,):
        moe = dense_decoder[f"layers_{i}"].pop("moe")
        dense_decoder[f"layers_{i}"]["mlp"] = jax.tree.map(lambda x: x[0], moe["experts"])
    release_cfg = json.loads((release_dir / "config.json").read_text())
    moe_cfg = build.model_config(config, 0, with_moe=True).decoder
    dense_cfg = dataclasses.replace(moe_cfg, moe=None)
    hf.export_moe_llava(
        dense_params, "llava_stablelm", release_cfg["image_projector_type"], tmp_path / "dense",
        decoder=dense_cfg,
    )
    config.model.init_from_hf = str(tmp_path / "dense")
    config.model.moe.layers = "0"
    stage, _, _ = _stage(config, "stage3")
    start = flat(stage.canonical(stage.fresh_params()))
    up = dense_decoder["layers_0"]["mlp"]["wi_up"]["kernel"]
    for expert in start["decoder/layers_0/moe/experts/wi_up/kernel"]:
        np.testing.assert_array_equal(expert, up)
    np.testing.assert_array_equal(
        start["decoder/layers_1/mlp/wo/kernel"], dense_decoder["layers_1"]["mlp"]["wo"]["kernel"]
    )


def test_predict_answers_from_a_release(release, tmp_path):
    config, _, released, _ = release
    predictor = answering.Predictor(config, batch_size=2, max_new_tokens=3)
    assert predictor.stage.name == "stage3"
    params = flat(predictor.stage.canonical(predictor.params))
    for path, value in released.items():
        np.testing.assert_array_equal(params[path], value, err_msg=path)
    image = f"{config.data.root}/images/eval_00000.png"
    assert len(predictor.answer(["Is there a circle?"], [image])) == 1


@pytest.mark.slow
def test_predict_command_line_answers_from_a_release_with_the_pope_preset(release, tmp_path):
    config = release[0]
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"question_id": 7, "image": "images/eval_00000.png", "text": "Is there a cat?"})
        + "\n"
    )
    args = [
        f"--config=tests/micro_config.py:workdir={config.workdir},data_root={config.data.root},"
        "run_stages=stage3",
        f"--config.model.init_from_hf={config.model.init_from_hf}",
        f"--config.model.vision_from={config.model.vision_from}",
        "--config.stage3.init_from=",
        "--preset=pope",
        f"--questions={questions}",
        f"--image_folder={config.data.root}",
        f"--answers={tmp_path / 'a.jsonl'}",
    ]
    subprocess.run([sys.executable, "-m", "moe_llava_jax.predict", *args], check=True)
    (answer,) = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert answer["question_id"] == 7 and answer["prompt"] == "Is there a cat?"


def test_with_suffix_adds_a_benchmark_instruction_once():
    suffix = "\nAnswer the question using a single word or phrase."
    assert answering.with_suffix("Is there a dog?", suffix) == "Is there a dog?" + suffix
    assert answering.with_suffix("Is there a dog?" + suffix, suffix) == "Is there a dog?" + suffix


@pytest.mark.parametrize(
    "change,key",
    [
        (lambda c: c.update_from_flattened_dict({"model.llm_from": "/x"}), "model.llm_from"),
        (lambda c: c.update_from_flattened_dict({"model.vision_from": ""}), "model.vision_from"),
        (lambda c: c.update_from_flattened_dict({"stage3.init_from": "stage2"}), "stage3.init_from"),
        (lambda c: c.update_from_flattened_dict({"run_stages": "stage2"}), "stage2.moe"),
    ],
)
def test_keys_that_contradict_the_release_are_refused(release, change, key):
    config = release[0]
    change(config)
    with pytest.raises(ValueError, match=f"config key {key}"):
        trainer.validate_config(config)


def _stage(config, name):
    data, tokenizer = from_config.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    return trainer.Stage(config, name, mesh, tokenizer.vocab_size), data, tokenizer


def test_export_refuses_a_base_whose_layout_cannot_describe_the_decoder(released, tmp_path):
    _, _, _, model_cfg = released
    decoder = model_cfg.decoder
    config = hf.families.moe_llava_hf_config(decoder, "moe_llava_stablelm", "mlp2x_gelu", 32)
    (tmp_path / "config.json").write_text(json.dumps(config))
    export.check_round_trip(decoder, tmp_path, "stablelm")  # describes it: passes
    rms = dataclasses.replace(decoder, norm="rmsnorm")  # StableLM's layout has LayerNorm only
    with pytest.raises(ValueError, match=r"does not describe this decoder \(differs in \['norm'\]"):
        export.check_round_trip(rms, tmp_path, "stablelm")
