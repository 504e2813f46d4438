"""SigLIP tower vs transformers.SiglipVisionModel with LaViDa's last layer deleted."""
import numpy as np
import pytest

from tests.conftest import assert_close


@pytest.mark.parametrize("family", ["lavida-llada", "llada-v"])
def test_vision_features_match_transformers(loaded, family):
  ref, model = loaded(family)
  pixels = np.random.default_rng(0).uniform(-1, 1, (2, 384, 384, 3)).astype(np.float32)
  ours = model.vision_features(pixels)
  assert ours.shape == (2, 729, ref.cfg.vision.width)
  assert_close(ours, ref.vision_features(pixels).numpy())


def test_output_is_before_post_layernorm(loaded):
  ref, model = loaded("lavida-llada")
  pixels = np.random.default_rng(1).uniform(-1, 1, (1, 384, 384, 3)).astype(np.float32)
  ours = np.asarray(model.vision_features(pixels))
  normed = ref.vision.post_layernorm(ref.vision_features(pixels)).detach().numpy()
  assert np.abs(ours - normed).max() > 1e-2  # post_layernorm is kept but not applied


def test_last_six_pixel_rows_and_cols_are_ignored(loaded):
  """The stride-14 conv covers 27*14 = 378 of 384 pixels (SPEC §13)."""
  _, model = loaded("lavida-llada")
  pixels = np.random.default_rng(2).uniform(-1, 1, (1, 384, 384, 3)).astype(np.float32)
  changed = pixels.copy()
  changed[:, 378:, :, :] = 0.5
  changed[:, :, 378:, :] = -0.5
  np.testing.assert_array_equal(model.vision_features(pixels), model.vision_features(changed))


def test_bad_pixel_shape_is_refused(loaded):
  _, model = loaded("lavida-llada")
  with pytest.raises(ValueError, match="pixel_values must be"):
    model.vision_features(np.zeros((1, 3, 384, 384), np.float32))


def test_position_embeddings_start_at_hf_init_scale():
  # HF's SiglipPreTrainedModel._init_weights: normal(std=1/sqrt(width)); a tower
  # trained from scratch (the CPU demo) starts with positions on the patches' scale.
  from flax import nnx
  from lavida_jax.models import siglip
  cfg = siglip.SiglipConfig(image_size=56, width=128, depth=1, mlp_dim=16, num_heads=2)
  tower = siglip.SiglipVisionTower(cfg, rngs=nnx.Rngs(0))
  pos = np.asarray(tower.pos_embed[...])
  assert pos.shape == (16, 128)
  np.testing.assert_allclose(pos.std(), 128 ** -0.5, rtol=0.1)
