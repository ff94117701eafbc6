"""Shared fixtures: a micro MoE-LLaVA config on a small generated dataset."""

import pytest

from tests import micro_config as micro


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def micro_config(tmp_path, data_root):
    """`tests/micro_config.py` in this test's tmp workdir; all three stages selected."""
    return micro.get_config(
        f"workdir={tmp_path / 'workdir'},data_root={data_root},run_stages=stage1+stage2+stage3"
    )
