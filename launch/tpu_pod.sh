#!/usr/bin/env bash
# Runs `neo-jax train` on every worker of a Cloud TPU VM slice.
#
# Steps (--steps, in this order):
#   up       reuse the slice if it exists, else create it (directly, or through a queued
#            resource with --queued, waiting until it is ACTIVE)
#   install  ship this checkout (git archive of --ref) to every worker, install it with
#            launch/install.sh tpu, and mount the bucket of --workdir with gcsfuse
#   train    start `neo-jax train` on all workers at once; every worker appends to
#            ~/neo-jax/logs/train.log and the output of all of them streams here
#   logs     follow the train logs of all workers (after --detach, or from another terminal)
#   down     delete the slice (and its queued resource)
# Each worker is one process: neo_jax.parallel finds the slice's workers itself (TPU metadata),
# so no coordinator flags are passed. Checkpoints go to --workdir gs://BUCKET/PATH, seen by
# every worker as the same gcsfuse mount (the run directory must be shared by all processes).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE --workdir gs://BUCKET/PATH [options] [-- ARGS]

Required:
  --name NAME          TPU VM (node) name                                   [$TPU_NAME]
  --zone ZONE          zone, e.g. us-central2-b                             [$TPU_ZONE]
  --workdir gs://B/P   run directory: checkpoints, metrics, config          [$NEO_WORKDIR]
Slice:
  --project ID         project (default: gcloud's configured project)       [$TPU_PROJECT]
  --type TYPE          accelerator type (default v5litepod-16)              [$TPU_TYPE]
  --version VERSION    TPU runtime (default v2-alpha-tpuv5-lite)            [$TPU_VERSION]
  --queued             create through a queued resource and wait for it
  --spot               spot capacity (preemptible; resume by running train again)
Run:
  --config FILE:ARG    training config (default configs/pretrain.py:neo_2b) [$NEO_CONFIG]
  --ref REF            git ref whose files are shipped (default HEAD)
  --steps LIST         comma-separated steps (default up,install,train); also logs, down
  --detach             start training in the background on the workers and return
  --dry-run            print every command instead of running it (no gcloud needed)
  -h, --help           this text
ARGS after -- go to `neo-jax train`, e.g. -- --config.total_steps=1000

Example:
  launch/tpu_pod.sh --name neo-v5e --zone us-west4-a --type v5litepod-16 --queued --spot \
    --workdir gs://my-bucket/neo/2b_pretrain -- --config.total_steps=20000
EOF
}

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
TYPE="${TPU_TYPE:-v5litepod-16}"
VERSION="${TPU_VERSION:-v2-alpha-tpuv5-lite}"
WORKDIR="${NEO_WORKDIR:-}"
CONFIG="${NEO_CONFIG:-configs/pretrain.py:neo_2b}"
REF=HEAD
STEPS="up,install,train"
QUEUED=0
SPOT=0
DETACH=0
DRY_RUN=0
TRAIN_ARGS=()
need() { [[ $# -ge 2 && -n $2 ]] || { echo "tpu_pod.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$@"; NAME="$2"; shift ;;
    --zone) need "$@"; ZONE="$2"; shift ;;
    --project) need "$@"; PROJECT="$2"; shift ;;
    --type) need "$@"; TYPE="$2"; shift ;;
    --version) need "$@"; VERSION="$2"; shift ;;
    --workdir) need "$@"; WORKDIR="$2"; shift ;;
    --config) need "$@"; CONFIG="$2"; shift ;;
    --ref) need "$@"; REF="$2"; shift ;;
    --steps) need "$@"; STEPS="$2"; shift ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --detach) DETACH=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
[[ -n $NAME ]] || die "--name is required"
[[ -n $ZONE ]] || die "--zone is required"
IFS=, read -r -a STEP_LIST <<< "$STEPS"
for step in "${STEP_LIST[@]}"; do
  case "$step" in up|install|train|logs|down) ;; *) die "unknown step '$step'" ;; esac
done
if [[ ",$STEPS," == *,install,* || ",$STEPS," == *,train,* ]]; then
  [[ $WORKDIR =~ ^gs://([^/]+)(/(.*))?$ ]] || die "--workdir must be gs://BUCKET/PATH"
fi
BUCKET="${BASH_REMATCH[1]:-}"
RUN_PATH="${BASH_REMATCH[3]:-}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QR_ID="$NAME-qr"
# where each worker sees gs://BUCKET: the same path on all of them
MOUNT="/tmp/gcs/$BUCKET"
REMOTE_DIR="neo-jax"  # relative to the worker's home
LOG="$REMOTE_DIR/logs/train.log"

GCLOUD_TPU=(gcloud compute tpus)
LOCATION=(--zone="$ZONE")
[[ -n $PROJECT ]] && LOCATION+=(--project="$PROJECT")

# run CMD...: execute, or print it shell-quoted under --dry-run
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
on_all_workers() {  # on_all_workers 'remote shell command'
  if [[ $DRY_RUN == 1 ]]; then  # the remote script as it would run, not as one quoted word
    printf '+ %s tpu-vm ssh %q' "${GCLOUD_TPU[*]}" "$NAME"
    printf ' %q' "${LOCATION[@]}"
    printf ' --worker=all --command=<<REMOTE\n%s\nREMOTE\n' "$1"
  else
    "${GCLOUD_TPU[@]}" tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$1"
  fi
}
# each streamed line names its worker; the log files on the workers stay as written
# shellcheck disable=SC2016  # $(hostname) runs on the worker
PREFIX='sed -u "s/^/[$(hostname)] /"'

quote_all() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "${out# }"; }

step_up() {
  if [[ $DRY_RUN == 0 ]] && "${GCLOUD_TPU[@]}" tpu-vm describe "$NAME" "${LOCATION[@]}" \
      --format='value(state)' > /dev/null 2>&1; then
    echo "tpu_pod.sh: reusing TPU VM $NAME"
    return
  fi
  [[ $DRY_RUN == 1 ]] && echo "# when '${GCLOUD_TPU[*]} tpu-vm describe $NAME' finds no slice:"
  local capacity=()
  [[ $SPOT == 1 ]] && capacity=(--spot)
  if [[ $QUEUED == 1 ]]; then
    run "${GCLOUD_TPU[@]}" queued-resources create "$QR_ID" "${LOCATION[@]}" --node-id="$NAME" \
      --accelerator-type="$TYPE" --runtime-version="$VERSION" "${capacity[@]}"
    echo "# wait until '${GCLOUD_TPU[*]} queued-resources describe $QR_ID' says ACTIVE"
    local state=""
    while [[ $DRY_RUN == 0 && $state != ACTIVE ]]; do
      state="$("${GCLOUD_TPU[@]}" queued-resources describe "$QR_ID" "${LOCATION[@]}" \
        --format='value(state.state)')"
      case "$state" in
        FAILED|SUSPENDED) die "queued resource $QR_ID is $state" ;;
        ACTIVE) ;;
        *) sleep 60 ;;
      esac
    done
  else
    run "${GCLOUD_TPU[@]}" tpu-vm create "$NAME" "${LOCATION[@]}" --accelerator-type="$TYPE" \
      --version="$VERSION" "${capacity[@]}"
  fi
}

step_install() {
  local archive="${TMPDIR:-/tmp}/neo-jax.XXXXXX/neo-jax.tar.gz"
  [[ $DRY_RUN == 1 ]] || archive="$(mktemp -d)/neo-jax.tar.gz"
  run git -C "$REPO" archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$archive" "$REF"
  if [[ $DRY_RUN == 0 && -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]]; then
    echo "tpu_pod.sh: note: uncommitted changes are not shipped (only $REF)" >&2
  fi
  run "${GCLOUD_TPU[@]}" tpu-vm scp "$archive" "$NAME:neo-jax.tar.gz" "${LOCATION[@]}" --worker=all
  # replace the code, keep the venv and the logs; install; mount the bucket where all see it
  on_all_workers "set -euo pipefail
mkdir -p $REMOTE_DIR/logs
find $REMOTE_DIR -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +
tar xzf neo-jax.tar.gz
# neo-jax needs Python 3.11+; the TPU images (Ubuntu 22.04) come with 3.10
PY=\$(command -v python3.12 || command -v python3.11 || true)
if [ -z \"\$PY\" ]; then
  sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv
  PY=python3.11
fi
bash $REMOTE_DIR/launch/install.sh --python \"\$PY\" tpu
if ! command -v gcsfuse > /dev/null; then
  echo 'deb https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -cs)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc > /dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
mkdir -p $MOUNT
mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=200000 $BUCKET $MOUNT"
}

step_train() {
  local cmd
  cmd="cd $REMOTE_DIR && .venv/bin/neo-jax train $(quote_all --config "$CONFIG" \
    "--config.workdir=$MOUNT/$RUN_PATH" "${TRAIN_ARGS[@]}")"
  if [[ $DETACH == 1 ]]; then
    on_all_workers "mkdir -p $REMOTE_DIR/logs && nohup bash -c $(printf '%q' "$cmd") \
>> $LOG 2>&1 < /dev/null & echo started on \$(hostname)"
  else
    on_all_workers "set -o pipefail; mkdir -p $REMOTE_DIR/logs && { $cmd; } 2>&1 | tee -a $LOG | $PREFIX"
  fi
}

step_logs() {
  on_all_workers "tail -n 50 -F $LOG | $PREFIX"
}

step_down() {
  if [[ $QUEUED == 1 ]]; then
    run "${GCLOUD_TPU[@]}" queued-resources delete "$QR_ID" "${LOCATION[@]}" --force --quiet
  else
    run "${GCLOUD_TPU[@]}" tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  fi
}

for step in "${STEP_LIST[@]}"; do
  echo "== $step" >&2
  "step_$step"
done
