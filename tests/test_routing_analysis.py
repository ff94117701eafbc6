"""Routing statistics: counts by modality add up to the tokens; the CLI writes JSON + PNG."""

import json

import numpy as np
import pytest

from moe_llava_jax import sharding, trainer
from moe_llava_jax.data import from_config
from moe_llava_jax.data.conversation import IMAGE_TOKEN_INDEX
from moe_llava_jax.evaluate import routing


def test_counts_split_by_modality_and_sum_to_tokens():
    ids = np.array([[IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 5, 6, 0], [7, 8, 9, 0, 0]])
    valid = ids != 0
    # choices [layers=2, b=2, t=5, k=2]
    choices = np.array(
        [
            [[[0, 1], [0, 2], [1, 0], [3, 2], [3, 3]], [[2, 1], [2, 0], [1, 3], [0, 0], [0, 0]]],
            [[[3, 1], [3, 2], [0, 1], [0, 2], [3, 3]], [[1, 0], [1, 2], [1, 3], [0, 0], [0, 0]]],
        ]
    )
    stats = routing.RoutingStatistics(num_layers=2, num_experts=4)
    stats.add(choices, ids, valid)
    np.testing.assert_array_equal(stats.tokens, [2, 5])  # pads excluded
    np.testing.assert_array_equal(stats.top1[0, 0], [2, 0, 0, 0])  # image tokens, layer 0
    np.testing.assert_array_equal(stats.top1[1, 1], [2, 3, 0, 0])  # text tokens, layer 1
    assert stats.top1.sum(axis=-1).tolist() == [[2, 5], [2, 5]]
    assert stats.topk.sum(axis=-1).tolist() == [[4, 10], [4, 10]]
    summary = stats.summary((0, 2))
    assert summary["top_paths"]["image"] == [[[0, 3], 2]]
    assert sum(n for _, n in summary["top_paths"]["text"]) == 5
    np.testing.assert_allclose(np.sum(summary["topk_load"], axis=-1), 1.0, atol=1e-3)


@pytest.mark.slow
def test_analyse_checkpoint_writes_json_and_png(tmp_path, micro_config):
    data, tokenizer = from_config.prepare_data(micro_config)
    mesh = sharding.make_mesh(micro_config.mesh.to_dict())
    for name in ("stage1", "stage2", "stage3"):
        stage = trainer.Stage(micro_config, name, mesh, tokenizer.vocab_size)
        trainer.train_stage(stage, from_config.stage_source(micro_config, name, data), tokenizer)
    summary = routing.analyse_checkpoint(
        trainer.checkpoint_dir(micro_config, "stage3"), tmp_path / "routing", num_batches=2
    )
    written = json.loads((tmp_path / "routing" / "routing.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert (tmp_path / "routing" / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    counts = np.asarray(written["top1_counts"])  # [layers, modalities, experts]
    assert counts.sum(axis=-1).tolist() == [list(written["tokens"].values())] * counts.shape[0]
    assert written["tokens"]["image"] == 2 * 8 * 4  # 2 batches x 8 records x 4 image tokens
    captions = routing.analyse_checkpoint(
        trainer.checkpoint_dir(micro_config, "stage3"),
        tmp_path / "routing_captions",
        num_batches=2,
        data=str(data.captions_json),
        image_root=str(data.root),
    )
    assert captions["tokens"]["image"] == 2 * 8 * 4
    assert captions["tokens"]["text"] != summary["tokens"]["text"]  # other data: other text
