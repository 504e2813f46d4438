"""Transfer-count schedules (SPEC §7.2, §13) against SPEC's sequences and
independent PyTorch re-implementations of LLaDA's and LaViDa's rules."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lavida_jax.diffusion import schedule as sch

ALPHAS = (0.1, 1 / 3, 0.33, 1.0, 3.0, 10.0)
GRID = [(n, k) for n in range(1, 65) for k in range(1, 65)]
# The torch comparisons are slower: every N, a spread of K.
PARITY_GRID = [(n, k) for n in range(1, 65)
               for k in (*range(1, 17), 20, 23, 31, 32, 33, 47, 63, 64)]


# ---------------------------------------------------------------- references

def llada_linear_torch(n_masks: int, steps: int) -> list[int]:
  """LLaDA's get_num_transfer_tokens for one row of `n_masks` masks."""
  mask_index = torch.ones(1, n_masks, dtype=torch.bool)
  mask_num = mask_index.sum(dim=1, keepdim=True)
  base, remainder = mask_num // steps, mask_num % steps
  out = torch.zeros(1, steps, dtype=torch.int64) + base
  out[0, :remainder[0, 0]] += 1
  return out[0].tolist()


def shift_sigma_torch(alpha: float):
  return lambda t: alpha * t / (1 + (alpha - 1) * t)


def cosine_sigma_torch(t: torch.Tensor) -> torch.Tensor:
  # LaViDa applies numpy's float32 cos to the float32 tensor.
  cos = torch.from_numpy(np.cos((np.pi * t).numpy()))
  return 1 - 0.5 * (1 + cos)


def lavida_floors_torch(n_masks: int, steps: int, sigma_fn) -> tuple[list[int], bool]:
  """LaViDa's counts by floors, float32 via torch; (counts, pinned).

  Where LaViDa would fail its `delta >= 0` assertion (float32 σ(1) < 1), the
  endpoint is pinned to c_K = N instead and pinned=True.
  """
  k = min(steps, n_masks)
  t = torch.linspace(0, 1, k + 1)
  assert t.dtype == torch.float32
  c = (sigma_fn(t) * torch.tensor([n_masks])).to(torch.int64).tolist()
  pinned = False
  while True:
    d = [max(b - a, 1) for a, b in zip(c[:-1], c[1:])]
    surplus = sum(d) - n_masks
    if surplus >= 0:
      break
    c[-1], pinned = n_masks, True
  j = 0
  while surplus > 0:
    if d[j % k] > 1:
      d[j % k] -= 1
      surplus -= 1
    j += 1
  return d[::-1], pinned


def shift_exact(n_masks: int, steps: int, alpha: Fraction) -> list[int]:
  """The same rule in exact rational arithmetic (what float32 is not)."""
  k = min(steps, n_masks)
  c = [int(alpha * Fraction(j, k) / (1 + (alpha - 1) * Fraction(j, k)) * n_masks)
       for j in range(k + 1)]
  d = [max(b - a, 1) for a, b in zip(c[:-1], c[1:])]
  surplus, j = sum(d) - n_masks, 0
  while surplus > 0:
    if d[j % k] > 1:
      d[j % k] -= 1
      surplus -= 1
    j += 1
  return d[::-1]


# ---------------------------------------------------------------- SPEC values

def test_spec_examples():
  assert sch.transfer_counts(32, 16, "shift", 1 / 3).tolist() == [
      6, 4, 4, 2, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
  assert sch.transfer_counts(32, 16, "shift", 3).tolist() == [
      1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5]
  # LaViDa's defaults: "shift" without an α is α = 3; schedule=None is LLaDA's rule.
  assert sch.transfer_counts(32, 16).tolist() == sch.transfer_counts(
      32, 16, "shift", 3).tolist()
  assert sch.transfer_counts(10, 4, None).tolist() == [3, 3, 2, 2]
  assert sch.transfer_counts(10, 4, "none").tolist() == [3, 3, 2, 2]
  # LaViDa's "linear" is σ = t through the floors, not LLaDA's rule.
  assert sch.transfer_counts(6, 3, "linear").tolist() == [3, 1, 2]
  assert sch.transfer_counts(6, 3, "none").tolist() == [2, 2, 2]


def test_alpha_0_33_differs_from_one_third():
  a033 = sch.transfer_counts(32, 16, "shift", 0.33).tolist()
  a13 = sch.transfer_counts(32, 16, "shift", 1 / 3).tolist()
  assert a033[:5] == [6, 4, 4, 3, 2]
  assert a13[:5] == [6, 4, 4, 2, 3]
  assert a033 == [6, 4, 4, 3, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]


def test_float32_is_part_of_the_definition():
  # Exact arithmetic gives other counts than LaViDa's float32 (checked against
  # torch in test_shift_matches_lavida).
  assert shift_exact(10, 3, Fraction(1, 3)) == [6, 3, 1]
  assert sch.transfer_counts(10, 3, "shift", 1 / 3).tolist() == [7, 2, 1]
  # (SPEC's N=32, K=16 lists are not float32 effects: 0.33 and 1/3 differ
  # there in exact arithmetic too.)
  assert shift_exact(32, 16, Fraction(1, 3)) == sch.transfer_counts(32, 16, "shift", 1 / 3).tolist()
  # σ = t in float32: linspace's 0.6666666 < 2/3 moves a token (LaViDa too).
  assert sch.transfer_counts(6, 3, "shift", 1.0).tolist() == [3, 1, 2]
  assert shift_exact(6, 3, Fraction(1)) == [2, 2, 2]


def test_linspace_matches_torch():
  for n in range(1, 600):
    np.testing.assert_array_equal(sch._linspace01(n), torch.linspace(0, 1, n).numpy())


# ---------------------------------------------------------------- references

@pytest.mark.parametrize("alpha", ALPHAS)
def test_shift_matches_lavida(alpha):
  pinned_cases = 0
  for n, k in PARITY_GRID:
    ref, pinned = lavida_floors_torch(n, k, shift_sigma_torch(alpha))
    pinned_cases += pinned
    assert sch.transfer_counts(n, k, "shift", alpha).tolist() == ref, (n, k)
  if alpha == 0.1:  # float32 σ(1) < 1 here: the pinned branch is exercised
    assert pinned_cases > 0


def test_cosine_matches_lavida():
  for n, k in PARITY_GRID:
    ref, pinned = lavida_floors_torch(n, k, cosine_sigma_torch)
    assert not pinned
    assert sch.transfer_counts(n, k, "cosine").tolist() == ref, (n, k)
  assert sch.transfer_counts(32, 16, "cosine").tolist() == [
      1, 1, 1, 2, 3, 2, 3, 3, 4, 3, 2, 3, 1, 1, 1, 1]


def test_alpha_one_is_floors_of_t():
  for n, k in PARITY_GRID:
    ref, _ = lavida_floors_torch(n, k, lambda t: t)
    assert sch.transfer_counts(n, k, "shift", 1.0).tolist() == ref, (n, k)


def test_none_matches_llada():
  for n, k in PARITY_GRID:
    ours = sch.transfer_counts(n, k, "none").tolist()
    assert ours == llada_linear_torch(n, min(n, k)), (n, k)
    # steps > N: LLaDA's trailing zeros are block_schedule's padding.
    assert sch.block_schedule(n, n, k, "none")[0].tolist() == llada_linear_torch(n, k)


def test_linear_is_shift_with_alpha_one():
  for n, k in PARITY_GRID:
    ref, _ = lavida_floors_torch(n, k, lambda t: t)
    assert sch.transfer_counts(n, k, "linear").tolist() == ref, (n, k)
    assert ref == sch.transfer_counts(n, k, "shift", 1.0).tolist()


# ---------------------------------------------------------------- invariants

@pytest.mark.parametrize("schedule,alpha", [("shift", a) for a in ALPHAS]
                         + [(s, None) for s in ("none", "linear", "cosine", "logit_normal")])
def test_invariants(schedule, alpha):
  for n, k in GRID:
    c = sch.transfer_counts(n, k, schedule, alpha)
    assert c.dtype == np.int32
    assert c.shape == (min(n, k),), (n, k)
    assert c.sum() == n, (n, k, c)
    assert c.min() >= 1, (n, k, c)


def test_shift_direction():
  for n, k in GRID:
    for alpha in (0.1, 1 / 3, 0.33):
      c = sch.transfer_counts(n, k, "shift", alpha)
      assert c[0] >= c[-1], (n, k, alpha, c)
    for alpha in (3.0, 10.0):
      c = sch.transfer_counts(n, k, "shift", alpha)
      assert c[0] <= c[-1], (n, k, alpha, c)
  # and strictly where there is room
  early = sch.transfer_counts(64, 16, "shift", 1 / 3)
  late = sch.transfer_counts(64, 16, "shift", 3)
  assert early[0] > early[-1] and late[0] < late[-1]


def test_large_block_is_fast_and_valid():
  c = sch.transfer_counts(4096, 4096, "shift", 0.01)
  assert c.sum() == 4096 and c.min() == 1


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,match", [
    (dict(n_masks=0, steps=4), "n_masks must be >= 1, got 0"),
    (dict(n_masks=8, steps=0), "steps must be >= 1, got 0"),
    (dict(n_masks=8, steps=4, alpha=0.0), "alpha must be .* > 0, got 0.0"),
    (dict(n_masks=8, steps=4, alpha=-1.0), "alpha"),
    (dict(n_masks=8, steps=4, alpha=float("nan")), "alpha"),
    (dict(n_masks=8, steps=4, schedule="cos"), "'cos'.*none, linear, shift, cosine, logit_normal"),
])
def test_transfer_counts_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sch.transfer_counts(**kwargs)


def test_non_integer_sizes_rejected():
  with pytest.raises(TypeError, match="n_masks"):
    sch.transfer_counts(8.0, 4)


# ---------------------------------------------------------------- blocks

@pytest.mark.parametrize("gen,block,steps,schedule", [
    (32, 32, 16, "shift"), (128, 32, 128, "shift"), (128, 32, 64, "cosine"),
    (64, 16, 8, "none"), (8, 4, 12, "shift"), (32, 32, 64, "none"),
    (64, 16, 8, "linear"), (64, 16, 8, "logit_normal"),
])
def test_block_schedule(gen, block, steps, schedule):
  counts = sch.block_schedule(gen, block, steps, schedule, alpha=1 / 3)
  num_blocks, spb = gen // block, steps // (gen // block)
  assert counts.dtype == np.int32 and counts.shape == (num_blocks, spb)
  row = sch.transfer_counts(block, spb, schedule, 1 / 3)
  for b in range(num_blocks):
    np.testing.assert_array_equal(counts[b, :row.size], row)
    assert (counts[b, row.size:] == 0).all()
    assert counts[b].sum() == block
  assert sch.nfe(gen, block, steps) == int((counts > 0).sum())


def test_block_schedule_pads_with_trailing_zeros():
  assert sch.block_schedule(8, 4, 12).tolist() == [[1, 1, 1, 1, 0, 0]] * 2


def test_nfe_values():
  assert sch.nfe(32, 32, 16) == 16
  assert sch.nfe(128, 32, 128) == 128
  assert sch.nfe(256, 32, 64) == 64
  assert sch.nfe(32, 32, 64) == 32  # at most one step per token


@pytest.mark.parametrize("fn", [sch.block_schedule, sch.nfe])
def test_block_errors(fn):
  with pytest.raises(ValueError,
                     match="gen_length 30 is not a multiple of block_length 8"):
    fn(30, 8, 4)
  with pytest.raises(ValueError,
                     match="steps 6 is not a multiple of the number of blocks 4"):
    fn(64, 16, 6)
  with pytest.raises(ValueError, match="steps 2 .* blocks 4"):
    fn(64, 16, 2)
  with pytest.raises(ValueError, match="block_length must be >= 1"):
    fn(64, 0, 2)


# ------------------------------------------------ every N <= 1024, K <= 256

N_MAX, K_MAX = 1024, 256


def sigma_reference(schedule: str, k: int) -> np.ndarray:
  """σ(t_j), j = 0..K, float32, stated independently of the module: t from torch,
  the shift/cosine ops as LaViDa writes them, logit_normal with each float32 op
  rounded once (float64 log and erf, then rounded)."""
  t = torch.linspace(0, 1, k + 1)
  if schedule == "linear":
    return t.numpy()
  if schedule == "shift":  # LaViDa's default shift, α = 3, in torch float32
    return (3 * t / (1 + (3 - 1) * t)).numpy()
  if schedule == "cosine":
    return cosine_sigma_torch(t).numpy()
  assert schedule == "logit_normal"
  t = t.numpy()
  with np.errstate(divide="ignore"):
    y = t / (np.float32(1) - t)
    logit = np.log(y.astype(np.float64)).astype(np.float32)  # -inf at 0, +inf at 1
  z = logit / np.float32(np.sqrt(np.float32(2)))
  erf = np.vectorize(math.erf)(z.astype(np.float64)).astype(np.float32)
  return (np.float32(0.5) * (np.float32(1) + erf)).astype(np.float32)


def floors_reference(sigma: np.ndarray, n: np.ndarray) -> np.ndarray:
  """LaViDa's counts by floors for every N in `n` at once: [len(n), K].

  LaViDa's loop walks j cyclically, skipping entries equal to 1 and decrementing
  the others until the surplus is gone. Closed form: after s full sweeps entry j
  has lost min(s, d_j − 1); s* is the largest s whose removals fit the surplus,
  and the rest comes off the first entries that can still lose one."""
  c = np.floor(sigma[None, :] * n[:, None].astype(np.float32)).astype(np.int64)
  d = np.maximum(np.diff(c, axis=1), 1)
  surplus = d.sum(1) - n
  assert (surplus >= 0).all()  # LaViDa's own assertion
  lo, hi = np.zeros_like(n), n.copy()
  while (lo < hi).any():  # largest s with Σ min(s, d_j − 1) <= surplus
    mid = (lo + hi + 1) // 2
    fits = np.minimum(mid[:, None], d - 1).sum(1) <= surplus
    lo, hi = np.where(fits, mid, lo), np.where(fits, hi, mid - 1)
  left = surplus - np.minimum(lo[:, None], d - 1).sum(1)
  can = d - 1 > lo[:, None]
  extra = can & (np.cumsum(can, axis=1) <= left[:, None])
  out = d - np.minimum(lo[:, None], d - 1) - extra
  return out[:, ::-1]


@pytest.mark.parametrize("schedule", ["none", "linear", "shift", "cosine", "logit_normal"])
def test_every_n_and_k_matches_lavida(schedule):
  """Every N <= 1024 with every K = min(steps, N) <= 256 (steps > N is K = N)."""
  for k in range(1, K_MAX + 1):
    n = np.arange(k, N_MAX + 1)
    if schedule == "none":  # LLaDA: N // K each, the remainder on the first steps
      expected = (n // k)[:, None] + (np.arange(k)[None, :] < (n % k)[:, None])
    else:
      expected = floors_reference(sigma_reference(schedule, k), n)
    for row, nn in zip(expected, n):
      got = sch.transfer_counts(int(nn), k, schedule)
      assert np.array_equal(got, row), (schedule, int(nn), k, got, row)
  for nn in range(1, K_MAX):  # more steps than masks: K = N
    assert np.array_equal(sch.transfer_counts(nn, K_MAX, schedule),
                          sch.transfer_counts(nn, nn, schedule))


def test_logit_normal_differs_from_torch_only_where_torch_sigma_is_off():
  """LaViDa computes σ with torch's float32 log/erf (not correctly rounded, and
  CPU-dependent); our counts equal its counts wherever its σ_j equal the correctly
  rounded ones, and differ in few cases overall."""
  differ = total = 0
  for k in range(1, K_MAX + 1):
    t = torch.linspace(0, 1, k + 1)
    torch_sigma = (0.5 * (1 + torch.erf(torch.log(t / (1 - t)) / torch.sqrt(
        torch.tensor(2.0))))).numpy()
    ours = sigma_reference("logit_normal", k)
    n = np.arange(k, N_MAX + 1)
    by_torch = floors_reference(torch_sigma, n)
    by_ours = floors_reference(ours, n)
    rows = (by_torch != by_ours).any(1)
    total += len(n)
    differ += rows.sum()
    if rows.any():  # then some σ_j differs and moves a floor
      bad_j = np.flatnonzero(torch_sigma != ours)
      assert bad_j.size, k
      moved = np.floor(torch_sigma[bad_j] * n[rows, None].astype(np.float32)) != np.floor(
          ours[bad_j] * n[rows, None].astype(np.float32))
      assert moved.any(1).all(), k
  assert differ / total < 0.01, (differ, total)
