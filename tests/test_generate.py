"""Model-side generation: prefix cache vs full forward, Dream's shift, batching."""

import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest
from PIL import Image

from lavida_jax import generate
from lavida_jax.diffusion import sampler as sampler_lib
from tests.conftest import assert_close


def _image(size, seed):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


REQS = [generate.Request("what colour is the circle ?", _image((336, 336), 0)),
        generate.Request("how many shapes are there ?", _image((500, 375), 1)),
        generate.Request("what is the red square ?"),
        generate.Request("a circle", _image((300, 1200), 2))]


def _cfg(model, **kw):
  return sampler_lib.SamplerConfig(**{**dict(gen_length=8, block_length=4, steps=4,
                                             mask_id=model.cfg.lm.mask_id), **kw})


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
def test_denoisers_match_the_model_forward(loaded, tiny_tokenizer, family):
  """Full-DLM denoise == model.logits on [prompt + canvas] (shifted for Dream);
  Prefix-DLM denoise == a forward whose prompt rows cannot see the canvas."""
  _, model = loaded(family)
  gen_full = generate.Generator(model, tiny_tokenizer, _cfg(model), prefix_cache=False)
  gen_cache = generate.Generator(model, tiny_tokenizer, _cfg(model), prefix_cache=True)
  prompts = [generate.prompt_ids(model, tiny_tokenizer, r) for r in REQS[:2]]
  x, valid = generate.embed_prompts(model, prompts, 1024)
  canvas = np.array([[1, 2, 255, 255, 3, 255, 255, 255], [255] * 8], np.int32)
  shifted = model.cfg.lm.shifted_logits
  full = generate._denoise_full(canvas, gen_full.lm_state, x, valid,
                                lm_graphdef=gen_full.lm_graphdef, shifted=shifted)
  cache, first = gen_cache._prefill(gen_cache.lm_state, x, valid)
  cached = generate._denoise_cached(canvas, gen_cache.lm_state, cache, first,
                                    lm_graphdef=gen_cache.lm_graphdef, shifted=shifted)
  lm = model.lm
  for b, (ids, images) in enumerate(prompts):
    ids = np.concatenate([ids, canvas[b]])[None]
    ref = np.asarray(model.logits(ids, images))[0]
    p = ref.shape[0] - 8
    expected = ref[p - 1:-1] if shifted else ref[p:]
    assert_close(np.asarray(full)[b], expected)
    # Prefix-DLM reference: the same sequence, prompt rows blind to the canvas.
    xs, _ = model.embed_multimodal(ids, images)
    t = xs.shape[1]
    allowed = (np.arange(t)[None, :] < p) | (np.arange(t)[:, None] >= p)
    ref = np.asarray(_masked_logits(lm, xs, jnp.asarray(allowed)[None]))[0]
    expected = ref[p - 1:-1] if shifted else ref[p:]
    assert_close(np.asarray(cached)[b], expected)


@nnx.jit
def _masked_logits(lm, x, mask):
  return lm.logits_from_hidden(lm.hidden(x, mask_BTS=mask))


@pytest.mark.parametrize("family,cache", [("lavida-llada", True), ("lavida-llada", False),
                                          ("lavida-dream", True)])
def test_batch_of_one_equals_padded_batch_of_four(loaded, tiny_tokenizer, family, cache):
  _, model = loaded(family)
  gen = generate.Generator(model, tiny_tokenizer, _cfg(model), prefix_cache=cache)
  alone = gen(REQS[:1])[0]
  batch = gen(REQS)
  assert batch[0].ids == alone.ids
  assert alone.nfe == 4 + int(cache)
  assert all(model.cfg.lm.mask_id not in r.ids for r in batch)


def test_drafts_keep_fixed_tokens_and_compile_once(loaded, tiny_tokenizer):
  _, model = loaded("lavida-llada")
  gen = generate.Generator(model, tiny_tokenizer, _cfg(model), prefix_cache=True)
  draft = "red <|mdm_mask|> <|mdm_mask|> circle blue square red circle"  # block 1 fixed
  reqs = [generate.Request(r.prompt, r.image, draft) for r in REQS[:2]]
  out = gen(reqs)
  fixed = tiny_tokenizer.encode(draft)
  for r in out:
    for i, tok in enumerate(fixed):
      if tok != 255:
        assert r.ids[i] == tok
  assert out[0].nfe == 2 + 1  # block 0's two steps + prefill; block 1 has no masks
  gen(reqs)
  assert gen._sample._cache_size() == 1


def test_prompt_over_the_largest_bucket_is_refused(loaded, tiny_tokenizer):
  _, model = loaded("lavida-llada")
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    generate.bucket(10_000)


def test_a_bad_request_gets_its_error_and_the_batch_goes_on(loaded, tiny_tokenizer, tmp_path):
  from lavida_jax import evaluate
  _, model = loaded("lavida-llada")
  gen = generate.Generator(model, tiny_tokenizer, _cfg(model), prefix_cache=True)
  reqs = [REQS[0], generate.Request("what ?", str(tmp_path / "missing.png")), REQS[2]]
  out = evaluate.run_generation(gen, reqs, batch_size=3)
  assert [r.error is None for r in out] == [True, False, True]
  assert "missing.png" in out[1].error
  assert out[0].ids == gen(REQS[:1])[0].ids
