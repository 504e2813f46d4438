"""The adaptive decoders (threshold, factor) and the dual cache's refresh schedule
(SPEC §14), against a NumPy re-statement of the rules run row by row, on the toy
denoisers of test_sampler: a coupled model (the commit order changes the result)
and a toy dual cache whose steps see a snapshot of the canvas outside the block,
taken at each block's first step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavida_jax.diffusion import sampler as smp
from tests.test_sampler import (COUPLING, EMBED, EOS, MASK, TABLE, cfg_of, coupled_jax,
                                drafts)

L, LB = 16, 8


def keys_jax(canvas):
  """Per-position features that depend on the whole canvas (like K/V in attention)."""
  e = jnp.asarray(EMBED)[canvas]
  return e + 0.5 * e.mean(axis=1, keepdims=True)


def keys_np(x):
  e = EMBED.astype(np.float64)[x]
  return e + 0.5 * e.mean(axis=0, keepdims=True)


def logits_jax(keys):
  return jnp.asarray(TABLE)[None] + jnp.einsum("ij,bjv->biv", jnp.asarray(COUPLING), keys)


def logits_np(keys):
  return TABLE.astype(np.float64) + COUPLING.astype(np.float64) @ keys


def toy_dual():
  """Refresh: the whole canvas, caching every position's features. Step: fresh
  features inside the block, the cached (stale) ones outside, as with K/V."""
  def refresh(canvas, start):
    keys = keys_jax(canvas)
    return smp.block_slice(logits_jax(keys), start, LB), keys

  def logits(canvas, start, cache):
    pos = jnp.arange(L)[None, :, None]
    inside = (pos >= start[:, None, None]) & (pos < start[:, None, None] + LB)
    keys = jnp.where(inside, keys_jax(canvas), cache)
    return smp.block_slice(logits_jax(keys), start, LB)

  return smp.Denoiser(logits, refresh)


def plain():
  return smp.full_canvas_denoiser(lambda c: logits_jax(keys_jax(c)), LB)


def model_np(x, lo, hi, cache):
  """Block logits of the toy (cache: features at the last refresh, or None)."""
  keys = keys_np(x)
  if cache is not None:
    keys[:lo], keys[hi:] = cache[:lo], cache[hi:]
  return logits_np(keys)[lo:hi].copy()


def _softmax(z):
  p = np.exp(z - z.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def select_np(conf, eligible, cfg):
  """The decoders' rules for one row's block (float64); returns (commit, margin)."""
  c = np.where(eligible, conf, -np.inf)
  if cfg.decoder == "threshold":
    commit = eligible & (c >= cfg.threshold)
    margin = np.abs(c[eligible] - cfg.threshold).min()
    if not commit.any():
      commit = np.zeros_like(eligible)
      commit[np.argmax(c)] = True
    return commit, margin
  order = np.argsort(-c, kind="stable")
  s = c[order]
  n = np.arange(1, len(s) + 1)
  ok = np.isfinite(s) & ((n + 1) * (1 - s) < cfg.factor)
  k = max(int(n[ok].max()) if ok.any() else 0, 1)
  commit = np.zeros_like(eligible)
  commit[order[:k]] = True
  commit &= eligible
  fin = np.isfinite(s)
  margin = np.abs((n + 1) * (1 - s) - cfg.factor)[fin].min()
  return commit, margin


def reference_adaptive(row0, cfg, dual: bool):
  """One row, literally: first block with a mask (before a stop token), refresh at a
  new block (dual), commit by the rule; -> (row, steps, smallest decision margin)."""
  x = np.array(row0, np.int64)
  cache, prev, steps, gap = None, -1, 0, np.inf
  while True:
    masks = x == MASK
    stops = np.isin(x, cfg.stop_ids)
    if stops.any():
      masks &= np.arange(L) < np.argmax(stops)
    if not masks.any():
      break
    blk = int(np.argmax(masks.reshape(-1, LB).any(-1)))
    lo, hi = blk * LB, (blk + 1) * LB
    if dual and blk != prev:
      cache = keys_np(x)
    logits = model_np(x, lo, hi, cache)
    logits[:, list(cfg.forbid_ids) + [MASK]] = -np.inf
    x0 = logits.argmax(-1)
    conf = _softmax(logits)[np.arange(LB), x0]
    top2 = np.sort(logits, -1)[:, -2:]
    eligible = x[lo:hi] == MASK
    gap = min(gap, (top2[:, 1] - top2[:, 0])[eligible].min())
    commit, margin = select_np(conf, eligible, cfg)
    gap = min(gap, margin)
    x[lo:hi] = np.where(commit, x0, x[lo:hi])
    steps, prev = steps + 1, blk
  if np.isin(x, cfg.stop_ids).any():
    x[x == MASK] = x[np.argmax(np.isin(x, cfg.stop_ids))]
  return x, steps, gap


def run(den, canvas0, cfg, counts=None):
  counts = (smp.transfer_schedule(canvas0, cfg) if counts is None else counts)
  out, hist, steps = smp.make_sampler(den, cfg, return_history=True, return_steps=True)(
      canvas0, counts, jax.random.key(0))
  return np.asarray(out), np.asarray(hist), np.asarray(steps)


def ragged(n=8, seed=3):
  """n rows: all masks, drafts with fixed runs, one block fully fixed."""
  return np.concatenate([drafts(nrow=3, seed=seed), drafts(nrow=n - 3, seed=seed + 1)])


DECODERS = [dict(decoder="threshold", threshold=0.9), dict(decoder="threshold", threshold=0.5),
            dict(decoder="factor", factor=1.0), dict(decoder="factor", factor=2.5)]


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("kw", DECODERS, ids=lambda kw: f"{kw['decoder']}-{list(kw.values())[1]}")
def test_adaptive_decoders_match_the_rules(kw, dual):
  cfg = cfg_of(**kw)
  canvas0 = ragged()
  out, hist, steps = run(toy_dual() if dual else plain(), canvas0, cfg)
  for b in range(len(canvas0)):
    ref, ref_steps, gap = reference_adaptive(canvas0[b], cfg, dual)
    assert gap > 1e-5, gap  # no decision within float32 rounding
    np.testing.assert_array_equal(out[b], ref, err_msg=f"row {b}")
    assert steps[b] == ref_steps
  fixed = canvas0 != MASK
  np.testing.assert_array_equal(out[fixed], canvas0[fixed])
  assert (out != MASK).all()
  # parallel: fewer steps than masks, at least one commit per step, rows finish apart
  assert (steps <= (canvas0 == MASK).sum(1)).all() and steps.sum() < (canvas0 == MASK).sum()
  assert len(set(steps.tolist())) > 1
  assert (hist[-1] == out).all() and (hist[steps.max() - 1] == out).all()


@pytest.mark.parametrize("kw", [dict(decoder="fixed", steps=8), *DECODERS[::2]],
                         ids=lambda kw: kw["decoder"])
@pytest.mark.parametrize("dual", [False, True])
def test_batch_of_one_equals_its_row_in_a_ragged_batch_of_eight(kw, dual):
  cfg = cfg_of(**kw)
  den = toy_dual() if dual else plain()
  batch = ragged()
  out, _, steps = run(den, batch, cfg)
  for b in range(len(batch)):
    alone, _, steps_alone = run(den, batch[b:b + 1], cfg)
    np.testing.assert_array_equal(alone[0], out[b], err_msg=f"row {b}")
    if kw["decoder"] != "fixed":  # fixed rows share the batch's steps
      assert steps_alone[0] == steps[b]


def test_fixed_with_the_dual_cache_refreshes_at_each_block_start():
  """fixed + toy dual == the LLaDA loop whose model sees the canvas outside the block
  as it was at the block's first step."""
  cfg = cfg_of(steps=8)
  canvas0 = ragged()
  counts = smp.transfer_schedule(canvas0, cfg)
  out, _, _ = run(toy_dual(), canvas0, cfg)
  for b in range(len(canvas0)):
    x = canvas0[b].astype(np.int64).copy()
    for blk in range(2):
      lo, hi = blk * LB, (blk + 1) * LB
      cache = keys_np(x)
      for s in range(cfg.steps_per_block):
        k = counts[b, blk, s]
        if not k:
          continue
        logits = model_np(x, lo, hi, cache)
        logits[:, [EOS, 7, MASK]] = -np.inf
        x0 = logits.argmax(-1)
        conf = np.where(x[lo:hi] == MASK, _softmax(logits)[np.arange(LB), x0], -np.inf)
        sel = np.argsort(-conf, kind="stable")[:k]
        x[lo + sel] = x0[sel]
    np.testing.assert_array_equal(out[b], x, err_msg=f"row {b}")
  # the stale features matter: refreshing every step gives another result
  assert (out != run(plain(), canvas0, cfg)[0]).any()


@pytest.mark.parametrize("kw", [{}, DECODERS[0]], ids=["fixed", "threshold"])
def test_setup_runs_once_and_its_operands_reach_every_pass(kw):
  """Denoiser.setup's operands (here the logits table, scaled) are what every pass
  reads: the same canvas as a denoiser given the scaled table directly; it runs at
  trace time, once per call, not once per step."""
  cfg = cfg_of(steps=8, **kw)
  canvas0, calls = ragged(), []

  def setup(canvas, table):
    calls.append(canvas.shape)
    return (2.0 * table,)

  logits = lambda canvas, start, cache, table: smp.block_slice(
      table[None] + jnp.einsum("ij,bjv->biv", jnp.asarray(COUPLING), keys_jax(canvas)),
      start, LB)
  counts = smp.transfer_schedule(canvas0, cfg)
  table = jnp.asarray(TABLE)
  ours = smp.make_sampler(smp.Denoiser(logits, setup=setup), cfg)(
      canvas0, counts, jax.random.key(0), table)
  want = smp.make_sampler(smp.Denoiser(logits), cfg)(canvas0, counts, jax.random.key(0),
                                                     2.0 * table)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(want))
  assert (np.asarray(ours) != np.asarray(smp.make_sampler(smp.Denoiser(logits), cfg)(
      canvas0, counts, jax.random.key(0), table))).any()  # the scaling matters
  assert calls == [canvas0.shape]


def test_a_row_stops_once_every_mask_left_is_after_a_stop_token():
  """EOS committed early ends the row: the masks after it are filled with EOS and
  take no step; masks before it are still decoded."""
  def eos_at_5(canvas):
    logits = coupled_jax(canvas)
    return logits.at[:, 5, EOS].set(50.0)  # certain EOS at position 5

  cfg = cfg_of(decoder="threshold", threshold=0.9, forbid_ids=(7,), stop_ids=(EOS,))
  canvas0 = np.full((2, L), MASK)
  out, _, steps = run(smp.full_canvas_denoiser(eos_at_5, LB), canvas0, cfg)
  # (block 0's other masks may be committed in EOS's step; block 1 never starts)
  assert (out[:, 5] == EOS).all() and (out[:, 8:] == EOS).all() and (out != MASK).all()
  # without stop ids the second block is decoded too, which takes more steps
  full, _, steps_full = run(smp.full_canvas_denoiser(eos_at_5, LB), canvas0,
                            cfg_of(decoder="threshold", threshold=0.9, forbid_ids=(7,)))
  assert (steps_full > steps).all() and (full[:, 8:] != EOS).any()


def test_adaptive_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown decoder 'fast'"):
    cfg_of(decoder="fast")
  with pytest.raises(ValueError, match="threshold must be in"):
    cfg_of(decoder="threshold", threshold=1.5)
  with pytest.raises(ValueError, match="confidence must be low_confidence or margin"):
    cfg_of(decoder="factor", confidence="entropy")


@pytest.mark.parametrize("kw", [dict(decoder="fixed", steps=8), DECODERS[0]],
                         ids=lambda kw: kw["decoder"])
def test_on_step_sees_every_step_of_the_history(kw):
  """The streaming hook: called once per step, in order, with the history's canvases
  and each row's step count so far."""
  cfg = cfg_of(**kw)
  canvas0 = ragged()
  out, hist, steps = run(plain(), canvas0, cfg)
  seen = []
  sampler = smp.make_sampler(plain(), cfg, on_step=lambda c, s: seen.append((c, s)))
  jax.block_until_ready(sampler(canvas0, smp.transfer_schedule(canvas0, cfg),
                                jax.random.key(0)))
  assert len(seen) == (len(hist) if kw["decoder"] == "fixed" else steps.max())
  for t, (canvas, count) in enumerate(seen):
    np.testing.assert_array_equal(canvas, hist[t])
  np.testing.assert_array_equal(seen[-1][1], steps)
  assert all((b[1] >= a[1]).all() for a, b in zip(seen, seen[1:]))
