"""The noising process of training (SPEC §6.1): complementary and i.i.d. masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavida_jax.diffusion import masking
from lavida_jax.text import IGNORE_ID

FIM, S = 126085, 126086
complementary = jax.jit(masking.complementary_masks, static_argnames=("eps", "min_over"))
iid = jax.jit(masking.iid_mask, static_argnames=("eps", "at_least_one"))


def random_eligible(seed, b=16, t=48):
  """Eligible masks with an all-False row, an all-True row and random suffixes."""
  rng = np.random.default_rng(seed)
  start = rng.integers(1, t, size=b)
  elig = np.arange(t)[None, :] >= start[:, None]
  elig[0] = False
  elig[1] = True
  return jnp.asarray(elig)


def numpy_complementary(t_B, u_BT, elig_BT, eps, min_over):
  """An independent re-implementation of LaViDa's `forward_process` + views, float32."""
  t_B, u_BT = np.asarray(t_B, np.float32), np.asarray(u_BT, np.float32)
  p = np.float32(1 - eps) * t_B + np.float32(eps)
  rows = []
  for b in range(u_BT.shape[0]):
    pool = u_BT[b] if min_over == "all" else u_BT[b][elig_BT[b]]
    cut = max(p[b], pool.min()) if pool.size else p[b]
    rows.append(u_BT[b] <= cut)
  m = np.stack(rows)
  return m & elig_BT, ~m & elig_BT, p


def test_eligible_positions_drop_ignore_and_fim():
  labels = jnp.array([[IGNORE_ID, IGNORE_ID, 5, FIM, S, 9, FIM],
                      [IGNORE_ID] * 7])
  elig = masking.eligible_positions(labels, fim_ids=(FIM,))
  np.testing.assert_array_equal(elig, [[0, 0, 1, 0, 1, 1, 0], [0] * 7])
  # Without fim_ids a [FIM] label is an ordinary label.
  assert bool(masking.eligible_positions(labels)[0, 3])


def test_fim_positions_are_never_masked():
  labels = jnp.tile(jnp.array([IGNORE_ID, 7, FIM, 8, S, S, FIM, 9]), (16, 6))   # [16, 48]
  elig = masking.eligible_positions(labels, fim_ids=(FIM,))
  m1, m2, _ = complementary(jax.random.key(3), elig, min_over="all")
  fim = np.asarray(labels == FIM)
  assert not np.any(np.asarray(m1)[fim]) and not np.any(np.asarray(m2)[fim])
  m, _ = iid(jax.random.key(3), elig, at_least_one=True)
  assert not np.any(np.asarray(m)[fim])


@pytest.mark.parametrize("min_over", ["all", "eligible"])
def test_views_partition_the_eligible_positions(min_over):
  elig = random_eligible(0)
  m1, m2, p = complementary(jax.random.key(0), elig, min_over=min_over)
  m1, m2, elig = map(np.asarray, (m1, m2, elig))
  np.testing.assert_array_equal(m1 | m2, elig)
  assert not np.any(m1 & m2)
  assert not m1[0].any() and not m2[0].any()          # no eligible position: nothing masked
  assert (m1.sum() + m2.sum()) == elig.sum()           # the gather capacity bound
  assert np.all((p >= 1e-3) & (p <= 1.0))


def test_eligible_minimum_masks_at_least_one_per_row_in_view1():
  elig = random_eligible(1)
  for seed in range(50):
    m1, _, _ = complementary(jax.random.key(seed), elig, min_over="eligible")
    has = np.asarray(elig).any(axis=1)
    assert np.all(np.asarray(m1).any(axis=1)[has])


def test_minimum_over_all_positions_is_laviDa_and_can_leave_view1_empty():
  # p = ε; the row's smallest u sits on a prompt (non-eligible) position.
  elig = jnp.array([[False, True, True, True]])
  t = jnp.zeros((1,), jnp.float32)
  u = jnp.array([[0.01, 0.5, 0.6, 0.7]], jnp.float32)
  m1, m2, _ = masking.complementary_masks_from_uniforms(t, u, elig, min_over="all")
  np.testing.assert_array_equal(m1, [[0, 0, 0, 0]])
  np.testing.assert_array_equal(m2, [[0, 1, 1, 1]])
  m1, m2, _ = masking.complementary_masks_from_uniforms(t, u, elig, min_over="eligible")
  np.testing.assert_array_equal(m1, [[0, 1, 0, 0]])
  np.testing.assert_array_equal(m2, [[0, 0, 1, 1]])


def test_deterministic_for_a_key_and_equal_to_the_rule_on_its_uniforms():
  elig = random_eligible(2)
  a = complementary(jax.random.key(7), elig, min_over="all")
  b = complementary(jax.random.key(7), elig, min_over="all")
  c = complementary(jax.random.key(8), elig, min_over="all")
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])
  t, u = masking.sample_uniforms(jax.random.key(7), elig.shape)
  rule = jax.jit(masking.complementary_masks_from_uniforms, static_argnames="min_over")
  for x, y in zip(a, rule(t, u, elig, min_over="all")):   # jitted like `complementary`
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("min_over", ["all", "eligible"])
def test_matches_numpy_reimplementation_bit_for_bit(min_over):
  elig = random_eligible(3)
  t, u = masking.sample_uniforms(jax.random.key(11), elig.shape)
  t = t.at[:8].set(0.0)   # p = ε: the minimum decides these rows
  want1, want2, want_p = numpy_complementary(t, u, np.asarray(elig), 1e-3, min_over)
  got1, got2, got_p = masking.complementary_masks_from_uniforms(t, u, elig, min_over=min_over)
  np.testing.assert_array_equal(got1, want1)
  np.testing.assert_array_equal(got2, want2)
  np.testing.assert_array_equal(got_p, want_p)
  # Under jit XLA may contract (1-ε)·t + ε into an FMA: p moves by at most 1 ulp,
  # and the masks stay the same here.
  jit_rule = jax.jit(masking.complementary_masks_from_uniforms, static_argnames="min_over")
  got1, got2, got_p = jit_rule(t, u, elig, min_over=min_over)
  np.testing.assert_array_equal(got1, want1)
  np.testing.assert_array_equal(got2, want2)
  np.testing.assert_array_max_ulp(np.asarray(got_p), want_p, maxulp=1)


def test_masking_rate_follows_p():
  b, t = 4096, 256
  elig = jnp.ones((b, t), bool)
  m1, _, p = complementary(jax.random.key(5), elig, min_over="all")
  frac = np.asarray(m1).mean(axis=1)
  # E[p] = (1 − ε)/2 + ε ≈ 0.5005; the std of the mean of 4096 rows is ≈ 0.0045.
  assert abs(frac.mean() - 0.5005) < 0.02
  # Each row masks about a fraction p of its positions (binomial std ≤ 0.031).
  assert np.abs(frac - np.asarray(p)).mean() < 0.03
  assert np.corrcoef(frac, np.asarray(p))[0, 1] > 0.98


def test_iid_mask():
  elig = random_eligible(4)
  t, u = masking.sample_uniforms(jax.random.key(2), elig.shape)
  t = t.at[:8].set(0.0)
  m, p = masking.iid_mask_from_uniforms(t, u, elig, at_least_one=False)
  want_p = np.float32(1 - 1e-3) * np.asarray(t) + np.float32(1e-3)
  np.testing.assert_array_equal(m, (np.asarray(u) < want_p[:, None]) & np.asarray(elig))
  np.testing.assert_array_equal(p, want_p)
  m1, _ = masking.iid_mask_from_uniforms(t, u, elig, at_least_one=True)
  m1, m, e = map(np.asarray, (m1, m, elig))
  assert not np.any(m1 & ~e)
  has = e.any(axis=1)
  assert np.all(m1.any(axis=1)[has]) and not m1[~has].any()
  assert not np.all(m.any(axis=1)[has])    # without the guarantee, p = ε rows mask nothing
  # The guarantee only adds each row's smallest eligible u: nothing else changes.
  extra = m1 & ~m
  assert np.all(extra.sum(axis=1) <= 1) and not np.any(m & ~m1)
  a, _ = iid(jax.random.key(2), elig, at_least_one=True)
  b, _ = iid(jax.random.key(2), elig, at_least_one=True)
  np.testing.assert_array_equal(a, b)


def test_apply_mask_replaces_rows_with_the_mask_embedding():
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  e = jnp.array([-1.0, -2.0, -3.0, -4.0])
  masked = jnp.array([[True, False, True], [False, False, True]])
  y = np.asarray(masking.apply_mask(x, masked, e))
  np.testing.assert_array_equal(y[np.asarray(masked)], np.tile(e, (3, 1)))
  np.testing.assert_array_equal(y[~np.asarray(masked)], np.asarray(x)[~np.asarray(masked)])


def test_dream_shift_labels_and_mask_alignment():
  labels = jnp.array([[IGNORE_ID, IGNORE_ID, 11, 12, 13], [IGNORE_ID, 21, 22, IGNORE_ID, 24]])
  np.testing.assert_array_equal(
      masking.shift_labels(labels),
      [[IGNORE_ID, 11, 12, 13, IGNORE_ID], [21, 22, IGNORE_ID, 24, IGNORE_ID]])
  masked = jnp.array([[False, False, True, False, True], [False, True, True, False, True]])
  select = np.asarray(masking.shift_left(masked, False))
  np.testing.assert_array_equal(select, [[0, 1, 0, 1, 0], [1, 1, 0, 1, 0]])
  # The logit at each selected i is trained on the masked token at i + 1.
  shifted = np.asarray(masking.shift_labels(labels))
  for b, i in zip(*np.nonzero(select)):
    assert masked[b, i + 1] and shifted[b, i] == labels[b, i + 1]
