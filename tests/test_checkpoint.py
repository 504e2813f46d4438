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
  assert_close(model.text_logits(ids), ref.text_logits(ids), rel=1e-5)
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


# --- the vision tower's geometry as LaViDa derives it (SPEC §13) ----------------------

def _base_tower(folder, cfg, nested=False, heads=None):
  """The base SigLIP folder LaViDa's config names: one layer more than the checkpoint
  keeps, plus the attention-pooling head; config.json flat (SiglipVisionModel) or
  nested under vision_config (SiglipModel)."""
  from transformers import SiglipConfig, SiglipVisionConfig, SiglipVisionModel
  v = cfg.vision
  vc = SiglipVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim,
                          num_hidden_layers=v.depth + 1,
                          num_attention_heads=heads or v.num_heads, image_size=v.image_size,
                          patch_size=v.patch_size, layer_norm_eps=v.eps,
                          hidden_act="gelu_pytorch_tanh", vision_use_head=True)
  if nested:
    SiglipConfig(vision_config=vc.to_dict()).save_pretrained(str(folder))
  else:
    SiglipVisionModel(vc).save_pretrained(str(folder))
  return str(folder)


def _lavida_layout(ref, folder, tower):
  """The checkpoint as LaViDa's training writes it: no vision sizes, only the tower."""
  config = ref.config_json()
  del config["vision_config"]
  config["mm_vision_tower"] = tower
  return ref.save(str(folder), config=config)


def test_lavida_layout_checkpoint_beside_its_base_tower_loads(reference_checkpoint, tmp_path,
                                                              caplog):
  """mm_vision_tower 'tiny-siglip-27x27' is the folder beside the checkpoint."""
  from PIL import Image

  from lavida_jax import image as image_lib
  ref, _ = reference_checkpoint("lavida-llada")
  _base_tower(tmp_path / "tiny-siglip-27x27", ref.cfg)
  folder = _lavida_layout(ref, tmp_path / "lavida-tiny", "tiny-siglip-27x27")
  with caplog.at_level("INFO"):
    model = lavida_jax.load_pretrained(folder)
  assert "mm_vision_tower folder" in caplog.text and "tiny-siglip-27x27" in caplog.text
  assert model.cfg.vision == ref.cfg.vision
  pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
  views, size = image_lib.process_anyres(Image.fromarray(pixels), model.cfg.image)
  ids = np.array([[1, 2, -200, 3, 4]])
  grid = image_lib.grid_shape(size, model.cfg.image)
  assert_close(np.asarray(model.logits(ids, [(views, size)]))[0],
               ref.multimodal_logits(ids[0], [(views, size, grid)]), rel=1e-5)


@pytest.mark.parametrize("where", ["absolute", "inside", "cwd", "nested"])
def test_vision_tower_folder_is_found(reference_checkpoint, tmp_path, monkeypatch, where):
  ref, _ = reference_checkpoint("lavida-llada")
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  if where == "absolute":
    tower = _base_tower(tmp_path / "elsewhere" / "t", ref.cfg, heads=4)
  elif where == "inside":
    _base_tower(ckpt / "vision", ref.cfg, heads=4)
    tower = "vision"
  elif where == "cwd":
    _base_tower(tmp_path / "work" / "towers" / "t", ref.cfg, heads=4)
    monkeypatch.chdir(tmp_path / "work")
    tower = "towers/t"
  else:  # SiglipConfig's nesting, beside the checkpoint
    _base_tower(tmp_path / "t", ref.cfg, nested=True, heads=4)
    tower = "t"
  vision, source = hf.resolve_vision({"mm_vision_tower": tower}, str(ckpt))
  assert "mm_vision_tower folder" in source
  assert vision.depth == ref.cfg.vision.depth and vision.num_heads == 4  # heads from config


def _hub_cache(home, repo_id, files: dict, revision="0123456789abcdef0123456789abcdef01234567"):
  """A Hugging Face cache as huggingface_hub lays it out: models--org--name/
  {refs/main, snapshots/<commit>/...}."""
  repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(revision)
  snap = repo / "snapshots" / revision
  snap.mkdir(parents=True)
  for name, src in files.items():
    if isinstance(src, str) and os.path.isfile(src):
      shutil.copy(src, snap / name)
    else:
      (snap / name).write_text(src)
  return snap


def test_vision_tower_from_the_hub_cache(reference_checkpoint, tmp_path, monkeypatch):
  ref, _ = reference_checkpoint("lavida-llada")
  base = _base_tower(tmp_path / "base", ref.cfg, heads=4)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  _hub_cache(tmp_path / "hf", "someone/tiny-siglip", {"config.json": base + "/config.json"})
  vision, source = hf.resolve_vision({"mm_vision_tower": "someone/tiny-siglip"},
                                     str(tmp_path / "ckpt"))
  assert "Hugging Face cache" in source
  assert vision.depth == ref.cfg.vision.depth and vision.num_heads == 4


@pytest.mark.parametrize("tower", ["google/siglip-so400m-patch14-384",
                                   "google/siglip2-so400m-patch14-384"])
def test_vision_tower_of_released_models_is_built_in(tmp_path, monkeypatch, tower):
  monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  vision, source = hf.resolve_vision({"mm_vision_tower": tower}, str(tmp_path))
  assert "built-in" in source
  assert (vision.depth, vision.width, vision.num_heads, vision.mlp_dim) == (26, 1152, 16, 4304)


def test_unknown_vision_tower_is_one_line_error(reference_checkpoint, tmp_path, monkeypatch):
  ref, _ = reference_checkpoint("lavida-llada")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  folder = _lavida_layout(ref, tmp_path / "ckpt", "tiny-siglip-nowhere")
  with pytest.raises(CheckpointError) as e:
    lavida_jax.load_pretrained(folder)
  msg = str(e.value)
  assert "\n" not in msg
  assert "mm_vision_tower 'tiny-siglip-nowhere'" in msg
  for way in ("beside the checkpoint", "huggingface-cli download", "vision_config"):
    assert way in msg


def test_vision_depth_mismatch_is_named(reference_checkpoint, tmp_path):
  """A base tower whose depth minus one is not the checkpoint's layer count."""
  from transformers import SiglipVisionConfig
  ref, _ = reference_checkpoint("lavida-llada")
  v = ref.cfg.vision
  (tmp_path / "t").mkdir()
  SiglipVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim,
                     num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
                     image_size=v.image_size, patch_size=v.patch_size).save_pretrained(
                         str(tmp_path / "t"))
  folder = _lavida_layout(ref, tmp_path / "ckpt", "t")
  with pytest.raises(CheckpointError,
                     match=rf"has {v.depth} vision encoder layers .* gives {v.depth - 1}"):
    lavida_jax.load_pretrained(folder)
