# shellcheck shell=bash disable=SC2034  # (the variables are for the scripts that source it)
# Shared by the launch/ scripts (sourced, not run): flags, the slice table, and `run`,
# which executes a command or, with --dry-run, prints it (quoted, copy-pasteable).
#
# Every flag has an environment variable, so a session can export them once:
#   --name=NAME            LAVIDA_TPU_NAME    TPU VM / queued resource name (required)
#   --zone=ZONE            LAVIDA_ZONE        e.g. us-central2-b (v4) (required)
#   --project=PROJECT      LAVIDA_PROJECT     default: gcloud's configured project
#   --slice=SLICE          LAVIDA_SLICE       v4-64 (default) | v5p-128 | v5e-256
#   --num-slices=N         LAVIDA_NUM_SLICES  N > 1: multi-slice (a queued resource)
#   --queued               LAVIDA_QUEUED=1    a queued resource (also for one slice)
#   --dry-run                                 print the commands, run nothing

DRY_RUN=0
NAME=${LAVIDA_TPU_NAME:-}
ZONE=${LAVIDA_ZONE:-}
PROJECT=${LAVIDA_PROJECT:-}
SLICE=${LAVIDA_SLICE:-v4-64}
NUM_SLICES=${LAVIDA_NUM_SLICES:-1}
QUEUED=${LAVIDA_QUEUED:-0}
# On every worker, relative to its home directory.
REMOTE_DIR=lavida-jax
VENV=lavida-venv
LOGS=lavida-logs
REST=()

# usage: the running script's header comment.
usage() {
  sed -n '2,/^set -euo pipefail$/{/^#/p;}' "$0" | sed 's/^# \{0,1\}//'
  echo "Flags of every launch/ script (launch/common.sh):"
  sed -n '/^#   --name=NAME/,/^#   --dry-run/p' "${BASH_SOURCE[0]}" | sed 's/^#//'
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# parse_common "$@": takes the shared flags; everything else is left in REST.
parse_common() {
  local arg
  for arg in "$@"; do
    case $arg in
      --name=*) NAME=${arg#*=} ;;
      --zone=*) ZONE=${arg#*=} ;;
      --project=*) PROJECT=${arg#*=} ;;
      --slice=*) SLICE=${arg#*=} ;;
      --num-slices=*) NUM_SLICES=${arg#*=} ;;
      --queued) QUEUED=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      *) REST+=("$arg") ;;
    esac
  done
  [[ -n $NAME ]] || die "--name (or LAVIDA_TPU_NAME) is required"
  [[ -n $ZONE ]] || die "--zone (or LAVIDA_ZONE) is required"
  [[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$NUM_SLICES'"
  if ((NUM_SLICES > 1)); then
    QUEUED=1 # multi-slice exists only as a queued resource
  fi
  slice_info
}

# slice_info: ACCELERATOR (gcloud's accelerator type), RUNTIME (TPU software version
# for JAX) and CONFIG (the training config) of SLICE.
slice_info() {
  case $SLICE in
    v4-64) ACCELERATOR=v4-64 RUNTIME=tpu-ubuntu2204-base CONFIG=configs/tpu_v4_64.py ;;
    v5p-128) ACCELERATOR=v5p-128 RUNTIME=v2-alpha-tpuv5 CONFIG=configs/tpu_v5p_128.py ;;
    v5e-256) ACCELERATOR=v5litepod-256 RUNTIME=v2-alpha-tpuv5-lite CONFIG=configs/tpu_v5e_256.py ;;
    *) die "unknown --slice '$SLICE'; expected v4-64, v5p-128 or v5e-256" ;;
  esac
}

# The project flag, when one is given.
project_flag() {
  if [[ -n $PROJECT ]]; then
    printf '%s\n' "--project=$PROJECT"
  fi
}

# quote WORD: WORD as bash reads it back (bare when it is safe, else in single quotes).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD...: runs it, or prints it under --dry-run.
run() {
  if ((DRY_RUN)); then
    local words=() word
    for word in "$@"; do
      words+=("$(quote "$word")")
    done
    echo "${words[*]}"
  else
    "$@"
  fi
}

# on_workers WORKER COMMAND: runs COMMAND (a shell string) over ssh on WORKER: "all"
# (every worker of every slice) or a number (that worker of the first slice).
on_workers() {
  local worker=$1 command=$2 project node=0
  project=$(project_flag)
  if [[ $worker == all ]]; then
    node=all
  fi
  if ((NUM_SLICES > 1)); then
    run gcloud compute tpus queued-resources ssh "$NAME" "--zone=$ZONE" ${project:+"$project"} \
      "--node=$node" "--worker=$worker" "--command=$command"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" ${project:+"$project"} \
      "--worker=$worker" "--command=$command"
  fi
}
