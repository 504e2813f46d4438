"""Hub ids ("org/name") as checkpoints, offline against a cache the test builds."""
import os
import shutil

import numpy as np
import pytest

import lavida_jax
from lavida_jax import convert, generate
from lavida_jax.checkpoint import hub
from lavida_jax.checkpoint.shards import CheckpointError

MAIN = "a" * 40
OTHER = "b" * 40


def _snapshot(home, repo_id, revision, files, ref=None):
  """huggingface_hub's cache layout: models--org--name/{refs/<ref>, snapshots/<commit>/}."""
  repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
  snap = repo / "snapshots" / revision
  snap.mkdir(parents=True)
  for name, src in files.items():
    shutil.copy(src, snap / name)
  if ref:
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(revision)
  return snap


@pytest.fixture
def offline_cache(reference_checkpoint, tmp_path, monkeypatch):
  """HF_HOME with org/tiny-lavida at refs/main (LaViDa-L) and a second commit (LaViDa-D
  weights under the same id), the hub unreachable (HF_HUB_OFFLINE=1)."""
  import tokenizers
  from tokenizers import models
  home = tmp_path / "hf_home"
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  tok = tmp_path / "tokenizer.json"
  tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tok))
  for rev, family, ref in ((MAIN, "lavida-llada", "main"), (OTHER, "lavida-dream", None)):
    _, folder = reference_checkpoint(family)
    _snapshot(home, "org/tiny-lavida", rev,
              {"config.json": os.path.join(folder, "config.json"),
               "model.safetensors": os.path.join(folder, "model.safetensors"),
               "tokenizer.json": str(tok)}, ref)
  return home


def test_hub_id_loads_from_the_cache(offline_cache, reference_checkpoint):
  _, folder = reference_checkpoint("lavida-llada")
  model = lavida_jax.load_pretrained("org/tiny-lavida")
  local = lavida_jax.load_pretrained(folder)
  ids = np.arange(3, 15)[None]
  np.testing.assert_array_equal(np.asarray(model.text_logits(ids)),
                                np.asarray(local.text_logits(ids)))
  path = hub.resolve("org/tiny-lavida")
  assert path.startswith(str(offline_cache)) and path.endswith(MAIN)
  assert generate.load_tokenizer_for(path) is not None  # the tokenizer came along


def test_revision_picks_the_snapshot(offline_cache):
  assert hub.resolve("org/tiny-lavida", revision=OTHER).endswith(OTHER)
  model = lavida_jax.load_pretrained("org/tiny-lavida", revision=OTHER)
  assert model.cfg.family == "lavida-dream"


def test_missing_hub_id_offline_is_one_line(offline_cache):
  with pytest.raises(CheckpointError, match="cannot get checkpoint 'org/absent': no such local folder.*HF_HUB_OFFLINE") as e:
    lavida_jax.load_pretrained("org/absent")
  assert "\n" not in str(e.value)
  with pytest.raises(SystemExit, match="org/absent"):
    generate.resolve_checkpoint("org/absent")


def test_local_paths_are_not_hub_ids(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "org" / "name").mkdir(parents=True)
  assert not hub.is_hub_id("org/name")  # exists locally
  assert hub.resolve("org/name") == "org/name"
  assert hub.is_hub_id("GSAI-ML/LLaDA-8B-Instruct") and not hub.is_hub_id("/abs/path")
  assert not hub.is_hub_id("a/b/c")


def test_convert_cli_takes_a_hub_id(offline_cache, tmp_path):
  dst = tmp_path / "orbax"
  assert convert.main(["hf-to-orbax", "--src=org/tiny-lavida", f"--dst={dst}"]) == 0
  assert lavida_jax.load_pretrained(str(dst)).cfg.family == "lavida-llada"
