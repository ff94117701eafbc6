"""Shared fixtures: a micro MoE-LLaVA config on a small generated dataset."""

import pytest

from configs import common


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def micro_config(tmp_path, data_root):
    """The moe_tuning config shrunk to seconds: 2-layer decoder, 4 image tokens, 64 records."""
    config = common.moe_tuning_config("stage1,stage2,stage3", "")
    config.workdir = str(tmp_path / "workdir")
    config.data.root = data_root
    config.data.synthetic.update(num_train=64, num_eval=8, image_size=32)
    config.model.vision.update(
        image_size=32, patch_size=16, hidden_size=32, num_heads=2, intermediate_size=64
    )
    config.model.decoder.update(
        hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    for name in ("stage1", "stage2", "stage3"):
        config[name].update(
            num_steps=4, batch_size=8, log_every=1, checkpoint_every=2, max_length=96
        )
    return config
