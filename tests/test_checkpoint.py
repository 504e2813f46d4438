"""Loading Hugging Face checkpoints: sharded folders, families, refusals by name."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import lavida_jax
from lavida_jax.checkpoint import hf
from lavida_jax.checkpoint.shards import CheckpointError
from lavida_jax.models.lavida import LaViDaConfig, param_count
from tests.conftest import assert_close


def test_sharded_checkpoint_with_index_loads_the_same(reference_checkpoint, loaded):
  ref, folder = reference_checkpoint("lavida-dream", shards=3)
  assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
  model = lavida_jax.load_pretrained(folder)
  ids = np.arange(2, 14)[None]
  assert_close(model.text_logits(ids), ref.text_logits(ids))
  _, single = loaded("lavida-dream")
  np.testing.assert_array_equal(model.lm.blocks.attn.q.kernel[...],
                                single.lm.blocks.attn.q.kernel[...])


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream", "llada-v"])
def test_family_is_read_from_config(reference_checkpoint, family):
  ref, folder = reference_checkpoint(family)
  assert hf.detect_family(hf.read_config(folder)) == family


def test_bf16_load_keeps_bf16_values(reference_checkpoint):
  ref, folder = reference_checkpoint("lavida-llada")
  model = lavida_jax.load_pretrained(folder, dtype="bfloat16")
  w = model.lm.head.kernel[...]
  assert w.dtype == np.dtype("bfloat16")
  expected = ref.lm.lm_head.weight.detach().T.to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(np.asarray(w, np.float32), expected)


def test_llada_v_pinpoints_from_grid_string():
  pins = hf.parse_pinpoints("(1x1),...,(6x6)", 384)
  assert len(pins) == 36 and pins[0] == (384, 384) and pins[1] == (384, 768)
  assert pins[-1] == (2304, 2304)


def _copy(folder, tmp_path, name):
  dst = tmp_path / name
  shutil.copytree(folder, dst)
  return dst


def _resave(ref, dst, mutate):
  sd = ref.state_dict()
  mutate(sd)
  ref.save(str(dst), state_dict=sd)


KEY = "model.transformer.blocks.1.q_proj.weight"


def test_missing_tensor_is_named(reference_checkpoint, tmp_path):
  ref, folder = reference_checkpoint("lavida-llada")
  dst = _copy(folder, tmp_path, "missing")
  _resave(ref, dst, lambda sd: sd.pop(KEY))
  with pytest.raises(CheckpointError, match=f"missing tensor {KEY}"):
    lavida_jax.load_pretrained(str(dst))


def test_misshaped_tensor_is_named(reference_checkpoint, tmp_path):
  ref, folder = reference_checkpoint("lavida-llada")
  dst = _copy(folder, tmp_path, "misshaped")
  _resave(ref, dst, lambda sd: sd.__setitem__(KEY, sd[KEY][:32].clone()))
  with pytest.raises(CheckpointError, match=rf"{KEY} has shape \(32, 64\), expected \(64, 64\)"):
    lavida_jax.load_pretrained(str(dst))


def test_unexpected_tensor_is_named(reference_checkpoint, tmp_path):
  ref, folder = reference_checkpoint("lavida-llada")
  dst = _copy(folder, tmp_path, "extra")
  _resave(ref, dst, lambda sd: sd.__setitem__("model.vision_tower.head.weight",
                                              torch.zeros(2)))
  with pytest.raises(CheckpointError, match="unexpected tensor.*model.vision_tower.head.weight"):
    lavida_jax.load_pretrained(str(dst))


def test_unknown_family_is_refused(reference_checkpoint, tmp_path):
  _, folder = reference_checkpoint("lavida-llada")
  dst = _copy(folder, tmp_path, "unknown")
  cfg = json.loads((dst / "config.json").read_text())
  cfg["model_type"] = "llava_qwen"
  (dst / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="unknown model family.*llava_qwen"):
    lavida_jax.load_pretrained(str(dst))
  with pytest.raises(ValueError, match="unknown model family"):
    LaViDaConfig.create("llava-qwen")


def test_truncated_shard_is_refused(reference_checkpoint, tmp_path):
  _, folder = reference_checkpoint("lavida-llada")
  dst = _copy(folder, tmp_path, "truncated")
  path = dst / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated"):
    lavida_jax.load_pretrained(str(dst))


def test_folder_without_config_is_refused(tmp_path):
  with pytest.raises(CheckpointError, match="no config.json"):
    lavida_jax.load_pretrained(str(tmp_path))


def _closed_form_count(v, c, lm, pooled_newline=True):
  """Parameters by hand: SigLIP, projector, newline, LM (untied head)."""
  w, f = v.width, v.mlp_dim
  vision = (14 * 14 * 3 * w + w) + 729 * w + 2 * w + v.depth * (
      4 * (w * w + w) + 4 * w + (w * f + f) + (f * w + w))
  projector = (c.vision_dim * c.lm_dim + c.lm_dim) + (c.lm_dim * c.lm_dim + c.lm_dim)
  d, n, k, h = lm.d_model, lm.n_heads, lm.n_kv_heads, lm.head_dim
  attn = d * n * h * 2 + 2 * d * k * h + (n * h + 2 * k * h if lm.qkv_bias else 0)
  block = attn + 3 * d * lm.mlp_dim + 2 * d
  return vision + projector + c.lm_dim + lm.n_embed * d + lm.n_layers * block + d + d * lm.vocab_size


@pytest.mark.parametrize("family,approx", [("lavida-llada", 8.43e9), ("lavida-dream", 8.03e9),
                                           ("llada-v", 8.43e9)])
def test_full_size_parameter_counts(family, approx):
  cfg = LaViDaConfig.create(family)
  count = param_count(cfg)
  assert count == _closed_form_count(cfg.vision, cfg.connector, cfg.lm)
  assert abs(count - approx) / approx < 0.005
