#!/usr/bin/env bash
# Delete the TPU (a queued resource with --queued or --num-slices > 1: its nodes too).
# Checkpoints and metrics stay in the bucket. Flags: launch/common.sh.
# Example:
#   launch/delete.sh --name=lavida-v4 --zone=us-central2-b --dry-run
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

parse_common "$@"
((${#REST[@]} == 0)) || die "unknown flag '${REST[0]}' (see --help)"
project=$(project_flag)
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$NAME" "--zone=$ZONE" ${project:+"$project"} \
    --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "--zone=$ZONE" ${project:+"$project"} --quiet
fi
