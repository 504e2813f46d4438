#!/usr/bin/env bash
# Stop a run: SIGTERM to the job on every worker. Training saves a checkpoint at the
# step every process agrees on and exits 0 (the preemption path); train.sh with the
# same --workdir resumes from it. Waits up to --wait seconds for the job to end.
# Flags: launch/common.sh, plus
#   --run=NAME    the run (as train.sh named it; LAVIDA_RUN)
#   --wait=SEC    default 600
# Example:
#   launch/stop.sh --name=lavida-v4 --zone=us-central2-b --run=run1 --dry-run
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

parse_common "$@"
RUN=${LAVIDA_RUN:-}
WAIT=600
for arg in "${REST[@]}"; do
  case $arg in
    --run=*) RUN=${arg#*=} ;;
    --wait=*) WAIT=${arg#*=} ;;
    *) die "unknown flag '$arg' (see --help)" ;;
  esac
done
[[ $RUN =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run (or LAVIDA_RUN) is required: the name train.sh gave the run"
[[ $WAIT =~ ^[0-9]+$ ]] || die "--wait must be a number of seconds"

# shellcheck disable=SC2016
command='pid=$(cat $HOME/'"$LOGS/$RUN"'.pid 2>/dev/null || true); if [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; then for _ in $(seq '"$WAIT"'); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done; if kill -0 "$pid" 2>/dev/null; then echo "$(hostname): still running after '"$WAIT"' s"; exit 1; fi; echo "$(hostname): stopped"; else echo "$(hostname): not running"; fi'
on_workers all "$command"
