#!/usr/bin/env bash
# Install lavida-jax on every worker: clone (or update) the repository into
# ~/lavida-jax, make a Python 3.11 virtual environment ~/lavida-venv, and
# pip install -e '.[tpu]' (jax[tpu] brings libtpu) plus gcsfs (gs:// paths).
# Flags: launch/common.sh, plus
#   --repo=URL     git URL of the code to run (LAVIDA_REPO; required)
#   --ref=REF      branch or tag (LAVIDA_REF; default main)
#   --python=EXE   interpreter for the venv (default python3.11, from apt when absent)
# Example:
#   launch/setup.sh --name=lavida-v4 --zone=us-central2-b --repo=https://github.com/ORG/lavida-jax.git --dry-run
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"

parse_common "$@"
REPO=${LAVIDA_REPO:-}
REF=${LAVIDA_REF:-main}
PYTHON=python3.11
for arg in "${REST[@]}"; do
  case $arg in
    --repo=*) REPO=${arg#*=} ;;
    --ref=*) REF=${arg#*=} ;;
    --python=*) PYTHON=${arg#*=} ;;
    *) die "unknown flag '$arg' (see --help)" ;;
  esac
done
[[ -n $REPO ]] || die "--repo (or LAVIDA_REPO) is required: the git URL of the code to install"

repo=$(quote "$REPO")
ref=$(quote "$REF")
py=$(quote "$PYTHON")
command="set -e; cd \$HOME"
command+="; command -v $py >/dev/null || { sudo apt-get update -q && sudo apt-get install -yq $py $py-venv; }"
command+="; if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q --depth 1 origin $ref"
command+=" && git -C $REMOTE_DIR checkout -q --force FETCH_HEAD"
command+="; else git clone -q --depth 1 --branch $ref $repo $REMOTE_DIR; fi"
command+="; [ -x $VENV/bin/python ] || $py -m venv $VENV"
command+="; $VENV/bin/pip install -q --upgrade pip"
command+="; $VENV/bin/pip install -q -e './${REMOTE_DIR}[tpu]' gcsfs"
command+="; $VENV/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
on_workers all "$command"
