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
  """Full-DLM block logits == model.logits on [prompt + canvas] (shifted for Dream);
  Prefix-DLM == a forward whose prompt rows cannot see the canvas; the dual cache's
  refresh == Prefix-DLM, and so is its cached step while the canvas is unchanged.
  Rows sit in different blocks (start 0 and 4)."""
  _, model = loaded(family)
  gen = generate.Generator(model, tiny_tokenizer, _cfg(model))  # (layers unrolled on CPU)
  graphdef, state = gen.lm_graphdef, gen.lm_state
  shifted = model.cfg.lm.shifted_logits
  den = {m: generate.denoiser(m, graphdef, shifted, 4) for m in generate.CACHES}
  prompts = [generate.prompt_ids(model, tiny_tokenizer, r) for r in REQS[:2]]
  x, valid = generate.embed_prompts(model, prompts, 1024)
  canvas = jnp.asarray([[1, 2, 255, 255, 3, 255, 255, 255], [255] * 8], jnp.int32)
  start = jnp.asarray([0, 4], jnp.int32)
  full = den["none"].logits(canvas, start, None, state, x, valid)
  cache, first = gen._prefill(state, x, valid)
  cached = den["prefix"].logits(canvas, start, None, state, cache, first)
  refreshed, dual = den["dual"].refresh(canvas, start, state, cache, first)
  dual_step = den["dual"].logits(canvas, start, dual, state, cache, first)
  # the samplers' path: `setup` computes the canvas's rotary angles once, outside the loop
  ops = den["prefix"].setup(canvas, state, cache, first)
  assert len(ops) == 4 and ops[3][0].shape == (2, 8, model.cfg.lm.head_dim // 2)
  assert_close(den["prefix"].logits(canvas, start, None, *ops), cached, rel=1e-6)
  refreshed_r, dual_r = den["dual"].refresh(canvas, start, *ops)
  assert_close(refreshed_r, refreshed, rel=1e-6)
  assert_close(den["dual"].logits(canvas, start, dual_r, *ops), dual_step, rel=1e-6)
  lm = model.lm
  for b, (ids, images) in enumerate(prompts):
    s = int(start[b])
    ids = np.concatenate([ids, np.asarray(canvas[b])])[None]
    ref = np.asarray(model.logits(ids, images))[0]
    p = ref.shape[0] - 8
    expected = (ref[p - 1:-1] if shifted else ref[p:])[s:s + 4]
    assert_close(np.asarray(full)[b], expected)
    # Prefix-DLM reference: the same sequence, prompt rows blind to the canvas.
    xs, _ = model.embed_multimodal(ids, images)
    t = xs.shape[1]
    allowed = (np.arange(t)[None, :] < p) | (np.arange(t)[:, None] >= p)
    ref = np.asarray(_masked_logits(lm, xs, jnp.asarray(allowed)[None]))[0]
    expected = (ref[p - 1:-1] if shifted else ref[p:])[s:s + 4]
    assert_close(np.asarray(cached)[b], expected)
    assert_close(np.asarray(refreshed)[b], expected)
    assert_close(np.asarray(dual_step)[b], expected)


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
def test_dual_cache_step_reads_stale_keys_outside_its_block(loaded, tiny_tokenizer, family):
  """After the canvas changes, a dual-cache step differs from Prefix-DLM only through
  the stale keys outside its block: with one block spanning the canvas it is exact,
  with two blocks it is not (and refreshing makes it exact again)."""
  _, model = loaded(family)
  gen = generate.Generator(model, tiny_tokenizer, _cfg(model))
  graphdef, state = gen.lm_graphdef, gen.lm_state
  shifted = model.cfg.lm.shifted_logits
  x, valid = generate.embed_prompts(
      model, [generate.prompt_ids(model, tiny_tokenizer, REQS[0])], 1024)
  cache, first = gen._prefill(state, x, valid)
  before = jnp.full((1, 8), 255, jnp.int32)
  after = jnp.asarray([[255, 255, 255, 255, 7, 8, 9, 10]], jnp.int32)  # block 1 changed
  start = jnp.zeros((1,), jnp.int32)
  for lb, exact in ((8, True), (4, False)):
    prefix = generate.denoiser("prefix", graphdef, shifted, lb)
    dual = generate.denoiser("dual", graphdef, shifted, lb)
    _, stale = dual.refresh(before, start, state, cache, first)
    want = prefix.logits(after, start, None, state, cache, first)
    got = dual.logits(after, start, stale, state, cache, first)
    if exact:
      assert_close(got, want)
    else:
      assert np.abs(np.asarray(got) - np.asarray(want)).max() > 1e-3
      _, fresh = dual.refresh(after, start, state, cache, first)
      assert_close(dual.logits(after, start, fresh, state, cache, first), want)


@nnx.jit
def _masked_logits(lm, x, mask):
  return lm.logits_from_hidden(lm.hidden(x, mask_BTS=mask))


@pytest.mark.parametrize("family,cache", [("lavida-llada", "prefix"), ("lavida-llada", "none"),
                                          ("lavida-dream", "prefix")])
def test_batch_of_one_equals_padded_batch_of_four(loaded, tiny_tokenizer, family, cache):
  _, model = loaded(family)
  gen = generate.Generator(model, tiny_tokenizer, _cfg(model), cache=cache)
  alone = gen(REQS[:1])[0]
  # the scanned layers (the default off the CPU) give the same tokens
  scanned = generate.Generator(model, tiny_tokenizer, _cfg(model), cache=cache,
                               unroll_layers=False)
  assert scanned(REQS[:1])[0].ids == alone.ids
  batch = gen(REQS)
  assert batch[0].ids == alone.ids
  assert alone.nfe == 4 + int(cache != "none")
  assert all(model.cfg.lm.mask_id not in r.ids for r in batch)


def test_drafts_keep_fixed_tokens_and_compile_once(loaded, tiny_tokenizer):
  _, model = loaded("lavida-llada")
  gen = generate.Generator(model, tiny_tokenizer, _cfg(model), cache="prefix")
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
  gen = generate.Generator(model, tiny_tokenizer, _cfg(model), cache="prefix")
  reqs = [REQS[0], generate.Request("what ?", str(tmp_path / "missing.png")), REQS[2]]
  out = evaluate.run_generation(gen, reqs, batch_size=3)
  assert [r.error is None for r in out] == [True, False, True]
  assert "missing.png" in out[1].error
  assert out[0].ids == gen(REQS[:1])[0].ids


ADAPTIVE = [dict(decoder="threshold", threshold=0.5), dict(decoder="factor", factor=1.0)]


@pytest.mark.parametrize("family,cache,kw", [
    ("lavida-llada", "dual", dict(decoder="fixed")),
    ("lavida-llada", "prefix", ADAPTIVE[0]), ("lavida-llada", "dual", ADAPTIVE[0]),
    ("lavida-llada", "none", ADAPTIVE[1]), ("lavida-dream", "dual", ADAPTIVE[0]),
    ("lavida-dream", "dual", ADAPTIVE[1])])
def test_every_decoder_and_cache_batch_of_one_equals_padded_batch(loaded, tiny_tokenizer,
                                                                   family, cache, kw):
  """A row's answer and NFE do not depend on its batch-mates (different prompt
  lengths, images, a draft), and the adaptive decoders take fewer passes."""
  _, model = loaded(family)
  cfg = _cfg(model, gen_length=8, block_length=4, steps=8, **kw)
  gen = generate.Generator(model, tiny_tokenizer, cfg, cache=cache)
  reqs = REQS + [generate.Request(REQS[1].prompt, REQS[1].image, "red <|mdm_mask|> circle")]
  batch = gen(reqs)
  for i in (0, 2, 4):
    alone = gen(reqs[i:i + 1])[0]
    assert alone.ids == batch[i].ids, i
    if kw["decoder"] != "fixed":  # (fixed: a batch steps together, NFE is the batch's)
      assert alone.nfe == batch[i].nfe, i
  assert all(model.cfg.lm.mask_id not in r.ids for r in batch)
  assert batch[4].ids[0] == tiny_tokenizer.encode("red")[0]
  if kw["decoder"] == "fixed":
    assert {r.nfe for r in batch} == {8 + 1}
  else:
    assert all(1 < r.nfe <= 8 + 1 for r in batch)


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
def test_lookahead_gives_the_same_answers_in_no_more_passes(loaded, tiny_tokenizer, family):
  """The fixed decoder's lookahead over the prefix cache (canvases side by side,
  Dream's shifted logits, the batch-1 cache split by head on the CPU): every row's
  tokens are the plain decoder's, alone or in a ragged batch, in at most its passes."""
  import dataclasses
  _, model = loaded(family)
  cfg = _cfg(model, gen_length=8, block_length=8, steps=8)
  reqs = REQS + [generate.Request(REQS[1].prompt, REQS[1].image, "red <|mdm_mask|> circle")]
  plain = generate.Generator(model, tiny_tokenizer, cfg, cache="prefix")(reqs)
  for j in (1, 3):
    gen = generate.Generator(model, tiny_tokenizer, dataclasses.replace(cfg, lookahead=j),
                             cache="prefix")
    out = gen(reqs)
    assert [r.ids for r in out] == [r.ids for r in plain]
    assert all(r.nfe <= p.nfe for r, p in zip(out, plain))
    assert sum(r.nfe for r in out) < sum(p.nfe for p in plain)  # guesses do hold
    for i in (0, 4):
      alone = gen(reqs[i:i + 1])[0]
      assert (alone.ids, alone.nfe) == (out[i].ids, out[i].nfe), i
  with pytest.raises(ValueError, match="lookahead needs cache='prefix', got 'dual'"):
    generate.Generator(model, tiny_tokenizer, dataclasses.replace(cfg, lookahead=1),
                       cache="dual")


def test_dual_cache_threshold_and_lookahead_on_a_mesh_equal_one_device(reference_checkpoint,
                                                                       tiny_tokenizer, loaded):
  """Parameters sharded over 8 fake devices (data x fsdp x tensor = 2 x 2 x 2)."""
  import lavida_jax
  from lavida_jax import sharding

  _, folder = reference_checkpoint("lavida-llada")
  _, model = loaded("lavida-llada")
  sharded = lavida_jax.load_pretrained(folder, mesh=sharding.make_mesh((2, 2, 2)))
  cfg = _cfg(model, decoder="threshold", threshold=0.5)
  one = generate.Generator(model, tiny_tokenizer, cfg, cache="dual")(REQS)
  eight = generate.Generator(sharded, tiny_tokenizer, cfg, cache="dual")(REQS)
  assert [r.ids for r in one] == [r.ids for r in eight]
  assert [r.nfe for r in one] == [r.nfe for r in eight]
  # and the fixed decoder's lookahead: canvases side by side, rows at their own pace
  import dataclasses
  cfg = dataclasses.replace(_cfg(model, block_length=8, steps=8), lookahead=2)
  one = generate.Generator(model, tiny_tokenizer, cfg, cache="prefix")(REQS)
  eight = generate.Generator(sharded, tiny_tokenizer, cfg, cache="prefix")(REQS)
  assert [(r.ids, r.nfe) for r in one] == [(r.ids, r.nfe) for r in eight]


def test_the_clis_take_the_decoder_and_cache_flags(reference_checkpoint, tiny_tokenizer,
                                                   tmp_path):
  """python -m lavida_jax.generate / evaluate with --decoder/--cache (subprocesses): the
  answers equal the Python API's; a bad flag value stops with its name, no traceback."""
  import json
  import os
  import subprocess
  import sys

  import lavida_jax

  _, folder = reference_checkpoint("lavida-llada")
  image = tmp_path / "a.png"
  REQS[0].image.save(image)
  flags = [f"--checkpoint={folder}", f"--tokenizer={tiny_tokenizer.name}", "--gen_length=8",
           "--block_length=4", "--decoder=threshold", "--threshold=0.5", "--cache=dual"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda mod, *args: subprocess.run(
      [sys.executable, "-m", mod, *flags, *args], cwd=root, capture_output=True, text=True,
      timeout=300, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  model = lavida_jax.load_pretrained(folder)
  cfg = _cfg(model, decoder="threshold", threshold=0.5)
  gen = generate.Generator(model, tiny_tokenizer, cfg, cache="dual")
  want = gen([generate.Request(REQS[0].prompt, str(image))])[0]

  out = run("lavida_jax.generate", f"--image={image}", f"--prompt={REQS[0].prompt}")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == want.text and f"nfe={want.nfe}" in out.stderr

  data = tmp_path / "qa.jsonl"
  data.write_text(json.dumps({"image": "a.png", "conversations": [
      {"from": "human", "value": REQS[0].prompt}, {"from": "gpt", "value": want.text}]}) + "\n")
  out = run("lavida_jax.evaluate", f"--data={data}", f"--image_folder={tmp_path}")
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout[out.stdout.index("{"):])
  assert report["threshold,cache=dual"]["exact_match"] == 1.0
  assert report["threshold,cache=dual"]["nfe"] == want.nfe

  out = run("lavida_jax.generate", f"--image={image}", "--prompt=hi", "--threshold=1.5")
  assert out.returncode != 0 and "threshold must be in (0, 1]" in out.stderr
  assert "Traceback" not in out.stderr
  out = run("lavida_jax.generate", f"--image={image}", "--prompt=hi", "--decoder=fixed",
            "--lookahead=1")  # with the flags' --cache=dual
  assert out.returncode != 0 and "lookahead needs cache='prefix', got 'dual'" in out.stderr
  assert "Traceback" not in out.stderr
