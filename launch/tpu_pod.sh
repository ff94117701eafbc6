#!/usr/bin/env bash
# MoE-Tuning on a Cloud TPU VM slice: every worker runs the same trainer command, joined by
# jax.distributed. `launch/tpu_pod.sh --help` for the steps and options; README "Run on a TPU pod".
set -euo pipefail
cd "$(dirname "$0")/.." || exit
# shellcheck source=launch/common.sh
source launch/common.sh

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --workdir /SHARED/RUN [options] [-- TRAIN_FLAGS...]

Runs MoE-Tuning on a Cloud TPU VM slice, one trainer process per worker (TPU VM host):
  1. packs the repository's HEAD commit (git archive; uncommitted changes stay here)
  2. creates the slice unless it exists (one PREEMPTED or TERMINATED is deleted and recreated)
  3. copies the code to every worker (~/moe_llava_jax, replaced on each run)
  4. installs Python, requirements.txt and jax[tpu] on every worker (~/moe_llava_jax_venv)
  5. runs `python -m moe_llava_jax.train --config.distributed.enabled=True ...` on every
     worker, streaming their output here
  6. deletes the slice, also after a failure or Ctrl-C, unless --keep
Checkpoints and logs go to --workdir. After a preemption, re-run the same command: the slice
is recreated and every stage resumes from its latest checkpoint in --workdir.

Options (default):
  --workdir DIR          run directory, one POSIX folder all workers share: a GCS bucket
                         mounted with gcsfuse, or Filestore/NFS (required)
  --tpu NAME             TPU VM name (moe-llava)
  --zone ZONE            zone (gcloud's compute/zone property)
  --project PROJECT      project (gcloud's core/project property)
  --accelerator TYPE     slice type: v5litepod-16, v4-32, v5p-32, v6e-16, ... (v5litepod-16)
  --version VERSION      TPU software version (from TYPE: v2-alpha-tpuv5-lite for v5litepod,
                         v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e, else
                         tpu-ubuntu2204-base)
  --config FILE[:ARGS]   training config, relative to the repository (configs/moe_tuning.py)
  --python BIN           Python on the workers, apt-installed with BIN-venv if missing
                         (python3.11; the TPU images' Ubuntu 22.04 has 3.10, jax needs 3.11)
  --spot, --preemptible  cheaper capacity that can be taken away (on-demand)
  --keep                 leave the slice running at the end (re-runs reuse it)
  --dry-run              print the commands without running anything (as if the slice
                         did not exist)
  -h, --help             this text
Flags after -- go to the trainer, e.g. -- --config.mesh.expert=4 --config.stage3.num_steps=900
EOF
}

TPU=moe-llava
ZONE=""
PROJECT=""
ACCELERATOR=v5litepod-16
VERSION=""
CONFIG=configs/moe_tuning.py
WORKDIR=""
PYTHON=python3.11
CAPACITY="" # --spot | --preemptible
KEEP=0
TEARDOWN=0 # 1 once the slice exists: delete it at exit
TARBALL="${TMPDIR:-/tmp}/moe_llava_jax-$$.tar.gz"
# On the workers, where ~ expands.
readonly REMOTE_TARBALL=moe_llava_jax.tar.gz # in the home directory
# shellcheck disable=SC2088
readonly REMOTE_REPO='~/moe_llava_jax'
# shellcheck disable=SC2088
readonly REMOTE_VENV='~/moe_llava_jax_venv'

# The value of option $1 (its next argument).
value() {
  (($# >= 2)) || die "$1 needs a value"
  printf '%s\n' "$2"
}

default_version() {
  case $1 in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# `gcloud compute tpus tpu-vm ARGS...` in --zone / --project when given, through RUNNER:
# run (print and run), trace (print only) or command (run only).
tpu_vm() {
  local runner=$1
  shift
  "$runner" gcloud compute tpus tpu-vm "$@" ${ZONE:+"--zone=$ZONE"} ${PROJECT:+"--project=$PROJECT"}
}

create_tpu() {
  tpu_vm run create "$TPU" --accelerator-type="$ACCELERATOR" --version="$VERSION" \
    ${CAPACITY:+"$CAPACITY"}
}

# Makes sure the slice exists and is READY, creating it if needed.
ensure_tpu() {
  local state=""
  tpu_vm trace describe "$TPU" --format='value(state)'
  if [[ $DRY_RUN == 1 ]]; then
    echo "# dry run: as if $TPU did not exist"
  else
    state=$(tpu_vm command describe "$TPU" --format='value(state)' 2>/dev/null) || state=""
  fi
  case $state in
    "") create_tpu ;;
    READY) echo "$TPU exists and is READY: using it" ;;
    PREEMPTED | TERMINATED)
      echo "$TPU is $state: recreating it (a spot or preemptible slice cannot be restarted)"
      tpu_vm run delete "$TPU" --quiet
      create_tpu
      ;;
    *) die "$TPU is $state: wait until it is READY, or delete it" ;;
  esac
}

# Remote command: unpack the code, make the venv, install the requirements and jax[tpu].
# (One `pip install` for both keeps requirements.txt's pin on jax.)
install_command() {
  local python pip="$REMOTE_VENV/bin/pip" apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -q"
  python=$(quote "$PYTHON")
  apt="$apt update && $apt install -y -o DPkg::Lock::Timeout=600 $python $(quote "$PYTHON-venv")"
  printf '%s; ' \
    "set -euo pipefail" \
    "rm -rf $REMOTE_REPO && mkdir -p $REMOTE_REPO && tar -xzf $REMOTE_TARBALL -C $REMOTE_REPO" \
    "$python -c 'import ensurepip' 2>/dev/null || { $apt; }" \
    "[ -x $REMOTE_VENV/bin/python ] || $python -m venv $REMOTE_VENV" \
    "$pip install -q -U pip"
  printf '%s\n' "$pip install -q -r $REMOTE_REPO/requirements.txt 'jax[tpu]'"
}

# Remote command: the trainer, with the extra flags $@.
train_command() {
  printf 'cd %s && exec %s/bin/python -u -m moe_llava_jax.train %s\n' \
    "$REMOTE_REPO" "$REMOTE_VENV" "$(quote --config="$CONFIG" --config.distributed.enabled=True \
      --config.workdir="$WORKDIR" "$@")"
}

on_exit() {
  local rc=$?
  rm -f "$TARBALL"
  if [[ $TEARDOWN == 1 ]]; then
    tpu_vm run delete "$TPU" --quiet || echo "warning: could not delete $TPU: delete it by hand" >&2
  fi
  exit "$rc"
}

main() {
  while (($#)); do
    case $1 in
      --workdir) WORKDIR=$(value "$@"); shift ;;
      --tpu) TPU=$(value "$@"); shift ;;
      --zone) ZONE=$(value "$@"); shift ;;
      --project) PROJECT=$(value "$@"); shift ;;
      --accelerator) ACCELERATOR=$(value "$@"); shift ;;
      --version) VERSION=$(value "$@"); shift ;;
      --config) CONFIG=$(value "$@"); shift ;;
      --python) PYTHON=$(value "$@"); shift ;;
      --spot | --preemptible) CAPACITY=$1 ;;
      --keep) KEEP=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage && exit 0 ;;
      --) shift && break ;;
      *) usage >&2 && die "unknown argument: $1" ;;
    esac
    shift
  done
  [[ -n $WORKDIR ]] || die "--workdir /SHARED/RUN is required (see --help)"
  [[ $WORKDIR == /* ]] ||
    die "--workdir $WORKDIR: give an absolute path every worker sees (mount gs:// buckets with gcsfuse)"
  VERSION=${VERSION:-$(default_version "$ACCELERATOR")}
  git cat-file -e "HEAD:${CONFIG%%:*}" 2>/dev/null ||
    die "${CONFIG%%:*} is not in the HEAD commit, which is what the workers get"
  git diff --quiet HEAD -- ||
    echo "warning: uncommitted changes stay here; the workers get HEAD, $(git log -1 --oneline)" >&2

  trap on_exit EXIT
  run git archive --format=tar.gz --output="$TARBALL" HEAD
  ensure_tpu
  if [[ $KEEP != 1 ]]; then TEARDOWN=1; fi
  tpu_vm run scp "$TARBALL" "$TPU:$REMOTE_TARBALL" --worker=all
  tpu_vm run ssh "$TPU" --worker=all --command="$(install_command)"
  tpu_vm run ssh "$TPU" --worker=all --command="$(train_command "$@")"
}

main "$@"
