"""The composite: image -> views -> tokens -> spliced prompt -> logits, vs PyTorch."""
import numpy as np
import pytest
from PIL import Image

from lavida_jax import image as image_lib
from tests.conftest import assert_close


def _image(size, seed):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _views(model, size, seed):
  pixels, image_size = image_lib.process_anyres(_image(size, seed), model.cfg.image)
  return pixels, image_size


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream", "llada-v"])
def test_multimodal_logits_match_reference(loaded, family):
  """Two rows, different images (different token counts): each row equals the
  reference run on that row alone; the shorter row is masked padding."""
  ref, model = loaded(family)
  sizes = [(640, 480), (300, 1200)]
  images = [_views(model, s, i) for i, s in enumerate(sizes)]
  ids = np.array([[1, 2, 3, -200, 4, 5], [6, -200, 7, 8, 9, 10]])
  ours = np.asarray(model.logits(ids, images))
  n_tokens = [model.layout(*im).num_tokens for im in images]
  lengths = [5 + n for n in n_tokens]
  assert ours.shape == (2, max(lengths), ref.cfg.lm.vocab_size)
  for b, (pixels, image_size) in enumerate(images):
    grid = image_lib.grid_shape(image_size, model.cfg.image)
    expected = ref.multimodal_logits(ids[b], [(pixels, image_size, grid)])
    assert_close(ours[b, :lengths[b]], expected, rel=1e-5)


def test_two_images_in_one_prompt(loaded):
  ref, model = loaded("lavida-llada")
  images = [_views(model, (500, 375), 3), _views(model, (336, 336), 4)]
  ids = np.array([[1, -200, 2, 3, -200, 4]])
  grids = [image_lib.grid_shape(s, model.cfg.image) for _, s in images]
  expected = ref.multimodal_logits(ids[0], [(p, s, g) for (p, s), g in zip(images, grids)])
  assert_close(np.asarray(model.logits(ids, images))[0], expected, rel=1e-5)


def test_image_marker_count_must_match_images(loaded):
  _, model = loaded("lavida-llada")
  image = _views(model, (336, 336), 0)
  with pytest.raises(ValueError, match="2 <image> marker"):
    model.logits(np.array([[1, -200, 2, -200]]), [image])
  with pytest.raises(ValueError, match="0 <image> marker"):
    model.logits(np.array([[1, 2]]), [image])


def test_out_of_range_ids_are_refused(loaded):
  _, model = loaded("lavida-llada")
  with pytest.raises(ValueError, match="input_ids must be in"):
    model.logits(np.array([[1, -5]]), [])


def test_reference_compat_attends_to_padding(reference_checkpoint):
  """SPEC §13: the reference ignores masks, so short rows see zero padding."""
  import lavida_jax
  ref, folder = reference_checkpoint("lavida-llada")
  compat = lavida_jax.load_pretrained(folder, reference_compat=True)
  images = [_views(compat, (640, 480), 0), _views(compat, (300, 1200), 1)]
  ids = np.array([[1, 2, 3, -200, 4, 5], [6, -200, 7, 8, 9, 10]])
  ours = np.asarray(compat.logits(ids, images))
  x, _ = compat.embed_multimodal(ids, images)
  import torch
  expected = ref.logits_from_embeds(torch.from_numpy(np.array(x)))
  assert_close(ours, expected.numpy(), rel=1e-5)


@pytest.mark.parametrize("family,size", [("lavida-llada", (640, 480)),
                                         ("llada-v", (1200, 1100))])
def test_packed_static_splice_equals_dynamic_splice(loaded, family, size):
  """data/packing.py + embed_packed (static shapes, padded views) == embed_multimodal,
  including LLaDA-V's bilinear downsampling expressed as 4-tap gathers."""
  from lavida_jax.data import packing
  _, model = loaded(family)
  pixels, image_size = _views(model, size, 5)
  ids = np.array([3, 4, -200, 5, 6])
  labels = np.array([-100, -100, -100, 5, 6])
  max_views = len(pixels) + 2
  n = model.layout(pixels, image_size).num_tokens
  packed = packing.pack_example(ids, labels, image_size, model.cfg, n + 10, 254, max_views)
  assert (packed["input_ids"] == -200).sum() == n
  assert (packed["labels"][2:2 + n] == -100).all() and (packed["labels"][n + 6:] == 254).all()
  views, _ = image_lib.pad_views(pixels, max_views)
  x = model.embed_packed(packed["input_ids"][None], views[None],
                         packed["image_index"][None], packed["image_weight"][None])
  expected, _ = model.embed_multimodal(ids[None], [(pixels, image_size)])
  assert_close(np.asarray(x)[0, :n + 4], np.asarray(expected)[0], rel=1e-5)
  with pytest.raises(ValueError, match="exceeds length"):
    packing.pack_example(ids, labels, image_size, model.cfg, n, 254, max_views)
