"""The masked-diffusion sampler (SPEC §7.1, §7.4) against an independent
step-by-step NumPy re-implementation of LLaDA's `generate` loop, on toy
denoisers: a fixed logits table, and logits that depend on the canvas (so the
commit order changes the result)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavida_jax.diffusion import sampler as smp
from lavida_jax.diffusion import schedule as sch

V = 24
MASK = 20  # inside the vocabulary, so the model can "predict" it
EOS, BOS = 3, 7


def cfg_of(**kw):
  base = dict(gen_length=16, block_length=8, steps=8, mask_id=MASK,
              forbid_ids=(EOS, BOS))
  base.update(kw)
  return smp.SamplerConfig(**base)


# ---------------------------------------------------------------- toy models

rs = np.random.RandomState(0)
TABLE = (3 * rs.randn(16, V)).astype(np.float32)  # [L, V]
COUPLING = (rs.randn(16, 16) * 0.5).astype(np.float32)  # [L, L]
EMBED = rs.randn(V, V).astype(np.float32)  # [V, V]
EMBED[MASK] = 0.0


def table_jax(canvas):
  return jnp.broadcast_to(jnp.asarray(TABLE), canvas.shape + (V,))


def table_np(canvas):
  return np.broadcast_to(TABLE.astype(np.float64), canvas.shape + (V,))


def coupled_jax(canvas):
  """logits[b, i] = TABLE[i] + Σ_j COUPLING[i, j] · EMBED[canvas[b, j]]."""
  return jnp.asarray(TABLE)[None] + jnp.einsum(
      "ij,bjv->biv", jnp.asarray(COUPLING), jnp.asarray(EMBED)[canvas])


def coupled_np(canvas):
  return TABLE.astype(np.float64)[None] + np.einsum(
      "ij,bjv->biv", COUPLING.astype(np.float64), EMBED.astype(np.float64)[canvas])


# ---------------------------------------------------------------- reference

def reference(logits_fn, canvas0, counts, cfg, rng=None):
  """LLaDA's loop, literally: full-canvas logits, −∞ confidence after the
  block and at non-masks, top-k per row (stable, by position), float64.

  Returns (final canvas, history [S, B, L], gap): gap is the smallest
  margin of any decision (top-1 vs top-2 token at a mask, last committed vs
  first skipped confidence); the comparison is only meaningful where float32
  rounding cannot swap them.
  """
  x = np.array(canvas0, np.int64)
  nrow, L = x.shape
  lb, nb, spb = cfg.block_length, cfg.num_blocks, cfg.steps_per_block
  history, gap = [], np.inf
  for blk in range(nb):
    lo, hi = blk * lb, (blk + 1) * lb
    for s in range(spb):
      t = blk * spb + s
      k = counts[:, blk, s]
      if not k.any():
        history.append(x.copy())
        continue
      logits = np.array(logits_fn(x), np.float64)
      logits[..., list(cfg.forbid_ids) + [cfg.mask_id]] = -np.inf
      noised = logits
      if cfg.temperature > 0 or cfg.confidence == "random":
        # the sampler's documented noise: per row and step one uniform draw
        # u [Lb, V + 1] (temperature > 0) or [Lb, 1] over the block,
        # Gumbel −log(−log u[:, :V]), random confidence u[:, -1]
        width = V + 1 if cfg.temperature > 0 else 1
        u = np.stack([np.asarray(jax.random.uniform(
            smp.step_key(rng, b, t), (lb, width), minval=np.finfo(np.float32).tiny,
            maxval=1.0)) for b in range(nrow)])
      if cfg.temperature > 0:
        g = np.zeros(logits.shape, np.float32)
        g[:, lo:hi] = -np.log(-np.log(u[..., :V]))
        noised = logits.astype(np.float32) / np.float32(cfg.temperature) + g
      x0 = noised.argmax(-1)
      top2 = np.sort(noised[:, lo:hi], -1)[..., -2:]
      at_mask = x[:, lo:hi] == cfg.mask_id
      gap = min(gap, (top2[..., 1] - top2[..., 0])[at_mask].min(initial=np.inf))
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      if cfg.confidence == "low_confidence":
        conf = np.take_along_axis(p, x0[..., None], -1)[..., 0]
      elif cfg.confidence == "margin":
        top = np.sort(p, -1)[..., ::-1]
        conf = top[..., 0] - top[..., 1]
      elif cfg.confidence == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
          conf = np.where(p > 0, p * np.log(p), 0.0).sum(-1)
      elif cfg.confidence == "random":
        conf = np.zeros((nrow, L))
        conf[:, lo:hi] = u[..., -1]
      conf[:, hi:] = -np.inf
      x0 = np.where(x == cfg.mask_id, x0, x)
      conf = np.where(x == cfg.mask_id, conf, -np.inf)
      for b in range(nrow):
        order = np.argsort(-conf[b], kind="stable")
        sel = order[:k[b]]
        x[b, sel] = x0[b, sel]
        if 0 < k[b] < L and np.isfinite(conf[b, order[k[b]]]):
          gap = min(gap, conf[b, order[k[b] - 1]] - conf[b, order[k[b]]])
      history.append(x.copy())
  return x, np.stack(history), gap


def drafts(nrow=3, seed=1):
  """Rows of fixed text with runs of masks (block 1 of row 1 fully fixed)."""
  r = np.random.RandomState(seed)
  canvas = r.randint(0, V, size=(nrow, 16))
  canvas[canvas == MASK] = 0
  canvas[r.rand(nrow, 16) < 0.6] = MASK
  canvas[0] = MASK
  canvas[1, 8:] = [1, 2, 4, 5, 6, 8, 9, 10]
  canvas[1, :8] = MASK
  return canvas


@functools.lru_cache(maxsize=None)
def history_sampler(denoise, cfg):
  return smp.make_sampler(denoise, cfg, return_history=True)


def run(denoise, canvas0, cfg, rng=0, counts=None):
  """(final canvas, history [S, B, L], counts) of the jitted sampler."""
  counts = smp.transfer_schedule(canvas0, cfg) if counts is None else counts
  out, hist = history_sampler(denoise, cfg)(canvas0, counts, jax.random.key(rng))
  return np.asarray(out), np.asarray(hist), counts


# ---------------------------------------------------------------- greedy

def test_greedy_table_is_argmax_and_follows_llada_order():
  cfg = cfg_of(steps=8)
  canvas0 = np.full((1, 16), MASK)
  out, hist, counts = run(table_jax, canvas0, cfg)
  allowed = TABLE.copy()
  allowed[:, [EOS, BOS, MASK]] = -np.inf
  np.testing.assert_array_equal(out[0], allowed.argmax(-1))
  ref, ref_hist, gap = reference(table_np, canvas0, counts, cfg)
  assert gap > 1e-4
  np.testing.assert_array_equal(hist, ref_hist)
  np.testing.assert_array_equal(out, ref)
  # the order is not trivial: the shift schedule commits more early, out of order
  first = np.flatnonzero(hist[0, 0] != MASK)
  assert len(first) == counts[0, 0, 0] > 1 and list(first) != list(range(len(first)))


@pytest.mark.parametrize("confidence,steps,schedule",
                         [(c, 8, "shift") for c in smp.CONFIDENCES]
                         + [("low_confidence", 32, "none"),
                            ("entropy", 4, "cosine")])
def test_coupled_matches_reference(confidence, steps, schedule):
  cfg = cfg_of(steps=steps, schedule=schedule, confidence=confidence)
  canvas0 = drafts()
  out, hist, counts = run(coupled_jax, canvas0, cfg, rng=5)
  ref, ref_hist, gap = reference(coupled_np, canvas0, counts, cfg,
                                 rng=jax.random.key(5))
  assert gap > 1e-5, gap
  for t in range(len(hist)):
    np.testing.assert_array_equal(hist[t], ref_hist[t], err_msg=f"step {t}")
  np.testing.assert_array_equal(out, ref)


def test_order_matters_for_the_coupled_model():
  # Sanity check of the toy model (NumPy only): committing in another order
  # gives another canvas, so the reference comparisons test the order.
  canvas0 = np.full((1, 16), MASK)
  one = cfg_of(steps=16, block_length=16)
  slow = reference(coupled_np, canvas0, smp.transfer_schedule(canvas0, one), one)
  two = cfg_of(steps=2, block_length=16)
  fast = reference(coupled_np, canvas0, smp.transfer_schedule(canvas0, two), two)
  assert (slow[0] != fast[0]).any()


def test_ties_broken_by_position():
  cfg = cfg_of(steps=16, schedule="none")
  same = lambda c: jnp.broadcast_to(jnp.asarray(TABLE[0]), c.shape + (V,))
  _, hist, _ = run(same, np.full((2, 16), MASK), cfg)
  committed_at = (hist != MASK).argmax(0)  # first step where each is set
  np.testing.assert_array_equal(committed_at, np.tile(np.arange(16), (2, 1)))


# ---------------------------------------------------------------- invariants

@pytest.mark.parametrize("steps,schedule", [(32, "shift"), (6, "cosine")])
def test_invariants(steps, schedule):
  cfg = cfg_of(steps=steps, schedule=schedule, temperature=1.0,
               confidence="random")
  canvas0 = drafts(nrow=4, seed=2)
  out, hist, counts = run(coupled_jax, canvas0, cfg, rng=3)
  states = np.concatenate([canvas0[None], hist])  # [S + 1, B, L]
  fixed = canvas0 != MASK
  spb = cfg.steps_per_block
  for t in range(len(hist)):
    before, after = states[t], states[t + 1]
    changed = before != after
    blk = t // spb
    # exactly k commits per row, all inside the current block, all at masks
    np.testing.assert_array_equal(changed.sum(1), counts[:, blk, t % spb])
    assert not changed[:, :blk * 8].any() and not changed[:, (blk + 1) * 8:].any()
    assert (before[changed] == MASK).all() and (after[changed] != MASK).all()
    # masks never come back, set tokens never change
    np.testing.assert_array_equal(after[before != MASK], before[before != MASK])
  np.testing.assert_array_equal(out[fixed], canvas0[fixed])
  assert (out != MASK).all()
  generated = out[~fixed]
  assert not np.isin(generated, [EOS, BOS]).any()
  # the row without masks in block 1 never changed there
  assert counts[1, 1].sum() == 0


def test_counts_zero_or_too_large():
  cfg = cfg_of()
  canvas0 = drafts()
  out, _, _ = run(coupled_jax, canvas0, cfg, counts=np.zeros((3, 2, 4), np.int32))
  np.testing.assert_array_equal(out, canvas0)
  # k above the remaining masks commits every mask of the block, nothing else
  out, hist, _ = run(coupled_jax, canvas0, cfg,
                     counts=np.full((3, 2, 4), 16, np.int32))
  fixed = canvas0 != MASK
  np.testing.assert_array_equal(hist[0][fixed], canvas0[fixed])
  assert (hist[0][:, :8] != MASK).all() and (hist[0][:, 8:] == canvas0[:, 8:]).all()
  np.testing.assert_array_equal(out[fixed], canvas0[fixed])


# ---------------------------------------------------------------- randomness

def test_temperature_reproducible_and_key_dependent():
  cfg = cfg_of(steps=8, temperature=1.0)
  canvas0 = np.full((4, 16), MASK)
  a, _, _ = run(table_jax, canvas0, cfg, rng=0)
  b, _, _ = run(table_jax, canvas0, cfg, rng=0)
  c, _, _ = run(table_jax, canvas0, cfg, rng=1)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert (a[0] != a[1]).any()  # rows draw different noise
  greedy, _, _ = run(table_jax, canvas0, cfg_of(steps=8))
  assert (a != greedy).any()


@pytest.mark.parametrize("temperature,confidence",
                         [(0.5, "low_confidence"), (2.0, "random")])
def test_temperature_matches_reference(temperature, confidence):
  cfg = cfg_of(steps=8, temperature=temperature, confidence=confidence)
  canvas0 = drafts()
  out, hist, counts = run(table_jax, canvas0, cfg, rng=7)
  ref, ref_hist, gap = reference(table_np, canvas0, counts, cfg,
                                 rng=jax.random.key(7))
  assert gap > 1e-5, gap
  np.testing.assert_array_equal(hist, ref_hist)


# ---------------------------------------------------------------- batching

@pytest.mark.parametrize("temperature,confidence",
                         [(0.0, "low_confidence"), (1.0, "random")])
def test_rows_are_independent(temperature, confidence):
  cfg = cfg_of(steps=8, temperature=temperature, confidence=confidence)
  batch = drafts(nrow=4, seed=4)
  alone = batch[:1]
  out_b, _, _ = run(coupled_jax, batch, cfg, rng=2)
  out_1, _, _ = run(coupled_jax, alone, cfg, rng=2)
  np.testing.assert_array_equal(out_b[0], out_1[0])
  # ...and the other rows really are different problems
  assert len({tuple(r) for r in batch}) == 4


# ---------------------------------------------------------------- compilation

def test_make_sampler_compiles_once_per_shape():
  traces = []

  def denoise(canvas, table):
    traces.append(canvas.shape)  # runs at trace time only
    return jnp.broadcast_to(table, canvas.shape + (V,))

  cfg = cfg_of(steps=8)
  sampler = smp.make_sampler(denoise, cfg)
  canvas0 = np.full((2, 16), MASK)
  counts = smp.transfer_schedule(canvas0, cfg)
  outs = []
  for i in range(3):
    table = jnp.asarray(np.roll(TABLE, i, axis=1))  # operand: new values
    outs.append(np.asarray(sampler(canvas0, counts, jax.random.key(i), table)))
  assert sampler._cache_size() == 1 and len(traces) == 1
  assert (outs[0] != outs[1]).any()  # the operand is an argument, not a constant
  sampler(np.full((3, 16), MASK), np.concatenate([counts, counts[:1]]),
          jax.random.key(0), jnp.asarray(TABLE))
  assert sampler._cache_size() == 2 and len(traces) == 2


def test_sample_is_jittable_directly():
  cfg = cfg_of()
  canvas0 = drafts()
  counts = smp.transfer_schedule(canvas0, cfg)
  jitted = jax.jit(smp.sample, static_argnums=(0, 4))
  np.testing.assert_array_equal(
      jitted(coupled_jax, canvas0, counts, jax.random.key(0), cfg),
      run(coupled_jax, canvas0, cfg)[0])


def test_steps_without_commits_skip_the_forward_pass():
  calls = []

  def denoise(canvas):
    jax.debug.callback(lambda: calls.append(1))
    return coupled_jax(canvas)

  cfg = cfg_of(steps=32)  # 16 steps per block of 8: 8 trailing zero columns
  full = np.full((2, 16), MASK)
  counts = smp.transfer_schedule(full, cfg)
  jax.block_until_ready(smp.make_sampler(denoise, cfg)(full, counts,
                                                       jax.random.key(0)))
  jax.effects_barrier()
  assert len(calls) == smp.forward_passes(counts) == sch.nfe(16, 8, 32) == 16
  calls.clear()
  canvas0 = drafts()[1:]  # no all-mask row
  counts = smp.transfer_schedule(canvas0, cfg)
  jax.block_until_ready(smp.make_sampler(denoise, cfg)(canvas0, counts,
                                                       jax.random.key(0)))
  jax.effects_barrier()
  assert len(calls) == smp.forward_passes(counts) < 16


# ---------------------------------------------------------------- host helpers

def test_transfer_schedule():
  cfg = cfg_of(steps=8, alpha=0.33)
  canvas0 = drafts()
  counts = smp.transfer_schedule(canvas0, cfg)
  assert counts.shape == (3, 2, 4) and counts.dtype == np.int32
  for b in range(3):
    for j in range(2):
      n = int((canvas0[b, j * 8:(j + 1) * 8] == MASK).sum())
      row = sch.transfer_counts(n, 4, "shift", 0.33) if n else np.zeros(0)
      np.testing.assert_array_equal(counts[b, j], np.pad(row, (0, 4 - len(row))))
  np.testing.assert_array_equal(counts[1, 1], 0)
  full = smp.transfer_schedule(np.full((1, 16), MASK), cfg_of(steps=32))
  np.testing.assert_array_equal(full[0], sch.block_schedule(16, 8, 32))


def test_strip_fillers_and_stop_at():
  assert smp.strip_fillers([5, 9, 9, 6, 9, 7], fill_ids=[9]) == [5, 6, 7]
  assert smp.strip_fillers(np.array([5, 9, 6]), 9) == [5, 6]
  assert smp.stop_at([4, 5, 2, 6, 2], stop_ids=(2, 3)) == [4, 5]
  assert smp.stop_at([4, 5, 6], stop_ids=[2]) == [4, 5, 6]
  assert smp.stop_at([3, 4], 3) == []


# ---------------------------------------------------------------- errors

def test_errors_name_the_numbers():
  with pytest.raises(ValueError, match="gen_length 20 .*block_length 8"):
    smp.SamplerConfig(gen_length=20, block_length=8, steps=8)
  with pytest.raises(ValueError, match="steps 9 .*number of blocks 2"):
    smp.SamplerConfig(gen_length=16, block_length=8, steps=9)
  with pytest.raises(ValueError, match="confidence 'top_p'.*low_confidence"):
    smp.SamplerConfig(confidence="top_p")
  with pytest.raises(ValueError, match="schedule 'exp'"):
    smp.SamplerConfig(schedule="exp")
  cfg = cfg_of()
  with pytest.raises(ValueError, match="canvas width 12 != gen_length 16"):
    smp.transfer_schedule(np.full((1, 12), MASK), cfg)
  with pytest.raises(ValueError, match="canvas width 12 != gen_length 16"):
    smp.sample(table_jax, np.full((1, 12), MASK), np.zeros((1, 2, 4), np.int32),
               jax.random.key(0), cfg)
  with pytest.raises(ValueError, match=r"counts has shape \(1, 2, 3\).*\(1, 2, 4\)"):
    smp.sample(table_jax, np.full((1, 16), MASK), np.zeros((1, 2, 3), np.int32),
               jax.random.key(0), cfg)
  with pytest.raises(ValueError, match=r"forbid_ids \[30\].*24"):
    smp.sample(table_jax, np.full((1, 16), MASK), np.ones((1, 2, 4), np.int32),
               jax.random.key(0), cfg_of(forbid_ids=(30,)))
