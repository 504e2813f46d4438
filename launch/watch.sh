#!/usr/bin/env bash
# Watch a run: follow worker 0's log (default), or --status: the TPU's state and, on
# every worker, whether the job is running plus its last log lines; --metrics: the
# last lines of WORKDIR/metrics.jsonl.
# Flags: launch/common.sh, plus
#   --run=NAME          the run (as train.sh named it; LAVIDA_RUN)
#   --worker=N          whose log to follow (default 0)
#   --status | --metrics
#   --workdir=gs://...  with --metrics (LAVIDA_WORKDIR)
# Example:
#   launch/watch.sh --name=lavida-v4 --zone=us-central2-b --run=run1 --status --dry-run
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

parse_common "$@"
RUN=${LAVIDA_RUN:-}
WORKER=0
MODE=follow
WORKDIR=${LAVIDA_WORKDIR:-}
for arg in "${REST[@]}"; do
  case $arg in
    --run=*) RUN=${arg#*=} ;;
    --worker=*) WORKER=${arg#*=} ;;
    --status) MODE=status ;;
    --metrics) MODE=metrics ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    *) die "unknown flag '$arg' (see --help)" ;;
  esac
done
if [[ $MODE == metrics ]]; then
  [[ $WORKDIR == gs://?* ]] || die "--metrics needs --workdir=gs://..."
  run gcloud storage cat "${WORKDIR%/}/metrics.jsonl"
  exit 0
fi
[[ $RUN =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run (or LAVIDA_RUN) is required: the name train.sh gave the run"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a number"
project=$(project_flag)

if [[ $MODE == follow ]]; then
  on_workers "$WORKER" "tail -n 50 -F \$HOME/$LOGS/$RUN.*.log"
  exit 0
fi
if ((QUEUED)); then
  run gcloud compute tpus queued-resources describe "$NAME" "--zone=$ZONE" ${project:+"$project"} \
    '--format=value(state.state)'
else
  run gcloud compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" ${project:+"$project"} \
    '--format=value(state,health)'
fi
# shellcheck disable=SC2016
status='pid=$(cat $HOME/'"$LOGS/$RUN"'.pid 2>/dev/null || true); if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$(hostname): running, pid $pid"; else echo "$(hostname): not running"; fi; tail -n 2 $HOME/'"$LOGS/$RUN"'.*.log 2>/dev/null || true'
on_workers all "$status"
