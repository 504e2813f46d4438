"""fp32 parity at 1e-5 over long prompts (SPEC §3.6, §13): two images and text,
>= 900 positions, against the PyTorch references (transformers' Llama / Qwen2 +
SigLIP + LaViDa's connector restated): the model's logits, the sampler's
first-step logits (Full-DLM and Prefix-DLM denoisers, jitted as the Generator
runs them), and the training loss's logits at the masked positions (and their
cross-entropy). The tiny models here keep the real head_dim 128 and each
family's RoPE θ, where a RoPE table 1 ulp off torch's moves logits past ~500
positions (SPEC §13)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

import lavida_jax
from lavida_jax import generate
from lavida_jax import image as image_lib
from lavida_jax.diffusion import loss as loss_lib
from lavida_jax.diffusion import masking
from lavida_jax.models.lavida import LaViDaConfig
from tests.conftest import assert_close

REL = 1e-5
SIZES = {"lavida-llada": [(800, 800), (640, 480)], "lavida-dream": [(800, 800), (640, 480)],
         "llada-v": [(500, 400), (384, 384)]}  # LLaDA-V: 729 unpooled tokens per view


def _head_dim_128(family: str) -> LaViDaConfig:
  """The tiny config with head_dim 128: LLaDA / LLaDA-V 2 heads of 128 (d_model 256,
  their configs derive head_dim from d_model); Dream 7 heads of 128 over 1 kv head on
  its tiny width 112 (its config states head_dim)."""
  tiny = LaViDaConfig.create(family, "tiny")
  lm = dataclasses.replace(tiny.lm, head_dim=128)
  if family != "lavida-dream":
    lm = dataclasses.replace(lm, n_heads=2, n_kv_heads=2, d_model=256)
  return dataclasses.replace(tiny, lm=lm,
                             connector=dataclasses.replace(tiny.connector, lm_dim=lm.d_model))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  """(Reference, our model loaded through load_pretrained) per family, head_dim 128."""
  from tests.torch_reference import Reference
  cache = {}

  def get(family):
    if family not in cache:
      ref = Reference(family, seed=5, cfg=_head_dim_128(family))
      folder = ref.save(str(tmp_path_factory.mktemp(f"{family}-hd128")))
      cache[family] = ref, lavida_jax.load_pretrained(folder)
    return cache[family]

  return get


def _long_prompt(model, family, answer=0):
  """ids [1, T] with two -200 markers among 60 + 40 + 30 (+ answer) text tokens, and
  the images' (views, size) and (views, size, grid) for the reference."""
  rng = np.random.default_rng(21)
  images, ref_images = [], []
  for i, size in enumerate(SIZES[family]):
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    views, image_size = image_lib.process_anyres(Image.fromarray(pixels), model.cfg.image)
    images.append((views, image_size))
    ref_images.append((views, image_size, image_lib.grid_shape(image_size, model.cfg.image)))
  text = lambda n: rng.integers(0, 250, n)
  ids = np.concatenate([text(60), [-200], text(40), [-200], text(30 + answer)])[None]
  return ids, images, ref_images


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream", "llada-v"])
def test_text_logits_over_1000_positions(loaded, family):
  ref, model = loaded(family)
  ids = np.random.default_rng(3).integers(0, 250, (1, 1000))
  assert_close(model.text_logits(ids), ref.text_logits(ids), rel=REL)


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream", "llada-v"])
def test_multimodal_logits_two_images(loaded, family):
  ref, model = loaded(family)
  ids, images, ref_images = _long_prompt(model, family)
  ours = np.asarray(model.logits(ids, images))[0]
  assert ours.shape[0] >= 900
  assert_close(ours, ref.multimodal_logits(ids[0], ref_images), rel=REL)


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_first_step_sampler_logits(loaded, family, cache):
  """The Generator's denoiser on an all-mask canvas of 64 after the long prompt ==
  the reference over prompt + canvas (Prefix-DLM: prompt rows do not see the
  canvas); Dream's logits realigned (canvas i from position P + i − 1)."""
  ref, model = loaded(family)
  ids, images, ref_images = _long_prompt(model, family)
  x, valid = model.embed_multimodal(ids, images)
  p, gen_length, lm = x.shape[1], 64, model.lm
  lm_graphdef, lm_state = nnx.split(lm)
  canvas = jnp.full((1, gen_length), lm.cfg.mask_id, jnp.int32)
  start = jnp.zeros((1,), jnp.int32)
  shifted = lm.cfg.shifted_logits
  kw = dict(lm_graphdef=lm_graphdef, shifted=shifted, lb=gen_length)
  if cache == "none":
    step = jax.jit(functools.partial(generate._denoise_full, **kw))
    ours = step(canvas, start, None, lm_state, x, valid)
  else:
    prefill = jax.jit(functools.partial(generate._prefill, lm_graphdef=lm_graphdef))
    kv, first = prefill(lm_state, x, valid)
    step = jax.jit(functools.partial(generate._denoise_prefix, **kw))
    ours = step(canvas, start, None, lm_state, kv, first)
  prompt = ref.multimodal_embeds(ids[0], ref_images)
  with torch.no_grad():
    masks = ref.lm.get_input_embeddings()(torch.full((gen_length,), lm.cfg.mask_id))
  embeds = torch.cat([prompt, masks])[None]
  t = embeds.shape[1]
  additive = None
  if cache == "prefix":
    allowed = (np.arange(t)[None, :] < p) | (np.arange(t)[:, None] >= p)
    additive = torch.from_numpy(np.where(allowed, 0.0, -1e30).astype(np.float32))[None, None]
  logits = ref.logits_from_embeds(embeds, additive).numpy()[0]
  expected = logits[p - 1:-1] if shifted else logits[p:]
  assert_close(np.asarray(ours)[0], expected, rel=REL)


def _all_logits(h_ND, kernel_DV, chunk):
  """The loss's logits chunk by chunk (loss._chunk), assembled: [N, V]."""
  v = kernel_DV.shape[1]
  c, n_chunks = loss_lib._chunking(v, chunk)
  out = np.zeros((h_ND.shape[0], v), np.float32)
  for i in range(n_chunks):
    logits, _, _, col, fresh = loss_lib._chunk(h_ND, kernel_DV, i, c)
    keep = np.asarray(fresh)
    out[:, np.asarray(col)[keep]] = np.asarray(logits)[:, keep]
  return out


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
def test_training_loss_target_logits(loaded, family):
  """One complementary view of the long example through train_step.loss_fn's path
  (mask embedding, lm.hidden, gather_rows, chunked head) == the reference's logits
  at the same masked positions; cross-entropy too."""
  ref, model = loaded(family)
  ids, images, ref_images = _long_prompt(model, family, answer=200)
  lm = model.lm
  x, _ = model.embed_multimodal(ids, images)
  t = x.shape[1]
  labels = np.full((1, t), -100)
  labels[0, -200:] = ids[0, -200:]
  eligible = masking.eligible_positions(jnp.asarray(labels))
  m1, _, _ = masking.complementary_masks(jax.random.key(4), eligible)
  graphdef, state = nnx.split(lm)

  @jax.jit
  def hidden(state, x, m1):  # the train step's LM pass, compiled
    lm = nnx.merge(graphdef, state)
    mask_emb = lm.embed_tokens(jnp.array([lm.cfg.mask_id]))[0]
    return lm.hidden(masking.apply_mask(x, m1, mask_emb))

  h = hidden(state, x, m1)
  select, targets = m1, jnp.asarray(labels)
  if lm.cfg.shifted_logits:
    select, targets = masking.shift_left(select, False), masking.shift_labels(targets)
  h_n, idx, valid_n = loss_lib.gather_rows(h, select, t)
  n = int(np.asarray(valid_n).sum())
  assert n > 20
  kernel = lm.head.kernel[...]
  ours = _all_logits(h_n[:n], kernel, chunk=96)  # 256 = 96 + 96 + an overlapping 96
  tgt = targets.reshape(-1)[idx[:n]]
  ce = np.asarray(loss_lib.chunked_cross_entropy(h_n[:n], kernel, tgt, 96))

  embeds = ref.multimodal_embeds(ids[0], ref_images).clone()
  with torch.no_grad():
    embeds[torch.from_numpy(np.array(m1)[0])] = ref.lm.get_input_embeddings()(
        torch.tensor(lm.cfg.mask_id))
  logits = ref.logits_from_embeds(embeds[None]).numpy()[0].astype(np.float64)
  rows = logits[np.asarray(idx[:n])]
  assert_close(ours, rows, rel=REL)
  lse = np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1)) + rows.max(1)
  assert_close(ce, lse - rows[np.arange(n), np.asarray(tgt)], rel=REL)
