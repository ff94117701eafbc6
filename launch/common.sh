# Shell helpers shared by the launch scripts (sourced, not run). Written for bash >= 3.2, the
# /bin/bash of macOS, from where TPU pods are often launched.

DRY_RUN=0 # 1: `run` prints commands without running them

die() {
  echo "error: $*" >&2
  exit 1
}

# The arguments as one shell line, each word quoted only where needed: the line pastes back.
quote() {
  local arg line="" sq="'\\''"
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      line+=" $arg"
    else
      line+=" '${arg//\'/$sq}'"
    fi
  done
  printf '%s\n' "${line# }"
}

# Prints the command as `+ CMD` (like `set -x`).
trace() {
  printf '+ %s\n' "$(quote "$@")"
}

# Prints the command, then runs it unless this is a dry run.
run() {
  trace "$@"
  if [[ $DRY_RUN != 1 ]]; then
    "$@"
  fi
}
