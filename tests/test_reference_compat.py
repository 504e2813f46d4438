"""reference_compat in generation (SPEC §13): LaViDa's inference prompt ids, and its
sampler's argmax and confidence softmax over the whole vocabulary (mask id included)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lavida_jax
from lavida_jax import generate
from lavida_jax.diffusion import sampler as smp
from tests.conftest import TINY_SPECIALS

IMAGE = -200


def lavida_inference_ids(prompt: str, tokenizer, bos_id: int) -> list[int]:
  """LLaVA's tokenizer_image_token as LaViDa calls it, restated: the prompt is split at
  each <image> and each piece encoded; when the first piece starts with BOS the
  separators are [-200, -200] and every piece, separators included, loses its first
  token, so one -200 remains and the token after each <image> is gone."""
  pieces = [tokenizer.encode(p) for p in prompt.split("<image>")]
  offset = int(bool(pieces[0]) and pieces[0][0] == bos_id)
  out = [pieces[0][0]] if offset else []
  chunks = []
  for i, piece in enumerate(pieces):
    if i:
      chunks.append([IMAGE] * (offset + 1))
    chunks.append(piece)
  for chunk in chunks:
    out += chunk[offset:]
  return out


@pytest.fixture(scope="module")
def compat_model(reference_checkpoint):
  _, folder = reference_checkpoint("lavida-llada")
  return lavida_jax.load_pretrained(folder, reference_compat=True)


def _image():
  from PIL import Image
  return Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 500, 3), np.uint8))


def test_reference_prompt_ids_are_lavidas(compat_model, loaded, tiny_tokenizer):
  from lavida_jax import text
  req = generate.Request("how many shapes are there", _image())
  ids, images = generate.prompt_ids(compat_model, tiny_tokenizer, req)
  prompt = text.format_llada([{"role": "user", "content": "<image>\nhow many shapes are there"}],
                             system_prompt=text.SYSTEM_PROMPT)
  bos = TINY_SPECIALS["<|startoftext|>"]
  assert ids == lavida_inference_ids(prompt, tiny_tokenizer, bos) and len(images) == 1
  _, default_model = loaded("lavida-llada")
  default, _ = generate.prompt_ids(default_model, tiny_tokenizer, req)
  at = default.index(IMAGE)
  assert ids == default[:at + 1] + default[at + 2:]  # the token after <image> is dropped


def test_generator_includes_the_mask_under_reference_compat(compat_model, loaded,
                                                            tiny_tokenizer):
  cfg = smp.SamplerConfig(gen_length=8, block_length=8, steps=4, mask_id=255)
  assert generate.Generator(compat_model, tiny_tokenizer, cfg).cfg.forbid_mask is False
  _, default_model = loaded("lavida-llada")
  assert generate.Generator(default_model, tiny_tokenizer, cfg).cfg.forbid_mask is True
  adaptive = dataclasses.replace(cfg, decoder="threshold")
  assert generate.Generator(compat_model, tiny_tokenizer, adaptive).cfg.forbid_mask is True
  with pytest.raises(ValueError, match="forbid_mask=False needs the fixed decoder"):
    dataclasses.replace(cfg, decoder="threshold", forbid_mask=False)


V, MASK = 12, 11


def _logits():
  """Position 0: token 1 leads the mask id by 0.01; position 1: token 2 alone;
  position 2: the mask id leads token 3 by 0.1; position 3: token 4, weakly."""
  table = np.zeros((4, V), np.float32)
  table[0, 1], table[0, MASK] = 5.0, 4.99
  table[1, 2] = 4.0
  table[2, 3], table[2, MASK] = 2.9, 3.0
  table[3, 4] = 1.0
  return table


def _run(forbid_mask):
  cfg = smp.SamplerConfig(gen_length=4, block_length=4, steps=4, schedule="none",
                          mask_id=MASK, forbid_mask=forbid_mask)
  table = jnp.asarray(_logits())
  den = smp.Denoiser(lambda canvas, start, _: jnp.broadcast_to(table, canvas.shape + (V,)))
  canvas0 = np.full((1, 4), MASK, np.int32)
  counts = smp.transfer_schedule(canvas0, cfg)
  sample = smp.make_sampler(den, cfg, return_history=True)
  out, hist = sample(canvas0, counts, jax.random.key(0))
  return np.asarray(out), np.asarray(hist)


def lavida_loop(table, forbid_mask):
  """LaViDa's generate, one row, one token per step: x0 = argmax, confidence = softmax
  (float64) of x0 at masks, top-1 committed (x0 may be the mask id: it stays masked)."""
  logits = table.astype(np.float64).copy()
  if forbid_mask:
    logits[:, MASK] = -np.inf
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  x0 = logits.argmax(1)
  x, hist = np.full(4, MASK), []
  for _ in range(4):
    conf = np.where(x == MASK, p[np.arange(4), x0], -np.inf)
    j = int(np.argmax(conf))
    x[j] = x0[j]
    hist.append(x.copy())
  return x, np.array(hist)


@pytest.mark.parametrize("forbid_mask", [False, True])
def test_mask_in_the_confidence_softmax(forbid_mask):
  """Position 0's x0 loses half its probability to the mask id, so under LaViDa's rule
  position 1 goes first (forbidding the mask: position 0); position 2 predicts the
  mask, which LaViDa commits and so leaves masked."""
  out, hist = _run(forbid_mask)
  ref, ref_hist = lavida_loop(_logits(), forbid_mask)
  np.testing.assert_array_equal(hist[:, 0], ref_hist)
  np.testing.assert_array_equal(out[0], ref)
  if forbid_mask:
    assert ref_hist[0].tolist() == [1, MASK, MASK, MASK] and ref.tolist() == [1, 2, 3, 4]
  else:
    assert ref_hist[0].tolist() == [MASK, 2, MASK, MASK] and ref.tolist() == [1, 2, MASK, MASK]
