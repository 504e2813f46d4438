#!/usr/bin/env bash
# Run one shell command on every worker (or one), e.g. to copy data from the bucket to
# each worker's disk or to check the devices. Flags: launch/common.sh, plus
#   --worker=all|N      default all
#   --command=COMMAND   the command (required)
# Example:
#   launch/ssh.sh --name=lavida-v4 --zone=us-central2-b --dry-run \
#     --command='gcloud storage cp -r gs://my-bucket/lavida/data $HOME/data'
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

parse_common "$@"
WORKER=all
COMMAND=""
for arg in "${REST[@]}"; do
  case $arg in
    --worker=*) WORKER=${arg#*=} ;;
    --command=*) COMMAND=${arg#*=} ;;
    *) die "unknown flag '$arg' (see --help)" ;;
  esac
done
[[ -n $COMMAND ]] || die "--command is required"
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be 'all' or a number"
on_workers "$WORKER" "$COMMAND"
