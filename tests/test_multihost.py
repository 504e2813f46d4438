"""Multi-host training proven on one machine (SPEC §9, §10; issue 6).

Two `python -m lavida_jax.main` processes on localhost (`--coordinator_address`,
4 CPU devices each, gloo collectives) train the tiny demo model on one
('data', 'fsdp', 'tensor') = (1, 8, 1) mesh, and are compared with one process
holding all 8 devices:

  ref   1 process  x 8 devices, steps 1..STEPS: the reference losses
  run   2 processes x 4: one process is SIGKILLed after checkpoint 2 (the other
        then hangs in a collective and is killed too); both restarted: they resume
        from the last complete checkpoint; SIGTERM to one process, then the other:
        every process saves the same step and exits 0
  one   1 process x 8 devices restarted on that 2-process checkpoint: it continues
        from the saved step to STEPS

Every loss logged anywhere equals the reference's at its step, so no step, and no
batch, was lost or repeated. The scenario is one test (its 6 processes are the cost:
one test, so pytest-xdist runs it once); compiles at -O0, with the persistent
compilation cache (process 0 writes it; process 1 always compiles).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
BATCH = 8  # global; 4 rows per process
ARGS = [f"--config.train.steps={STEPS}", f"--config.train.batch_size={BATCH}",
        "--config.data.demo_train=24", "--config.data.demo_heldout=4",
        "--config.data.length=52", "--config.model.image_size=56",
        "--config.eval.num_examples=0", "--config.log_every=1",
        "--config.checkpoint.every=2", "--config.checkpoint.keep=3"]
TIMEOUT = 240  # seconds for any one wait (a hung collective fails the test, not CI)


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(
      JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
      XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                 "--xla_backend_optimization_level=0"),  # 4x faster compiles, same losses
      JAX_COMPILATION_CACHE_DIR=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                             "lavida_jax_jit_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Job:
  """n processes of lavida_jax.main on one workdir (n > 1: a local coordinator)."""

  def __init__(self, workdir, n: int, name: str, args=()):
    self.workdir, self.logs, self.procs = str(workdir), [], []
    port = _free_port()
    for i in range(n):
      dist = ([f"--coordinator_address=localhost:{port}", f"--num_processes={n}",
               f"--process_id={i}"] if n > 1 else [])
      log = os.path.join(os.path.dirname(self.workdir), f"{name}.p{i}.log")
      self.logs.append(log)
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "lavida_jax.main", f"--workdir={self.workdir}", *dist,
             *ARGS, *args], cwd=ROOT, env=_env(8 // n), stdout=f, stderr=subprocess.STDOUT))

  def wait(self, timeout: float = TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(max(1.0, deadline - time.monotonic())) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"processes still running after {timeout} s\n{self.tail()}")

  def signal(self, i: int, sig) -> None:
    if self.procs[i].poll() is None:
      self.procs[i].send_signal(sig)

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
    for p in self.procs:
      p.wait()

  def until(self, what: str, predicate, timeout: float = TIMEOUT) -> None:
    """Polls `predicate()`; fails (with the logs) if a process dies first."""
    deadline = time.monotonic() + timeout
    while not predicate():
      if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
        self.kill()
        raise AssertionError(f"never saw {what}\n{self.tail()}")
      time.sleep(0.05)

  def output(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def tail(self) -> str:
    return "\n".join(f"--- {log}\n" + "".join(open(log).readlines()[-15:]) for log in self.logs)


def _losses(workdir) -> list[tuple[int, float]]:
  """(step, loss) per logged step, in the order written (restarts append)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      if line.endswith("\n"):  # (process 0 may be writing the last one)
        rows.append(json.loads(line))
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _complete(workdir) -> list[int]:
  """Finished checkpoint steps (Orbax renames a step's tmp folder when it is done)."""
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def _demo_data(folder) -> str:
  """The demo set, made once (here) and shared by every run (config.data.demo_root)."""
  import runpy
  from lavida_jax import main
  from lavida_jax.data import demo
  from lavida_jax.data import tfds_builder
  tfds_builder.tfds.display_progress_bar(False)
  cfg = runpy.run_path(os.path.join(ROOT, "configs", "cpu_demo.py"))["get_config"]()
  cfg.train.seed, cfg.data.demo_train, cfg.data.demo_heldout = 0, 24, 4
  cfg.model.image_size = 56  # as ARGS: the runs find this set and reuse it
  demo.prepare(str(folder), **main.demo_args(cfg))
  return str(folder)


def _scenario(base) -> dict:
  """Runs ref, then kill / restart + SIGTERM / one-process continuation (module doc);
  no process outlives it."""
  jobs = []
  try:
    return _run_scenario(base, jobs)
  finally:
    for job in jobs:
      job.kill()


def _run_scenario(base, jobs) -> dict:
  ref_dir, run_dir = base / "ref", base / "run"
  for d in (ref_dir, run_dir):
    d.mkdir()
  demo_root = f"--config.data.demo_root={_demo_data(base / 'demo_data')}"
  out = {"ref_dir": str(ref_dir), "run_dir": str(run_dir)}
  t0 = time.monotonic()

  # The reference, while the 2-process run starts (3 processes on the CPU at once).
  ref = Job(ref_dir, 1, "ref", [demo_root])
  run = Job(run_dir, 2, "kill", [demo_root])
  jobs += [ref, run]
  # 1. Kill one process after checkpoint 2; the other then blocks in a collective.
  run.until("checkpoint 2", lambda: 2 in _complete(run_dir))
  run.procs[1].kill()
  time.sleep(0.5)
  run.kill()
  out["last_complete"] = _complete(run_dir)[-1]
  out["before_kill"] = _losses(run_dir)
  out["seconds"] = {"kill": round(time.monotonic() - t0)}

  # 2. Restart both; SIGTERM once the restarted run has logged a step: to process 1
  #    first, to process 0 0.2 s later (a pod's hosts hear it at different times).
  t0 = time.monotonic()
  n = len(out["before_kill"])
  run = Job(run_dir, 2, "term", [demo_root])
  jobs.append(run)
  run.until("a step after the restart", lambda: len(_losses(run_dir)) > n)
  run.signal(1, signal.SIGTERM)
  time.sleep(0.2)
  run.signal(0, signal.SIGTERM)
  out["term_rc"] = run.wait()
  out["term_out"] = [run.output(i) for i in range(2)]
  out["after_restart"] = _losses(run_dir)[n:]
  out["preempted"] = _complete(run_dir)[-1]
  with open(os.path.join(run_dir, "checkpoints", str(out["preempted"]), "data",
                         "metadata")) as f:
    out["data_item"] = json.load(f)
  out["seconds"]["term"] = round(time.monotonic() - t0)

  # 3. One process with all 8 devices continues the 2-process checkpoint.
  t0 = time.monotonic()
  n = len(_losses(run_dir))
  one = Job(run_dir, 1, "one", [demo_root])
  jobs.append(one)
  out["one_rc"] = one.wait()
  out["one_out"] = one.output(0)
  out["one"] = _losses(run_dir)[n:]
  out["ref_rc"] = ref.wait()
  out["ref"] = dict(_losses(ref_dir))
  out["seconds"]["one"] = round(time.monotonic() - t0)
  print(json.dumps({k: v for k, v in out.items() if not k.endswith(("_out", "_item"))}))
  return out


def test_two_processes_train_resume_and_stop_like_one_process(tmp_path):
  """One scenario (its processes are the cost), its facts checked in turn."""
  out = _scenario(tmp_path)
  run_dir, ref = out["run_dir"], out["ref"]

  # The reference trains.
  assert out["ref_rc"] == [0]
  assert sorted(ref) == list(range(1, STEPS + 1))
  assert ref[STEPS] < ref[1]

  # Every loss logged by the 2-process runs (and the 1-process continuation) is the
  # 8-device reference's at that step (gloo sums in another order: float32 rounding).
  logged = out["before_kill"] + out["after_restart"] + out["one"]
  for step, loss in logged:
    assert loss == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, loss, ref[step])

  # The killed run resumed from its last complete checkpoint; the trajectory (steps
  # logged after that checkpoint and before the kill are redone) is 1..STEPS once.
  last = out["last_complete"]
  assert last >= 2
  for text in out["term_out"]:
    assert f"resumed from {run_dir}/checkpoints/{last}" in text
  before = [s for s, _ in out["before_kill"]]
  assert before[:last] == list(range(1, last + 1))
  trajectory = before[:last] + [s for s, _ in out["after_restart"] + out["one"]]
  assert trajectory == list(range(1, STEPS + 1))

  # SIGTERM: both processes saved the same step and exited 0.
  step = out["preempted"]
  assert out["term_rc"] == [0, 0]
  assert step == out["after_restart"][-1][0] < STEPS
  for text in out["term_out"]:
    assert f"SIGTERM: saved step {step} to" in text

  # One process with 8 devices continued the 2-process checkpoint to the end.
  assert out["one_rc"] == [0]
  assert f"resumed from {run_dir}/checkpoints/{step}" in out["one_out"]
  assert [s for s, _ in out["one"]] == list(range(step + 1, STEPS + 1))
  assert _complete(run_dir)[-1] == STEPS

  # The checkpoint's data item holds every process's iterator: each took 4 of the 8
  # examples of every step (which 4: test_pipeline_slices_rows_by_process).
  item = out["data_item"]
  assert item["process_count"] == 2
  assert [s["examples"] for s in item["states"]] == [step * BATCH // 2] * 2
  assert [s["consumed"] for s in item["states"]] == [step * BATCH // 2] * 2


def test_pipeline_slices_rows_by_process(tmp_path):
  """Process p of 2 yields rows [4p, 4p + 4) of each global batch of 8."""
  from lavida_jax import train
  from lavida_jax.data import demo, pipeline, tfds_builder
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import cpu_demo  # pylint: disable=g-import-not-at-top

  tfds_builder.tfds.display_progress_bar(False)
  cfg = cpu_demo.get_config()
  cfg.model.image_size = 56
  _, data_dir = demo.prepare(str(tmp_path), num_train=12, num_heldout=2, image_size=56)
  tok = demo.demo_tokenizer()
  specials = demo.demo_special_tokens("llada", tok)
  mcfg = train.model_config(cfg, specials, len(tok))
  source = pipeline.open_source(data_dir, "train")

  def batches(p, n):
    it = iter(pipeline.make_dataset(source, mcfg, tok, specials, length=52,
                                    global_batch_size=BATCH, process_index=p,
                                    process_count=n, system_prompt=None))
    return it, [next(it)["input_ids"] for _ in range(3)]

  _, whole = batches(0, 1)
  for p in range(2):
    it, part = batches(p, 2)
    assert it.examples == 3 * BATCH // 2
    for k in range(3):
      np.testing.assert_array_equal(part[k], whole[k][4 * p:4 * p + 4])


def test_iterator_state_moves_to_another_process_count():
  from lavida_jax.data import pipeline
  skipped = dict.fromkeys(pipeline.SKIP_REASONS, 0)
  state = lambda consumed, skips=0: {"parent": {"next_index": consumed}, "consumed": consumed,
                                     "num_workers": 0, "examples": consumed - skips,
                                     "skipped": {**skipped, "too_long": skips}}
  saved = {"process_count": 2, "states": [state(12), state(13, skips=1)]}
  assert pipeline.process_state(saved, 8, 1, 2) == saved["states"][1]  # same count: own
  one = pipeline.process_state(saved, 8, 0, 1)  # global batches 0..3 begun: resume at 4
  assert one["parent"] == {"next_index": 32} and one["consumed"] == 32
  assert one["skipped"]["too_long"] == 1
  four = [pipeline.process_state(saved, 8, p, 4) for p in range(4)]
  assert [s["consumed"] for s in four] == [8] * 4
  assert sum(s["skipped"]["too_long"] for s in four) == 1
  assert pipeline.process_state(state(5), 8, 0, 1) == state(5)  # an older checkpoint
