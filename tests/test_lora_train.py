"""LoRA through the training loop: adapter-only steps that name their base, an exact
resume, and load_pretrained of an adapter step (merged == unmerged, base untouched)."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

import lavida_jax
from lavida_jax.checkpoint import adapters, orbax
from lavida_jax.models import lora
from tests.test_train_loop import _cfg, _losses, _run


def _lora_cfg(steps, base):
  cfg = _cfg(steps, (1, -1, 1), **{"model.init": base, "lora.rank": 4, "lora.alpha": 8.0,
                                   "lora.lr": 1e-2, "lora.dropout": 0.1})
  cfg.checkpoint.every = 1
  return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora_loop")
  _run(_cfg(1, (1, -1, 1)), root / "base")
  base = str(root / "base" / "checkpoints")
  _run(_lora_cfg(2, base), root / "straight")
  first = _run(_lora_cfg(1, base), root / "split")  # "killed" after step 1
  second = _run(_lora_cfg(2, base), root / "split")
  return root, base, first, second


def test_resume_continues_the_uninterrupted_lora_run(runs):
  root, _, first, second = runs
  assert (first["step"], second["step"]) == (1, 2)
  a, b = _losses(root / "straight"), _losses(root / "split")
  assert sorted(a) == sorted(b) == [1, 2]
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_step_holds_the_adapters_and_names_the_base(runs):
  root, base, _, _ = runs
  step = str(root / "straight" / "checkpoints" / "2")
  meta = orbax.params_metadata(step)
  assert meta and all(k.rsplit("/", 1)[1] in ("lora_a", "lora_b") for k in meta)
  assert len(meta) == 2 * len(lora.LM_TARGETS)
  assert all(dtype == np.float32 for _, dtype in meta.values())
  record = adapters.read_record(step)
  assert record["base"] == os.path.abspath(base) and record["rank"] == 4
  assert adapters.is_adapter_step(step) and not adapters.is_adapter_step(base)


def test_adapter_step_loads_merged_and_leaves_the_base_frozen(runs):
  root, base, _, _ = runs
  step = str(root / "straight" / "checkpoints" / "2")
  base_model = lavida_jax.load_pretrained(base)
  unmerged = adapters.load_adapter_step(step, merge=False)
  merged = lavida_jax.load_pretrained(step)  # the serving path: merged into the kernels
  assert not lora.adapted(merged) and lora.adapted(unmerged)
  # Only the adapters trained: every base weight is the base checkpoint's.
  frozen = nnx.to_flat_state(nnx.state(unmerged, nnx.Not(lora.LoRAParam)))
  want = dict(nnx.to_flat_state(nnx.state(base_model, nnx.Param)))
  for path, v in frozen:
    np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(want[path].get_value()))
  ids = np.random.default_rng(0).integers(0, 200, (2, 10))
  got, ref = np.asarray(merged.lm(ids)), np.asarray(unmerged.lm(ids))
  assert np.abs(ref - np.asarray(base_model.lm(ids))).max() > 1e-4  # the adapters moved
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_missing_base_is_named(runs, tmp_path):
  import json
  import shutil
  root, _, _, _ = runs
  step = tmp_path / "2"
  shutil.copytree(root / "straight" / "checkpoints" / "2", step)
  record = step / "files" / adapters.LORA_FILE
  data = json.loads(record.read_text())
  data["base"] = str(tmp_path / "gone")
  record.write_text(json.dumps(data))
  # (lora.json's checksum no longer matches: the side files are verified first)
  with pytest.raises(Exception, match="lora.json"):
    lavida_jax.load_pretrained(str(step))


def test_convert_lora_to_peft_round_trips(runs, tmp_path, capsys):
  """`convert lora-to-peft` on an adapter step; the PEFT folder imported onto the base
  gives the step's (unmerged) logits; a full step is refused in one line."""
  import json
  from lavida_jax import convert
  from lavida_jax.checkpoint import peft as peft_io
  root, base, _, _ = runs
  step = str(root / "straight" / "checkpoints" / "2")
  out = tmp_path / "peft"
  assert convert.main(["lora-to-peft", f"--src={step}", f"--dst={out}"]) == 0
  config = json.loads((out / peft_io.CONFIG_FILE).read_text())
  assert config["base_model_name_or_path"] == os.path.abspath(base) and config["r"] == 4
  model = lavida_jax.load_pretrained(base)
  peft_io.import_peft(model, str(out))
  ids = np.random.default_rng(1).integers(0, 200, (2, 9))
  want = np.asarray(adapters.load_adapter_step(step, merge=False).lm(ids))
  np.testing.assert_allclose(np.asarray(model.lm(ids)), want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
  capsys.readouterr()
  assert convert.main(["lora-to-peft", f"--src={base}", f"--dst={tmp_path / 'no'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "is not a LoRA training step" in err
  assert not (tmp_path / "no").exists()
