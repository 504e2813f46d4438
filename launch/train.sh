#!/usr/bin/env bash
# Start training on every worker: python -m lavida_jax.main in the background (nohup),
# one log per worker in ~/lavida-logs/RUN.<hostname>.log and its pid in
# ~/lavida-logs/RUN.pid. Every --config.* flag is passed through; with --num-slices=N > 1
# it adds --config.dcn_mesh=N,1,1 (data parallelism across the slices).
# Flags: launch/common.sh, plus
#   --workdir=gs://BUCKET/PATH   checkpoints and metrics (LAVIDA_WORKDIR; required)
#   --config=FILE[:ARGS]         default: the slice's config, e.g. configs/tpu_v4_64.py
#   --run=NAME                   log/pid name (default: the workdir's last part)
#   --env=KEY=VALUE              environment for the job (repeatable), e.g. LIBTPU_INIT_ARGS=...
#   --config.KEY=VALUE           any config override (repeatable)
# Example:
#   launch/train.sh --name=lavida-v4 --zone=us-central2-b --workdir=gs://my-bucket/lavida/run1 \
#     --config=configs/tpu_v4_64.py:model=lavida-llada,stage=2 --config.train.steps=20000 --dry-run
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

parse_common "$@"
WORKDIR=${LAVIDA_WORKDIR:-}
RUN=""
OVERRIDES=()
ENVS=()
for arg in "${REST[@]}"; do
  case $arg in
    --workdir=*) WORKDIR=${arg#*=} ;;
    --config=*) CONFIG=${arg#*=} ;;
    --run=*) RUN=${arg#*=} ;;
    --env=*=*) ENVS+=("${arg#--env=}") ;;
    --config.*=*) OVERRIDES+=("$arg") ;;
    *) die "unknown flag '$arg' (see --help)" ;;
  esac
done
[[ $WORKDIR == gs://?* ]] || die "--workdir must be a gs:// bucket path (every worker writes there), got '$WORKDIR'"
RUN=${RUN:-$(basename "$WORKDIR")}
[[ $RUN =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run '$RUN' must be letters, digits, '.', '_' or '-'"

job="\$HOME/$VENV/bin/python -m lavida_jax.main $(quote "--config=$CONFIG") $(quote "--workdir=$WORKDIR") --distributed"
# Several slices: the data axis spans them (a hybrid ICI x DCN mesh), unless the caller
# lays them out differently with their own --config.dcn_mesh.
if ((NUM_SLICES > 1)) && [[ " ${OVERRIDES[*]-} " != *" --config.dcn_mesh="* ]]; then
  job+=" --config.dcn_mesh=$NUM_SLICES,1,1"
fi
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  job+=" $(quote "$override")"
done
if ((${#ENVS[@]})); then
  prefix="env"
  for kv in "${ENVS[@]}"; do
    prefix+=" $(quote "$kv")"
  done
  job="$prefix $job"
fi
# $HOME and $(hostname) are the worker's: they stay unexpanded here. Only the job runs
# in the background (with all three standard streams redirected, so ssh returns) and
# $! is its pid.
# shellcheck disable=SC2016
log='$HOME/'"$LOGS/$RUN"'.$(hostname).log'
# shellcheck disable=SC2016
command='set -e; cd $HOME; mkdir -p '"$LOGS; cd $REMOTE_DIR; nohup $job > $log 2>&1 < /dev/null & echo \$! > \$HOME/$LOGS/$RUN.pid"
on_workers all "$command"
