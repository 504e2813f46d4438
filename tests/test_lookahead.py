"""The fixed decoder's lookahead (exact speculation, sampler docstring): the same
tokens, history and per-row independence as the plain fixed decoder, in fewer
passes; on the coupled toy of test_sampler (a commit changes every logit, so
guesses fail) and the table toy (logits never change, so every guess holds)."""
import functools

from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavida_jax.diffusion import sampler as smp
from tests.test_decoders import ragged
from tests.test_sampler import MASK, cfg_of, coupled_jax, table_jax


def with_canvases(fn, lb):
  """A Denoiser from full-canvas logits that also takes [B, S, L] canvases."""
  def logits(canvas, start, cache):
    del cache
    if canvas.ndim == 2:
      return smp.block_slice(fn(canvas), start, lb)
    b, s, length = canvas.shape
    out = smp.block_slice(fn(canvas.reshape(b * s, length)), jnp.repeat(start, s), lb)
    return out.reshape(b, s, lb, -1)
  return smp.Denoiser(logits, canvases=True)


def run(den, canvas0, cfg):
  counts = smp.transfer_schedule(canvas0, cfg)
  out, hist, steps = smp.make_sampler(den, cfg, return_history=True, return_steps=True)(
      canvas0, counts, jax.random.key(1))
  return np.asarray(out), np.asarray(hist), np.asarray(steps), counts


CONFIGS = [dict(steps=8), dict(steps=16, block_length=16), dict(steps=4, schedule="linear"),
           dict(steps=8, temperature=1.0), dict(steps=8, confidence="random"),
           dict(steps=8, confidence="margin")]


@pytest.mark.parametrize("lookahead", [1, 3])
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("toy", ["coupled", "table"])
def test_lookahead_gives_the_fixed_decoders_tokens_and_history(kw, lookahead, toy):
  fn = coupled_jax if toy == "coupled" else table_jax
  canvas0 = ragged()  # all masks, drafts, a fully fixed block (steps without commits)
  base = cfg_of(**kw)
  out, hist, steps, counts = run(with_canvases(fn, base.block_length), canvas0, base)
  la = cfg_of(**kw, lookahead=lookahead)
  out_la, hist_la, passes, _ = run(with_canvases(fn, base.block_length), canvas0, la)
  np.testing.assert_array_equal(out_la, out)
  np.testing.assert_array_equal(hist_la, hist)
  live = (counts > 0).reshape(len(canvas0), -1).sum(-1)
  assert (passes <= live).all() and (passes >= np.ceil(live / (lookahead + 1))).all()
  if (toy == "table" and kw.get("confidence") != "random" and "temperature" not in kw
      and base.steps_per_block > 2):  # a block's first pass has no ranking to guess from
    assert passes.sum() < live.sum()  # guesses from an unchanged ranking hold


@pytest.mark.parametrize("lookahead", [1, 3, 15])
def test_every_guess_holds_when_the_logits_never_change(lookahead):
  """One block, one commit per step, a constant ranking: the first pass has nothing
  to guess from, every later one makes 1 + lookahead steps (the last fewer)."""
  cfg = cfg_of(steps=16, block_length=16, lookahead=lookahead)
  canvas0 = np.full((2, 16), MASK)
  out, _, passes, _ = run(with_canvases(table_jax, 16), canvas0, cfg)
  assert passes.tolist() == [1 + int(np.ceil(15 / (lookahead + 1)))] * 2
  base = cfg_of(steps=16, block_length=16)
  np.testing.assert_array_equal(out, run(with_canvases(table_jax, 16), canvas0, base)[0])


@pytest.mark.parametrize("kw", [dict(steps=8), dict(steps=8, temperature=1.0)])
def test_a_rows_tokens_and_passes_do_not_depend_on_its_batch(kw):
  """Rows move at their own pace: a row alone makes the same passes (sampling keys
  fold in the row's index: with a temperature, row 0 alone is row 0)."""
  cfg = cfg_of(**kw, lookahead=2)
  den = with_canvases(coupled_jax, cfg.block_length)
  batch = ragged()
  out, _, passes, _ = run(den, batch, cfg)
  assert len(set(passes.tolist())) > 1
  for b in range(len(batch)) if cfg.temperature == 0 else (0,):
    alone, _, p, _ = run(den, batch[b:b + 1], cfg)
    np.testing.assert_array_equal(alone[0], out[b], err_msg=f"row {b}")
    assert p[0] == passes[b]


def test_lookahead_errors_name_the_problem():
  with pytest.raises(ValueError, match="lookahead needs the fixed decoder"):
    cfg_of(decoder="threshold", lookahead=1)
  with pytest.raises(ValueError, match="lookahead must be an int >= 0"):
    cfg_of(lookahead=-1)
  plain = smp.full_canvas_denoiser(coupled_jax, 8)
  with pytest.raises(ValueError, match=r"lookahead needs a Denoiser .*\[B, S, L\]"):
    run(plain, ragged(), cfg_of(lookahead=1))


FUZZ_CONFIGS = [dict(steps=8, lookahead=1), dict(steps=16, block_length=16, lookahead=3),
                dict(steps=4, schedule="linear", lookahead=2),
                dict(steps=8, temperature=0.7, lookahead=2)]


@functools.lru_cache(maxsize=None)
def _sampler(i: int, lookahead: bool):
  kw = dict(FUZZ_CONFIGS[i])
  if not lookahead:
    kw.pop("lookahead")
  cfg = cfg_of(**kw)
  return cfg, smp.make_sampler(with_canvases(coupled_jax, cfg.block_length), cfg,
                               return_steps=True)


@settings(max_examples=24, derandomize=True, database=None, deadline=None)
@given(st.integers(0, len(FUZZ_CONFIGS) - 1), st.integers(0, 2**31 - 1),
       st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_fuzz_lookahead_equals_the_fixed_decoder(i, seed, masked, key):
  """Random drafts (each position a mask with probability `masked`), keys and configs:
  the lookahead's canvas is the fixed decoder's, in no more passes than live steps."""
  cfg, plain = _sampler(i, False)
  _, ahead = _sampler(i, True)
  r = np.random.default_rng(seed)
  canvas0 = r.integers(0, MASK, (3, 16))
  canvas0[r.random((3, 16)) < masked] = MASK
  counts = smp.transfer_schedule(canvas0, cfg)
  want, _ = plain(canvas0, counts, jax.random.key(key))
  got, passes = ahead(canvas0, counts, jax.random.key(key))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert (np.asarray(passes) <= (counts > 0).reshape(3, -1).sum(-1)).all()
