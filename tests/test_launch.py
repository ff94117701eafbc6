"""Launch scripts: what they print with --dry-run and what they run, against fake gcloud/srun.

The fakes are executables put first on PATH: they record their argv (one JSON list a line) and
act out just enough (gcloud describe: "not found" or a state; a failing training ssh).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU_FLAGS = "--tpu pod1 --zone us-west4-a --project proj-1 --workdir /gcs/bkt/run".split()
SCOPE = ["--zone=us-west4-a", "--project=proj-1"]
STEPS = ["describe", "create", "scp", "ssh install", "ssh train", "delete"]  # gcloud, in order
# A flag with a space and a quote: it must reach the trainer as one argument, unchanged.
TRAIN_FLAGS = ["--config.mesh.expert=4", "--config.stage3.data=it's a b.json"]

FAKE = f"""#!{sys.executable}
import json, os, sys, tarfile
argv = sys.argv[1:]
record = {{"argv": argv}}
if "scp" in argv:  # what would be copied: the tarball git archive made
    record["files"] = tarfile.open(argv[argv.index("scp") + 1]).getnames()
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
if "describe" in argv:
    state = os.environ.get("FAKE_TPU_STATE", "")
    if not state:
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: pod1 not found")
    print(state)
if os.environ.get("FAKE_FAIL", "\\0") in " ".join(argv):
    sys.exit(1)
if "show" in argv and "hostnames" in argv:  # scontrol show hostnames NODELIST
    print("gpu001\\ngpu002")
"""


@pytest.fixture
def fakes(tmp_path):
    """PATH with fake gcloud, srun and scontrol; returns (env, read_calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "srun", "scontrol"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "TMPDIR": str(tmp_path),
        "FAKE_LOG": str(log),
    }

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


def bash(script, args, env, check=True):
    result = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # the scripts find the repository themselves
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def tpu(args, env, check=True):
    if not (REPO / ".git").exists():
        pytest.skip("tpu_pod.sh packs the code with git archive: needs a git checkout")
    return bash("tpu_pod.sh", args, env, check)


def commands(stdout):
    """The argv of each `+ ` line."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def subcommand(argv):
    """gcloud's argv `compute tpus tpu-vm SUB ...`: SUB, with ssh told apart by what it runs."""
    sub = argv[3]
    if sub == "ssh":
        return "ssh train" if "moe_llava_jax.train" in remote_command(argv) else "ssh install"
    return sub


def remote_command(argv):
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))


def train_argv(argv):
    """The trainer's argv inside the remote train command (as the remote shell splits it)."""
    words = shlex.split(remote_command(argv).split("&&", 1)[1])
    return words[words.index("moe_llava_jax.train") + 1 :]


# ---------------------------------------------------------------------------- TPU pod


def test_tpu_dry_run_prints_every_step_and_runs_nothing(fakes):
    env, calls = fakes
    out = tpu([*TPU_FLAGS, "--spot", "--dry-run", "--", *TRAIN_FLAGS], env).stdout
    printed = commands(out)
    assert [argv[0] for argv in printed] == ["git"] + ["gcloud"] * 6
    assert printed[0][:2] == ["git", "archive"] and printed[0][-1] == "HEAD"
    gcloud = [argv[1:] for argv in printed[1:]]  # as the fake gcloud records them
    assert [subcommand(a) for a in gcloud] == STEPS
    for argv in gcloud:
        assert argv[:3] == ["compute", "tpus", "tpu-vm"]
        assert argv[4] == "pod1" or argv[4].startswith(env["TMPDIR"])  # scp: SRC first
        assert argv[-2:] == SCOPE
    create = gcloud[1]
    assert "--accelerator-type=v5litepod-16" in create
    assert "--version=v2-alpha-tpuv5-lite" in create and "--spot" in create
    assert "--worker=all" in gcloud[2] and gcloud[2][5] == "pod1:moe_llava_jax.tar.gz"
    for argv in gcloud[3:5]:  # the remote commands are valid shell
        subprocess.run(["bash", "-n", "-c", remote_command(argv)], check=True)
    install = remote_command(gcloud[3])
    assert "requirements.txt 'jax[tpu]'" in install and "python3.11 -m venv" in install
    assert train_argv(gcloud[4]) == [
        "--config=configs/moe_tuning.py",
        "--config.distributed.enabled=True",
        "--config.workdir=/gcs/bkt/run",
        *TRAIN_FLAGS,
    ]
    assert "--worker=all" in gcloud[4] and "--quiet" in gcloud[5]
    assert calls() == []  # nothing ran
    assert not list(Path(env["TMPDIR"]).glob("*.tar.gz"))


def test_tpu_run_creates_copies_installs_trains_deletes(fakes):
    env, calls = fakes
    result = tpu([*TPU_FLAGS, "--", *TRAIN_FLAGS], env)
    ran = calls()
    assert [subcommand(c["argv"]) for c in ran] == STEPS
    assert all(c["argv"][-2:] == SCOPE for c in ran)
    assert "moe_llava_jax/train.py" in ran[2]["files"]  # a real archive of the repository
    assert train_argv(ran[4]["argv"])[-2:] == TRAIN_FLAGS
    # the printed commands are exactly the ones run (the describe probe is printed, then run)
    assert [argv for argv in commands(result.stdout) if argv[0] == "gcloud"] == [
        ["gcloud", *c["argv"]] for c in ran
    ]
    assert not list(Path(env["TMPDIR"]).glob("*.tar.gz"))  # the tarball is cleaned up


def test_tpu_keep_skips_delete_and_existing_tpu_skips_create(fakes):
    env, calls = fakes
    tpu([*TPU_FLAGS, "--keep"], {**env, "FAKE_TPU_STATE": "READY"})
    assert [subcommand(c["argv"]) for c in calls()] == ["describe", *STEPS[2:-1]]


def test_tpu_preempted_slice_is_recreated(fakes):
    env, calls = fakes
    tpu([*TPU_FLAGS, "--preemptible"], {**env, "FAKE_TPU_STATE": "PREEMPTED"})
    assert [subcommand(c["argv"]) for c in calls()] == ["describe", "delete", *STEPS[1:]]
    assert "--preemptible" in calls()[2]["argv"]


def test_tpu_failed_training_still_deletes_and_fails(fakes):
    env, calls = fakes
    result = tpu(TPU_FLAGS, {**env, "FAKE_FAIL": "moe_llava_jax.train"}, check=False)
    assert result.returncode == 1
    assert [subcommand(c["argv"]) for c in calls()][-2:] == ["ssh train", "delete"]


def test_tpu_busy_slice_is_left_alone(fakes):
    env, calls = fakes
    result = tpu(TPU_FLAGS, {**env, "FAKE_TPU_STATE": "CREATING"}, check=False)
    assert result.returncode == 1 and "pod1 is CREATING" in result.stderr
    assert [subcommand(c["argv"]) for c in calls()] == ["describe"]


@pytest.mark.parametrize(
    "accelerator, version",
    [("v4-32", "tpu-ubuntu2204-base"), ("v5p-16", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")],
)
def test_tpu_software_version_follows_accelerator(fakes, accelerator, version):
    env, _ = fakes
    out = tpu([*TPU_FLAGS, "--accelerator", accelerator, "--dry-run"], env).stdout
    assert f"--accelerator-type={accelerator} --version={version}" in out


def test_tpu_optional_zone_and_project_are_left_to_gcloud(fakes):
    env, _ = fakes
    out = tpu(["--workdir", "/gcs/b/r", "--dry-run"], env).stdout
    assert "--zone" not in out and "--project" not in out
    assert "tpu-vm create moe-llava " in out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--workdir /SHARED/RUN is required"),
        (["--workdir"], "--workdir needs a value"),
        (["--workdir", "/gcs/b/r", "--bogus"], "unknown argument: --bogus"),
        (["--workdir", "/gcs/b/r", "--config", "configs/nope.py"], "not in the HEAD commit"),
        (["--workdir", "gs://b/r"], "give an absolute path every worker sees"),
    ],
)
def test_tpu_bad_arguments_fail_before_any_command(fakes, args, message):
    env, calls = fakes
    result = tpu(["--dry-run", *args], env, check=False)
    assert result.returncode != 0 and message in result.stderr
    assert "+ " not in result.stdout and calls() == []


def test_tpu_help(fakes):
    out = tpu(["--help"], fakes[0]).stdout
    options = "--tpu --zone --project --accelerator --version --config --workdir --spot"
    for option in [*options.split(), "--preemptible", "--keep", "--dry-run", "--python"]:
        assert option in out


# ---------------------------------------------------------------------------- SLURM

SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[001-002]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_GPUS_ON_NODE": "8",
}
PORT = 61440 + 4242 % 4096  # what jax.distributed picks under SLURM


def srun_line(stdout):
    (argv,) = commands(stdout)
    assert argv[0] == "srun"
    return argv


def test_slurm_dry_run_one_process_per_gpu(fakes):
    env, calls = fakes
    out = bash("gpu_slurm.sbatch", ["--dry-run", *TRAIN_FLAGS], {**env, **SLURM_ENV}).stdout
    assert f"coordinator gpu001:{PORT}" in out
    argv = srun_line(out)
    assert argv[1:6] == [
        "--nodes=2",
        "--ntasks=16",
        "--ntasks-per-node=8",
        "--gpu-bind=none",
        "--kill-on-bad-exit=1",
    ]
    assert argv[6:] == [
        "python",
        "-u",
        "-m",
        "moe_llava_jax.train",
        "--config=configs/moe_tuning.py",
        "--config.distributed.enabled=True",
        "--config.workdir=workdir/slurm",
        *TRAIN_FLAGS,
    ]
    assert [c["argv"][:2] for c in calls()] == [["show", "hostnames"]]  # only scontrol ran


def test_slurm_one_process_per_node_explicit_coordinator(fakes):
    env, _ = fakes
    settings = {
        "PROCS_PER": "node",
        "DISCOVERY": "explicit",
        "CONFIG": "configs/stage3.py",
        "WORKDIR": "/shared/run 1",
        "SLURM_GPUS_ON_NODE": "",
        "SLURM_GPUS_PER_NODE": "h100:4",
    }
    out = bash("gpu_slurm.sbatch", ["--dry-run"], {**env, **SLURM_ENV, **settings}).stdout
    argv = srun_line(out)
    assert argv[1:4] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert argv[6:8] == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
    assert argv[-5:] == [
        "--config=configs/stage3.py",
        "--config.distributed.enabled=True",
        "--config.workdir=/shared/run 1",
        f"--config.distributed.coordinator_address=gpu001:{PORT}",
        "--config.distributed.num_processes=2",
    ]


def test_slurm_run_calls_srun_with_the_printed_command(fakes):
    env, calls = fakes
    result = bash("gpu_slurm.sbatch", TRAIN_FLAGS, {**env, **SLURM_ENV, "COORDINATOR_PORT": "1234"})
    assert "coordinator gpu001:1234" in result.stdout
    srun = [c["argv"] for c in calls() if c["argv"][0] != "show"]
    assert [["srun", *argv] for argv in srun] == [srun_line(result.stdout)]


def test_slurm_header_one_task_per_gpu():
    header = dict(
        re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", (LAUNCH / "gpu_slurm.sbatch").read_text(), re.M)
    )
    assert header["ntasks-per-node"] == header["gpus-per-node"]
    assert {"nodes", "time", "output"} <= header.keys()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"SLURM_JOB_ID": ""}, "not in a SLURM job"),
        ({"PROCS_PER": "rank"}, "PROCS_PER=rank: gpu or node"),
        ({"DISCOVERY": "mpi"}, "DISCOVERY=mpi: auto or explicit"),
        ({"SLURM_GPUS_ON_NODE": ""}, "GPUs per node unknown"),
        ({"CONFIG": "configs/nope.py"}, "configs/nope.py not found"),
    ],
)
def test_slurm_bad_settings_fail(fakes, settings, message):
    env, calls = fakes
    result = bash("gpu_slurm.sbatch", ["--dry-run"], {**env, **SLURM_ENV, **settings}, check=False)
    assert result.returncode != 0 and message in result.stderr
    assert "+ " not in result.stdout


# ---------------------------------------------------------------------------- local


def test_local_dry_run_prints_the_three_stages(fakes):
    out = bash("local.sh", ["--dry-run", *TRAIN_FLAGS], fakes[0]).stdout
    assert commands(out) == [
        ["python", "-m", "moe_llava_jax.train", f"--config=configs/stage{i}.py", *TRAIN_FLAGS]
        for i in (1, 2, 3)
    ]


# ---------------------------------------------------------------------------- all


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_slurm.sbatch", "local.sh", "common.sh"])
def test_scripts_parse_and_pass_shellcheck(script):
    path = LAUNCH / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    result = subprocess.run(
        ["shellcheck", "-x", "-s", "bash", str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_common_quote_round_trips(tmp_path):
    words = ["plain", "a b", "it's", "", "$HOME", "~/x", "jax[tpu]", "--c=x y"]
    script = f'source {LAUNCH / "common.sh"}; quote "$@"'
    out = subprocess.run(
        ["bash", "-c", script, "bash", *words], capture_output=True, text=True, check=True
    ).stdout
    assert shlex.split(out) == words
    assert out.startswith("plain 'a b' ")  # plain words stay unquoted
