"""The upcycling ablation: its measures on hand-made inputs, and a micro end-to-end run."""

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from moe_llava_jax.experiments import ablation

pytestmark = pytest.mark.slow  # several processes / whole stages: `-m slow`


def test_expert_cosine_distance_of_copies_is_zero_and_of_orthogonal_experts_one():
    copies = {"decoder": {"layers_0": {"moe": {"experts": {"wo": {"kernel": np.ones((3, 2, 2))}}}}}}
    assert ablation.expert_cosine_distance(copies) == pytest.approx(0.0)
    orthogonal = np.zeros((2, 2, 1))
    orthogonal[0, 0], orthogonal[1, 1] = 1.0, 1.0
    tree = {"decoder": {"layers_0": {"moe": {"experts": {"wo": {"kernel": orthogonal}}}}}}
    assert ablation.expert_cosine_distance(tree) == pytest.approx(1.0)


def test_modality_divergence_is_total_variation_between_image_and_text_load():
    # layer 0: identical loads (0); layer 1: image all on expert 0, text half/half (0.5)
    summary = {"top1_load": [[[0.5, 0.5], [0.5, 0.5]], [[1.0, 0.0], [0.5, 0.5]]]}
    assert ablation.modality_divergence(summary) == pytest.approx(0.25)


def test_micro_ablation_runs_every_mode_and_seed(micro_config):
    micro_config.ablation = ml_collections.ConfigDict(
        {"modes": "copy,drop_upcycle,dense", "seeds": "0,1"}
    )
    micro_config.pope.num_per_image = 1
    with pytest.raises(ValueError, match="model.scan_layers=False"):
        ablation.run(micro_config)  # the dense baseline needs per-layer params
    micro_config.model.scan_layers = False  # as configs/ablation.py
    results = ablation.run(micro_config)
    assert [(r["mode"], r["seed"]) for r in results] == [
        (mode, seed) for mode in ("copy", "drop_upcycle", "dense") for seed in (0, 1)
    ]
    by_mode = {r["mode"]: r for r in results if r["seed"] == 0}
    assert by_mode["copy"]["expert_distance"] < 0.01 < by_mode["drop_upcycle"]["expert_distance"]
    assert "expert_distance" not in by_mode["dense"]
    workdir = Path(micro_config.workdir)
    assert json.loads((workdir / "ablation.json").read_text()) == json.loads(json.dumps(results))
    table = (workdir / "ablation.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["copy", "drop_upcycle", "dense"]
    assert (workdir / "ablation_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (workdir / "copy_seed1" / "routing" / "routing.json").exists()
