"""Multi-host on one machine: 2 trainer processes (4 fake CPU devices each) joined by
`jax.distributed` over 127.0.0.1 train like 1 process with 8 devices; a checkpoint saved on 8
devices restores exactly onto a 4-device mesh."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from moe_llava_jax.data import from_config
from tests import micro_config as micro

pytestmark = pytest.mark.slow  # several processes / whole stages: `-m slow`

ROOT = Path(__file__).resolve().parents[1]
MESH = ["--config.mesh.data=2", "--config.mesh.expert=4"]


def env_with_devices(count: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}


def train_command(workdir: Path, data_root: Path, stages: str, *extra: str) -> list[str]:
    arg = f"workdir={workdir},data_root={data_root},run_stages={stages}"
    config = f"--config=tests/micro_config.py:{arg}"
    return [sys.executable, "-m", "moe_llava_jax.train", config, *MESH, *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(workdir: Path, stage: str) -> list[float]:
    lines = (workdir / stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(data root, 1-process workdir, 2-process workdir), each trained through 3 stages."""
    data_root = tmp_path_factory.mktemp("data")
    from_config.prepare_data(micro.get_config(f"data_root={data_root}"))
    single = tmp_path_factory.mktemp("one_process")
    double = tmp_path_factory.mktemp("two_processes")
    train_both_ways(single, double, data_root, "stage1+stage2+stage3")
    return data_root, single, double


def train_both_ways(single: Path, double: Path, data_root: Path, stages: str, *extra: str):
    """`stages` in 1 process with 8 devices (workdir `single`) and in 2 processes with 4
    devices each (workdir `double`)."""
    subprocess.run(
        train_command(single, data_root, stages, *extra),
        cwd=ROOT,
        env=env_with_devices(8),
        check=True,
        capture_output=True,
    )
    coordinator = f"127.0.0.1:{free_port()}"
    processes = [
        subprocess.Popen(
            train_command(
                double,
                data_root,
                stages,
                *extra,
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address={coordinator}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ),
            cwd=ROOT,
            env=env_with_devices(4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()[-3000:]


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_two_processes_train_like_one_process_with_as_many_devices(runs, stage):
    _, single, double = runs
    assert len(losses(double, stage)) == 4  # process 0 logs; process 1 does not duplicate
    np.testing.assert_allclose(losses(double, stage), losses(single, stage), rtol=1e-5)
    assert sorted(p.name for p in (double / stage).glob("skipped*.jsonl")) == [
        "skipped.process0.jsonl",
        "skipped.process1.jsonl",
    ]


def test_dropless_expert_parallel_across_processes_trains_like_one_process(runs, tmp_path):
    """Stage 3 with dropless experts from the same stage-2 checkpoints: the all-to-alls cross
    the process boundary (2 x 4 devices) and the losses equal the 8-device process's."""
    data_root, single, double = runs
    workdirs = {}
    for name, source in (("single", single), ("double", double)):
        workdirs[name] = tmp_path / name
        shutil.copytree(source / "stage2", workdirs[name] / "stage2")
    extra = "--config.model.moe.dispatch=dropless"
    train_both_ways(workdirs["single"], workdirs["double"], data_root, "stage3", extra)
    dropless = losses(workdirs["double"], "stage3")
    assert len(dropless) == 4
    np.testing.assert_allclose(dropless, losses(workdirs["single"], "stage3"), rtol=1e-5)


RESTORE = textwrap.dedent("""
    import sys, numpy as np, jax
    from pathlib import Path
    sys.path.insert(0, ".")
    from tests import micro_config as micro
    from moe_llava_jax import checkpoint, sharding, trainer
    from moe_llava_jax.data import from_config

    workdir, data_root, data_axis, out = sys.argv[1:5]
    config = micro.get_config(f"workdir={workdir},data_root={data_root},run_stages=stage3")
    config.mesh.update(data=int(data_axis), expert=4)
    data, tokenizer = from_config.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    stage = trainer.Stage(config, "stage3", mesh, tokenizer.vocab_size)
    source = from_config.stage_source(config, "stage3", data)
    iterator = iter(stage.dataset(source, tokenizer, stage.skip_log(source, Path(out + ".skip"))))
    manager = checkpoint.make_manager(trainer.checkpoint_dir(config, "stage3"))
    state = stage.initial_state(manager, iterator)
    kernel = state["params"]["decoder"]["scan_0"]["block_0"]["moe"]["experts"]["wi_up"]["kernel"]
    assert len(kernel.sharding.device_set) == jax.device_count(), kernel.sharding
    leaves = jax.tree.leaves(jax.device_get({"params": state["params"],
                                             "opt_state": state["opt_state"]}))
    batch = next(iterator)
    np.savez(out, *[np.asarray(x) for x in leaves if hasattr(x, "shape")], index=batch["index"])
""")


def test_checkpoint_restores_exactly_onto_a_smaller_mesh(runs, tmp_path):
    """Saved on 8 devices (data 2 x expert 4), restored on 8 and on 4 (data 1 x expert 4):
    params, optimizer state and the next batch of data are identical."""
    data_root, single, _ = runs
    restored = {}
    for devices, data_axis in ((8, 2), (4, 1)):
        out = tmp_path / f"on{devices}.npz"
        subprocess.run(
            [sys.executable, "-c", RESTORE, str(single), str(data_root), str(data_axis), str(out)],
            cwd=ROOT,
            env=env_with_devices(devices),
            check=True,
            capture_output=True,
        )
        restored[devices] = np.load(out)
    assert restored[8].files == restored[4].files and len(restored[8].files) > 10
    for name in restored[8].files:
        np.testing.assert_array_equal(restored[8][name], restored[4][name])
