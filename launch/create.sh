#!/usr/bin/env bash
# Create the TPU: a TPU VM slice, or a queued resource (--queued; always for
# multi-slice, --num-slices=N > 1). Flags: launch/common.sh, plus
#   --spot | --reserved   capacity type (queued resources; a TPU VM takes --spot too)
#   --runtime=VERSION     TPU software version (default: the slice's JAX image)
# Example:
#   launch/create.sh --name=lavida-v4 --zone=us-central2-b --slice=v4-64 --dry-run
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

parse_common "$@"
CAPACITY=()
for arg in "${REST[@]}"; do
  case $arg in
    --spot) CAPACITY+=(--spot) ;;
    --reserved) CAPACITY+=(--reserved) ;;
    --runtime=*) RUNTIME=${arg#*=} ;;
    *) die "unknown flag '$arg' (see --help)" ;;
  esac
done
project=$(project_flag)

if ((QUEUED)); then
  if ((NUM_SLICES > 1)); then
    nodes=("--node-count=$NUM_SLICES" "--node-prefix=$NAME")
  else
    nodes=("--node-id=$NAME")
  fi
  run gcloud compute tpus queued-resources create "$NAME" "--zone=$ZONE" ${project:+"$project"} \
    "--accelerator-type=$ACCELERATOR" "--runtime-version=$RUNTIME" "${nodes[@]}" \
    ${CAPACITY[@]+"${CAPACITY[@]}"}
  echo "# queued: watch it become ACTIVE with" >&2
  echo "#   gcloud compute tpus queued-resources describe $NAME --zone=$ZONE" >&2
else
  run gcloud compute tpus tpu-vm create "$NAME" "--zone=$ZONE" ${project:+"$project"} \
    "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME" ${CAPACITY[@]+"${CAPACITY[@]}"}
fi
