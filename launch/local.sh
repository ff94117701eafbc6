#!/usr/bin/env bash
# The three MoE-Tuning stages on this machine, one process per stage (each resumable), then
# POPE after stages 2 and 3. Extra flags go to every stage, e.g.
#   launch/local.sh --config.workdir=workdir/run2 --config.model.moe.num_experts=8
# --dry-run prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
for stage in stage1 stage2 stage3; do
  run python -m moe_llava_jax.train --config="configs/${stage}.py" "$@"
done
