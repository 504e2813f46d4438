"""The training loop end to end on the demo data: resume, re-mesh, config errors."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))

import cpu_demo  # noqa: E402

from lavida_jax import main as main_lib  # noqa: E402
from lavida_jax import train  # noqa: E402


def _cfg(steps, mesh, **over):
  cfg = cpu_demo.get_config()
  cfg.model.image_size = 56  # 4x4 patches: fast
  # The demo's length. (At T=48 this model's (2, 2, 2) step deadlocked XLA:CPU's
  # in-process all-to-all rendezvous of 8 fake devices on 2 cores.)
  cfg.data.length = 52
  cfg.data.demo_train = 24
  cfg.data.demo_heldout = 4
  cfg.train.batch_size = 8
  cfg.train.steps = steps
  cfg.log_every = 1
  cfg.eval.num_examples = 0
  cfg.checkpoint.every = 2
  cfg.mesh = mesh
  for k, v in over.items():
    section, key = k.split(".")
    cfg[section][key] = v
  return cfg


def _run(cfg, workdir):
  cfg.data.demo_root = str(workdir.parent / "demo_data")  # generated once, shared
  data, _, _ = main_lib.make_train_data(cfg, workdir)
  return train.train_and_evaluate(cfg, str(workdir), data)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_on_another_mesh_continues_the_uninterrupted_run(tmp_path):
  straight, split = tmp_path / "straight", tmp_path / "split"
  _run(_cfg(4, (1, -1, 1)), straight)
  first = _run(_cfg(2, (2, 2, 2)), split)  # "killed" after step 2 (its checkpoint)
  assert first["step"] == 2
  second = _run(_cfg(4, (1, -1, 1)), split)  # restarted on a different mesh
  assert second["step"] == 4
  a, b = _losses(straight), _losses(split)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]  # no step lost or repeated
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-4), step
  assert sorted(os.listdir(split / "checkpoints"))[:2] == ["2", "4"]


def test_unknown_config_key_is_named():
  cfg = cpu_demo.get_config()
  with pytest.raises(AttributeError, match="no_such_key"):
    cfg.train.no_such_key  # noqa: B018  (what --config.train.no_such_key=1 hits)
  with pytest.raises(ValueError, match="unknown config argument 'stage=9'"):
    cpu_demo.get_config("stage=9")
