"""Projector, pooling and the anyres merge vs PyTorch (F.interpolate, LLaVA-NeXT unpad)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lavida_jax import image as image_lib
from lavida_jax.models import connector
from tests.conftest import assert_close

# (W, H) -> visual tokens for LaViDa (issue #2's list).
TOKEN_COUNTS = {(1024, 1024): 1008, (640, 480): 834, (480, 640): 840, (500, 375): 462,
                (300, 1200): 658, (336, 336): 406}


def test_bilinear_pool_matches_torch_interpolate():
  x = np.random.default_rng(0).normal(size=(3, 27 * 27, 8)).astype(np.float32)
  ours = connector.pool(x, connector.ConnectorConfig(pool_mode="bilinear"))
  grid = torch.from_numpy(x).view(3, 27, 27, 8).permute(0, 3, 1, 2)
  ref = F.interpolate(grid, size=[14, 14], mode="bilinear", align_corners=False)
  assert_close(ours, ref.flatten(2).transpose(1, 2).numpy(), rel=1e-5)


def test_average_pool_matches_torch_avg_pool2d():
  x = np.random.default_rng(1).normal(size=(2, 27 * 27, 8)).astype(np.float32)
  ours = connector.pool(x, connector.ConnectorConfig(pool_mode="average"))
  grid = torch.from_numpy(x).view(2, 27, 27, 8).permute(0, 3, 1, 2)
  ref = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2).numpy()
  assert ours.shape == (2, 169, 8)  # 13x13: the reference's floor, not 14x14
  assert_close(ours, ref, rel=1e-5)


def test_bilinear_is_not_antialiased():
  """jax.image.resize antialiases when downsampling; PyTorch (and we) do not."""
  x = np.random.default_rng(2).normal(size=(1, 27, 27, 4)).astype(np.float32)
  ours = np.asarray(connector.pool(x.reshape(1, 729, 4), connector.ConnectorConfig()))
  import jax
  aa = np.asarray(jax.image.resize(x, (1, 14, 14, 4), "bilinear", antialias=True))
  assert np.abs(ours - aa.reshape(1, 196, 4)).max() > 1e-3


@pytest.mark.parametrize("size,count", sorted(TOKEN_COUNTS.items()))
def test_lavida_token_counts(size, count):
  cfg = image_lib.ImageConfig.lavida()
  grid = image_lib.grid_shape(size, cfg)
  layout = connector.anyres_layout(size, grid, 14, connector.ConnectorConfig())
  assert layout.num_tokens == count


def _image(size, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(640, 480), (300, 1200), (336, 336)])
def test_image_tokens_match_reference_lavida(loaded, size):
  ref, model = loaded("lavida-llada")
  pixels, image_size = image_lib.process_anyres(_image(size), model.cfg.image)
  ours = model.image_tokens(pixels, image_size)
  assert ours.shape == (TOKEN_COUNTS[size], model.cfg.connector.lm_dim)
  grid = image_lib.grid_shape(image_size, model.cfg.image)
  assert_close(ours, ref.image_tokens(pixels, image_size, grid).numpy())


@pytest.mark.parametrize("size", [(500, 400), (1200, 1100)])
def test_image_tokens_match_reference_llada_v(loaded, size):
  """No pooling (27x27 per crop); a 3x4 grid is downsampled (anyres_max_4)."""
  ref, model = loaded("llada-v")
  pixels, image_size = image_lib.process_anyres(_image(size, 1), model.cfg.image)
  grid = image_lib.grid_shape(image_size, model.cfg.image)
  ours = model.image_tokens(pixels, image_size)
  layout = model.layout(pixels, image_size)
  if size == (1200, 1100):
    assert grid[0] * grid[1] > 4 and layout.out_hw != layout.canvas.shape  # times > 1.1
  assert ours.shape[0] == layout.num_tokens
  assert_close(ours, ref.image_tokens(pixels, image_size, grid).numpy())


def test_wrong_number_of_views_is_refused(loaded):
  _, model = loaded("lavida-llada")
  pixels, image_size = image_lib.process_anyres(_image((640, 480)), model.cfg.image)
  with pytest.raises(ValueError, match="needs 5 views"):
    model.image_tokens(pixels[:1], image_size)
  with pytest.raises(ValueError, match=r"\[V, H, W, 3\]"):
    model.image_tokens(pixels[0], image_size)
