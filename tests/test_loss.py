"""The masked-diffusion loss (SPEC §6.2): gathered rows, chunked CE, reductions."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavida_jax.diffusion import loss as L
from lavida_jax.diffusion import masking
from lavida_jax.text import IGNORE_ID


def naive_ce(h_ND, k_DV, targets_N):
  logits = h_ND @ k_DV
  return jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, targets_N[:, None], 1)[:, 0]


def numpy_log_softmax(logits):
  logits = logits.astype(np.float64)
  z = logits - logits.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.fixture
def tiny():
  rng = np.random.default_rng(0)
  n, d, v = 7, 5, 13
  return (jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(d, v)), jnp.float32),
          jnp.asarray(rng.integers(0, v, size=n), jnp.int32))


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_chunked_ce_equals_full_logits(tiny, chunk):
  h, k, tg = tiny
  ce, argmax = jax.jit(L.chunked_cross_entropy, static_argnums=(3, 4))(h, k, tg, chunk, True)
  np.testing.assert_allclose(ce, naive_ce(h, k, tg), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(argmax, jnp.argmax(h @ k, axis=1))
  assert ce.dtype == jnp.float32


def test_chunked_ce_argmax_ties_pick_the_first():
  h = jnp.ones((1, 1))
  k = jnp.array([[0.0, 2.0, 1.0, 2.0, 2.0]])
  _, argmax = L.chunked_cross_entropy(h, k, jnp.array([0]), 2, return_argmax=True)
  assert int(argmax[0]) == 1


@pytest.mark.parametrize("chunk", [1, 4, 5, 13])
def test_chunked_ce_gradients_equal_full_logits(tiny, chunk):
  h, k, tg = tiny
  w = jnp.linspace(0.5, 2.0, h.shape[0])

  def f(fn):
    return jax.grad(lambda h, k: (fn(h, k) * w).sum(), argnums=(0, 1))(h, k)

  gh, gk = jax.jit(lambda h, k: f(lambda a, b: L.chunked_cross_entropy(a, b, tg, chunk)))(h, k)
  nh, nk = jax.jit(lambda h, k: f(lambda a, b: naive_ce(a, b, tg)))(h, k)
  np.testing.assert_allclose(gh, nh, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gk, nk, rtol=1e-5, atol=1e-5)


def test_chunked_ce_bf16_inputs_compute_in_float32(tiny):
  h, k, tg = tiny
  hb, kb = h.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  ce = L.chunked_cross_entropy(hb, kb, tg, 4)
  assert ce.dtype == jnp.float32
  ref = naive_ce(hb.astype(jnp.float32), kb.astype(jnp.float32), tg)
  np.testing.assert_allclose(ce, ref, rtol=1e-5, atol=1e-5)
  gh, gk = jax.jit(jax.grad(lambda a, b: L.chunked_cross_entropy(a, b, tg, 4).sum(), (0, 1)))(hb, kb)
  assert gh.dtype == jnp.bfloat16 and gk.dtype == jnp.bfloat16


def test_gather_rows_on_a_known_mask():
  h = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  select = jnp.array([[False, True, False, True], [True, False, False, False]])
  rows, index, valid = L.gather_rows(h, select, capacity=5)
  np.testing.assert_array_equal(index[:3], [1, 3, 4])
  np.testing.assert_array_equal(valid, [1, 1, 1, 0, 0])
  flat = np.asarray(h).reshape(8, 3)
  np.testing.assert_array_equal(rows[:3], flat[[1, 3, 4]])
  with pytest.raises(ValueError, match="3 positions are selected, more than the capacity of 2"):
    L.gather_rows(h, select, capacity=2)
  # Under jit it cannot raise: the first `capacity` are kept and the rest counted.
  rows, index, valid = jax.jit(L.gather_rows, static_argnums=2)(h, select, 2)
  np.testing.assert_array_equal(index, [1, 3])
  assert bool(valid.all()) and int(L.count_dropped(select, 2)) == 1


def expected_loss(h_BTD, k_DV, select_BT, targets_BT, p_B, weighting, normalize, counts_B):
  """Full logits in numpy, log-softmax, pick the masked positions, reduce."""
  logp = numpy_log_softmax(np.asarray(h_BTD, np.float64) @ np.asarray(k_DV, np.float64))
  b_rows, t_len = select_BT.shape
  terms = {b: [] for b in range(b_rows)}
  for b in range(b_rows):
    for t in range(t_len):
      if select_BT[b, t]:
        ce = -logp[b, t, targets_BT[b, t]]
        terms[b].append(ce / p_B[b] if weighting == "inv_t" else ce)
  if normalize == "tokens":
    everything = sum(terms.values(), [])
    return sum(everything) / len(everything)
  return sum(sum(terms[b]) / max(counts_B[b], 1) for b in range(b_rows)) / b_rows


COMBOS = list(itertools.product(["none", "inv_t"], ["tokens", "per_sequence"]))


@pytest.mark.parametrize("dream", [False, True])
def test_loss_equals_hand_computed_value(dream):
  """Every weighting × normalize, through gather → chunked CE → reduction, with gradients."""
  rng = np.random.default_rng(1)
  b, t, d, v = 2, 6, 4, 9
  labels = np.full((b, t), IGNORE_ID)
  labels[0, 2:] = rng.integers(0, v, 4)
  labels[1, 4:] = rng.integers(0, v, 2)
  elig = masking.eligible_positions(jnp.asarray(labels))
  m1, m2, p = masking.complementary_masks_from_uniforms(
      jnp.array([0.3, 0.6]), jnp.asarray(rng.uniform(size=(b, t)), jnp.float32), elig)
  h = jnp.asarray(rng.normal(size=(2 * b, t, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)

  select = jnp.concatenate([m1, m2])
  targets = jnp.concatenate([jnp.asarray(labels)] * 2)
  if dream:
    select, targets = masking.shift_left(select, False), masking.shift_labels(targets)
  p2 = jnp.concatenate([p, p])
  counts = jnp.concatenate([elig.sum(1)] * 2)

  def loss_fn(h, k, weighting, normalize):
    h_n, idx, valid = L.gather_rows(h, select, capacity=16)   # 10 rows of padding
    tg = targets.reshape(-1)[idx]
    ce, am = L.chunked_cross_entropy(h_n, k, tg, 4, return_argmax=True)
    row = idx // t
    return L.diffusion_loss(ce, valid, p2[row], row, 2 * b, weighting, normalize,
                            label_counts_B=counts, correct_N=am == tg)

  def full(h, k, weighting, normalize):
    """The same loss from full [2B, T, V] logits."""
    logp = jax.nn.log_softmax(h @ k, axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.clip(targets, 0)[..., None], -1)[..., 0]
    w = jnp.where(select, ce / p2[:, None] if weighting == "inv_t" else ce, 0.0)
    if normalize == "tokens":
      return w.sum() / select.sum()
    return (w.sum(1) / jnp.maximum(counts, 1)).sum() / (2 * b)

  @jax.jit
  def all_combos(h, k):
    ours = [jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(h, k, *c) for c in COMBOS]
    naive = [jax.grad(full, (0, 1))(h, k, *c) for c in COMBOS]
    return ours, naive

  ours, naive = all_combos(h, k)
  sel, tgt = np.asarray(select), np.asarray(targets)
  pred = np.argmax(np.asarray(h) @ np.asarray(k), axis=-1)
  for (weighting, normalize), ((loss, metrics), g), gn in zip(COMBOS, ours, naive):
    want = expected_loss(h, k, sel, tgt, np.asarray(p2), weighting, normalize,
                         np.asarray(counts))
    np.testing.assert_allclose(loss, want, rtol=1e-5, err_msg=f"{weighting}/{normalize}")
    assert int(metrics["n_masked"]) == sel.sum() == 6   # every eligible token, once
    np.testing.assert_allclose(metrics["accuracy"], (pred == tgt)[sel].mean(), rtol=1e-6)
    # Gradients of the whole path equal those of the full-logits loss.
    np.testing.assert_allclose(g[0], gn[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g[1], gn[1], rtol=1e-5, atol=1e-6)


def test_diffusion_loss_rejects_bad_options():
  z = jnp.zeros(2)
  with pytest.raises(ValueError, match="weighting"):
    L.diffusion_loss(z, z > 0, z, z.astype(int), 1, weighting="1/t")
  with pytest.raises(ValueError, match="label_counts_B"):
    L.diffusion_loss(z, z > 0, z, z.astype(int), 1, normalize="per_sequence")


def _all_shapes(jaxpr):
  """Shapes of every value computed in a jaxpr, sub-jaxprs (loop bodies, custom VJPs) included."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)   # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from _all_shapes(sub)


def test_no_full_logits_are_materialised(tiny):
  h, k, tg = tiny   # N = 7, V = 13
  grad = jax.grad(lambda a, b: L.chunked_cross_entropy(a, b, tg, 4).sum(), (0, 1))
  shapes = set(_all_shapes(jax.make_jaxpr(grad)(h, k).jaxpr))
  assert (7, 4) in shapes            # one chunk of logits at a time ...
  assert (7, 13) not in shapes       # ... never [N, V], forward or backward
