"""Preemption and crashes, with the trainer as a separate process: kill -9 at three points and
restart with the same command → the same log as an uninterrupted run; SIGTERM → checkpoint at
the current step and exit 0; a torn save is ignored on restart."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_llava_jax import trainer
from moe_llava_jax.data import from_config
from tests import micro_config as micro

STEPS = 12
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    from_config.prepare_data(micro.get_config(f"data_root={root}"))
    return root


def command(workdir: Path, data_root: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "moe_llava_jax.train",
        f"--config=tests/micro_config.py:workdir={workdir},data_root={data_root}",
        f"--config.stage1.num_steps={STEPS}",
        "--config.stage1.checkpoint_every=1",
    ]


def metrics(workdir: Path) -> list[dict]:
    path = workdir / "stage1" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def logged_steps(workdir: Path) -> int:
    """The last step in metrics.jsonl (0 before the first), tolerating a half-written line."""
    path = workdir / "stage1" / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return max(steps)


def run_to_end(workdir: Path, data_root: Path) -> None:
    subprocess.run(command(workdir, data_root), cwd=ROOT, check=True, capture_output=True)


def start_and_signal(workdir: Path, data_root: Path, at_step: int, sig: int) -> int:
    """Starts training, sends `sig` once step `at_step` is logged, returns the exit code."""
    process = subprocess.Popen(
        command(workdir, data_root), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while logged_steps(workdir) < at_step:
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early: {process.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("trainer too slow")
        time.sleep(0.02)
    process.send_signal(sig)
    process.wait(timeout=300)
    return process.returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_data):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(workdir, shared_data)
    return metrics(workdir)


@pytest.mark.parametrize(
    "kill_at", [2, pytest.param(6, marks=pytest.mark.slow), pytest.param(10, marks=pytest.mark.slow)]
)
def test_kill_9_then_restart_gives_the_uninterrupted_log(
    tmp_path, shared_data, uninterrupted, kill_at
):
    assert start_and_signal(tmp_path, shared_data, kill_at, signal.SIGKILL) == -signal.SIGKILL
    assert logged_steps(tmp_path) < STEPS  # killed mid-run
    run_to_end(tmp_path, shared_data)
    assert metrics(tmp_path) == uninterrupted  # same steps, same losses, bit for bit


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_0(tmp_path, shared_data, uninterrupted):
    assert start_and_signal(tmp_path, shared_data, 4, signal.SIGTERM) == 0
    stopped_at = logged_steps(tmp_path)
    assert 4 <= stopped_at < STEPS
    checkpoints = trainer.checkpoint_dir(micro.get_config(f"workdir={tmp_path}"), "stage1")
    assert max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == stopped_at
    run_to_end(tmp_path, shared_data)
    assert metrics(tmp_path) == uninterrupted


@pytest.mark.slow
def test_a_torn_save_is_ignored_on_restart(tmp_path, shared_data, uninterrupted):
    """A save killed half-way leaves orbax's temporary folder: the restart resumes from the
    last complete checkpoint and still ends with the uninterrupted log."""
    assert start_and_signal(tmp_path, shared_data, 5, signal.SIGTERM) == 0
    checkpoints = trainer.checkpoint_dir(micro.get_config(f"workdir={tmp_path}"), "stage1")
    last = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    torn = checkpoints / f"{last + 1}.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(checkpoints / str(last), torn)
    shutil.rmtree(torn / "params")  # half of it never written
    run_to_end(tmp_path, shared_data)
    assert metrics(tmp_path) == uninterrupted
