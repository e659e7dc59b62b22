#!/usr/bin/env bash
# Installs neo-jax into a virtual environment for one accelerator platform.
#
# The versions pinned in requirements.txt are used as constraints (without the conversion and
# test extras such as torch), and jax gets the plugin of the platform at the same version as
# the pinned jax[cpu]. tpu_pod.sh runs this on every TPU worker; on a GPU cluster run it once
# on the shared file system before submitting gpu_slurm.sbatch.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/install.sh [--dry-run] [--venv DIR] [--python PYTHON] PLATFORM

  PLATFORM      tpu | cuda12 | cuda13 | cpu: the jax extra to install
  --venv DIR    virtual environment to create or update (default: .venv in the repository)
  --python PY   interpreter that creates it (default: python3; needs 3.11+)
  --dry-run     print the commands instead of running them
EOF
}

DRY_RUN=0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON=python3
PLATFORM=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --venv) VENV="$2"; shift ;;
    --python) PYTHON="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) PLATFORM="$1" ;;
  esac
  shift
done
case "$PLATFORM" in
  tpu|cuda12|cuda13|cpu) ;;
  "") echo "install.sh: name a platform" >&2; usage >&2; exit 2 ;;
  *) echo "install.sh: unknown platform '$PLATFORM'" >&2; usage >&2; exit 2 ;;
esac

run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

JAX_VERSION="$(sed -n 's/^jax\[[a-z0-9]*\]==\([^ ]*\).*/\1/p' "$ROOT/requirements.txt")"
if [[ -z $JAX_VERSION ]]; then
  echo "install.sh: no pinned jax in $ROOT/requirements.txt" >&2
  exit 1
fi
# pip constraints may not carry extras: jax[cpu]==X -> jax==X
CONSTRAINTS="$VENV/constraints.txt"
run "$PYTHON" -m venv "$VENV"
if [[ $DRY_RUN == 1 ]]; then
  echo "+ sed 's/\\[[^]]*\\]//' $ROOT/requirements.txt > $CONSTRAINTS"
else
  sed 's/\[[^]]*\]//' "$ROOT/requirements.txt" > "$CONSTRAINTS"
fi
run "$VENV/bin/pip" install -q --upgrade pip
# TPU runs write their run directory to gs:// (gcsfs, the `gcs` extra)
EXTRA=""
[[ $PLATFORM == tpu ]] && EXTRA="[gcs]"
run "$VENV/bin/pip" install -q -c "$CONSTRAINTS" "jax[$PLATFORM]==$JAX_VERSION" -e "$ROOT$EXTRA"
