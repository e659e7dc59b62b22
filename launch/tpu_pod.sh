#!/usr/bin/env bash
# Runs `neo-jax train` on every worker of a Cloud TPU VM slice.
#
# Steps (--steps, in this order):
#   up       reuse the slice if it is READY (queued resource: ACTIVE); create it if there is
#            none (directly, or through a queued resource with --queued, waiting until it is
#            ACTIVE); a slice that is PREEMPTED, TERMINATED, STOPPED or FAILED (queued
#            resource: SUSPENDED, SUSPENDING or FAILED) is deleted and created again
#   install  ship this checkout (git archive of --ref) to every worker and install it with
#            launch/install.sh tpu
#   train    start `neo-jax train` on all workers at once; every worker appends to
#            ~/neo-jax/logs/train.log and the output of all of them streams here. When the
#            workers stop with an error, the slice's state decides: preempted, suspended or
#            failed -> up (delete + create) and install again, then train resumes from the
#            newest checkpoint; still READY after a stop by signal (maintenance event, dropped
#            connection) -> train resumes on the same slice; else the script stops. At most
#            --restarts times.
#   logs     follow the train logs of all workers (after --detach, or from another terminal)
#   down     delete the slice (and its queued resource)
# Each worker is one process: neo_jax.parallel finds the slice's workers itself (TPU metadata),
# so no coordinator flags are passed. Checkpoints go to --workdir gs://BUCKET/PATH, written by
# orbax directly (a step counts once its commit marker is written, so a preemption in the
# middle of a save never leaves a step that resume would read).
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
  --spot               spot capacity (preemptible; the train step re-creates and resumes)
Run:
  --config FILE:ARG    training config (default configs/pretrain.py:neo_2b) [$NEO_CONFIG]
  --ref REF            git ref whose files are shipped (default HEAD)
  --steps LIST         comma-separated steps (default up,install,train); also logs, down
  --restarts N         re-creations / resumes after a preemption (default 10)
  --detach             start training in the background on the workers and return
                       (no watching: run the same command again to re-create and resume)
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
RESTARTS=10
# seconds between state queries while a slice or queued resource is being provisioned
POLL_S="${TPU_POLL_S:-30}"
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
    --restarts) need "$@"; RESTARTS="$2"; shift ;;
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
[[ $RESTARTS =~ ^[0-9]+$ ]] || die "--restarts needs a number, not '$RESTARTS'"
IFS=, read -r -a STEP_LIST <<< "$STEPS"
for step in "${STEP_LIST[@]}"; do
  case "$step" in up|install|train|logs|down) ;; *) die "unknown step '$step'" ;; esac
done
if [[ ",$STEPS," == *,install,* || ",$STEPS," == *,train,* ]]; then
  [[ $WORKDIR =~ ^gs://([^/]+)(/(.*))?$ ]] || die "--workdir must be gs://BUCKET/PATH"
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QR_ID="$NAME-qr"
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

# the slice's state: READY, PREEMPTED, ... (queued resource: ACTIVE, SUSPENDED, ...); ABSENT
# when there is none
slice_state() {
  local state
  if [[ $QUEUED == 1 ]]; then
    state="$("${GCLOUD_TPU[@]}" queued-resources describe "$QR_ID" "${LOCATION[@]}" \
      --format='value(state.state)' 2> /dev/null)" || state=ABSENT
  else
    state="$("${GCLOUD_TPU[@]}" tpu-vm describe "$NAME" "${LOCATION[@]}" \
      --format='value(state)' 2> /dev/null)" || state=ABSENT
  fi
  echo "${state:-ABSENT}"
}

# states in which the slice is gone for good: delete it and create it again
dead_state() {
  case "$1" in
    PREEMPTED|TERMINATED|STOPPED|FAILED|SUSPENDED|SUSPENDING) return 0 ;;
    *) return 1 ;;
  esac
}

create_slice() {
  local capacity=()
  [[ $SPOT == 1 ]] && capacity=(--spot)
  if [[ $QUEUED == 1 ]]; then
    run "${GCLOUD_TPU[@]}" queued-resources create "$QR_ID" "${LOCATION[@]}" --node-id="$NAME" \
      --accelerator-type="$TYPE" --runtime-version="$VERSION" "${capacity[@]}"
  else
    run "${GCLOUD_TPU[@]}" tpu-vm create "$NAME" "${LOCATION[@]}" --accelerator-type="$TYPE" \
      --version="$VERSION" "${capacity[@]}"
  fi
}

delete_slice() {
  if [[ $QUEUED == 1 ]]; then  # --force deletes the node with its queued resource
    run "${GCLOUD_TPU[@]}" queued-resources delete "$QR_ID" "${LOCATION[@]}" --force --quiet
  else
    run "${GCLOUD_TPU[@]}" tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  fi
}

step_up() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "# when the slice is absent (a dead one is deleted first: delete, then create):"
    create_slice
    if [[ $QUEUED == 1 ]]; then
      echo "# wait until '${GCLOUD_TPU[*]} queued-resources describe $QR_ID' says ACTIVE"
    fi
    return 0
  fi
  local state created=0
  state="$(slice_state)"
  while true; do
    if [[ $state == READY || $state == ACTIVE ]]; then
      echo "tpu_pod.sh: slice $NAME is $state"
      return 0
    elif [[ $state == ABSENT ]]; then
      echo "tpu_pod.sh: no slice $NAME: creating it" >&2
      create_slice
      created=1
    elif dead_state "$state"; then
      [[ $created == 0 ]] || die "slice $NAME is $state right after it was created"
      echo "tpu_pod.sh: slice $NAME is $state: deleting it and creating it again" >&2
      delete_slice
      create_slice
      created=1
    else  # CREATING, WAITING_FOR_RESOURCES, PROVISIONING, ...: wait
      echo "tpu_pod.sh: slice $NAME is $state; waiting" >&2
      sleep "$POLL_S"
    fi
    state="$(slice_state)"
  done
}

step_install() {
  local archive="${TMPDIR:-/tmp}/neo-jax.XXXXXX/neo-jax.tar.gz"
  [[ $DRY_RUN == 1 ]] || archive="$(mktemp -d)/neo-jax.tar.gz"
  run git -C "$REPO" archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$archive" "$REF"
  if [[ $DRY_RUN == 0 && -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]]; then
    echo "tpu_pod.sh: note: uncommitted changes are not shipped (only $REF)" >&2
  fi
  run "${GCLOUD_TPU[@]}" tpu-vm scp "$archive" "$NAME:neo-jax.tar.gz" "${LOCATION[@]}" --worker=all
  # replace the code, keep the venv and the logs; install
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
bash $REMOTE_DIR/launch/install.sh --python \"\$PY\" tpu"
}

# XLA flags of TPU training (libtpu reads LIBTPU_INIT_ARGS), each for overlapping the
# collectives that FSDP and data parallelism add with the matmuls:
#   xla_tpu_enable_async_collective_fusion (+ _fuse_all_gather, _multiple_steps)
#       run the all-gathers of sharded weights as asynchronous fusions that the scheduler
#       can start several steps (layers) ahead, so the next layer's weights arrive while
#       this one computes
#   xla_tpu_overlap_compute_collective_tc
#       let the TensorCore compute while those collectives run
#   xla_enable_async_all_gather / xla_enable_async_all_reduce
#       split the collectives into start/done pairs the latency-hiding scheduler moves apart
#   xla_tpu_enable_data_parallel_all_reduce_opt, xla_tpu_data_parallel_opt_different_sized_ops
#       pipeline the gradient reductions of the data axis (over DCN between slices) across
#       the backward pass instead of one reduction at its end
# LIBTPU_INIT_ARGS set on the workers is appended (a flag given twice: the last one wins).
TPU_XLA_FLAGS="--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true --xla_enable_async_all_reduce=true \
--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true"

step_train() {
  local cmd
  cmd="cd $REMOTE_DIR && LIBTPU_INIT_ARGS=\"$TPU_XLA_FLAGS \${LIBTPU_INIT_ARGS:-}\" \
.venv/bin/neo-jax train $(quote_all --config "$CONFIG" "--config.workdir=$WORKDIR" \
    "${TRAIN_ARGS[@]}")"
  if [[ $DETACH == 1 ]]; then
    on_all_workers "mkdir -p $REMOTE_DIR/logs && nohup bash -c $(printf '%q' "$cmd") \
>> $LOG 2>&1 < /dev/null & echo started on \$(hostname)"
  else
    on_all_workers "set -o pipefail; mkdir -p $REMOTE_DIR/logs && { $cmd; } 2>&1 | tee -a $LOG | $PREFIX"
  fi
}

# train, and after a preemption re-create the slice (or keep it) and resume, --restarts times
step_train_watched() {
  local restarts=0 rc state
  while true; do
    rc=0
    step_train || rc=$?
    [[ $rc == 0 ]] && return 0
    state="$(slice_state)"
    if [[ $state == READY || $state == ACTIVE ]]; then
      # a stop by signal (143 SIGTERM: maintenance event; 129 SIGHUP; 255: ssh lost) on a slice
      # that is still up resumes there; any other failure is the run's own: stop
      case "$rc" in
        129|130|143|255) ;;
        *) die "training failed (exit status $rc) on slice $NAME ($state); not restarting" ;;
      esac
    fi
    (( restarts < RESTARTS )) || die "slice $NAME is $state after $restarts restart(s) (--restarts)"
    restarts=$((restarts + 1))
    echo "tpu_pod.sh: training stopped (exit status $rc), slice $NAME is $state: restart" \
      "$restarts of $RESTARTS, resuming from the newest checkpoint in $WORKDIR" >&2
    if [[ $state != READY && $state != ACTIVE ]]; then
      step_up
      step_install
    fi
  done
}

step_logs() {
  on_all_workers "tail -n 50 -F $LOG | $PREFIX"
}

step_down() {
  delete_slice
}

for step in "${STEP_LIST[@]}"; do
  echo "== $step" >&2
  if [[ $step == train && $DETACH == 0 && $DRY_RUN == 0 ]]; then
    step_train_watched
  else
    "step_$step"
  fi
done
