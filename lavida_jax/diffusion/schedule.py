"""How many masked tokens the sampler commits at each denoising step.

Host-side (numpy only, no JAX): the counts are static integers, computed once
and handed to the jitted sampler as one array (SPEC §7.1, §7.2).

Notation: a block holds `N` masked tokens and is denoised in
`K = min(steps, N)` steps (a step always commits at least one token, so more
than `N` steps are never useful). The diffusion time runs from t = 1 (all
masked) down to t = 0; a schedule is a curve `σ(t)`, the fraction of the block
still masked at time `t`, with σ(0) = 0 and σ(1) = 1.

"Counts by floors" (shared by `shift` and `cosine`, reproducing LaViDa's
`get_num_transfer_tokens_sch` bit for bit):

  1. t_j = j/K for j = 0..K, in float32 as `torch.linspace(0, 1, K + 1)`
     computes it on CPU (see `_linspace01`);
  2. σ_j = σ(t_j) in float32;
  3. c_j = ⌊σ_j·N⌋ (float32 product, then floor);
  4. d_j = c_j − c_{j−1} for j = 1..K, clamped to d_j ≥ 1;
  5. surplus Σd − N > 0 (from the clamping) is removed round-robin: sweep
     j = 1..K again and again, each sweep decrementing every d_j > 1 once, in
     order, until the surplus is gone;
  6. reverse: sampler step i (0-based) commits d_{K−i}, the tokens unmasked
     between t_{K−i} and t_{K−i−1}.

One deviation, where LaViDa fails: float32 can round σ(1) just below 1 (for
example α = 0.1), so c_K = N − 1. If nothing was clamped the counts then sum
to N − 1 and LaViDa's code stops on an assertion; here the missing token goes
to d_K (the first sampler step), which is what the exact σ(1) = 1 gives.
Everywhere else the counts equal LaViDa's.

The float32 arithmetic is part of the definition, not a detail: α = 0.33 (what
LaViDa's evaluation scripts pass) and α = 1/3 (the paper) give different
counts, and α = 1/3 in exact arithmetic differs again (SPEC §13).
"""

from __future__ import annotations

import operator

import numpy as np

SCHEDULES = ("shift", "linear", "cosine")


def _linspace01(n: int) -> np.ndarray:
  """`torch.linspace(0, 1, n)` in float32 as PyTorch's CPU kernel computes it.

  step = fl32(1 / (n − 1)); the first half of the points is `step·i`, the
  second half `1 − step·(n − 1 − i)`, each rounded once to float32 (the kernel
  is compiled with fused multiply-add). The float64 products below are exact,
  so one rounding at the end reproduces the fused result.
  """
  if n == 1:
    return np.zeros(1, np.float32)
  step = np.float64(np.float32(1.0) / np.float32(n - 1))
  i = np.arange(n, dtype=np.float64)
  t = np.where(np.arange(n) < n // 2, step * i, 1.0 - step * (n - 1 - i))
  return t.astype(np.float32)


def _sigma(schedule: str, t: np.ndarray, alpha: float) -> np.ndarray:
  """σ(t), the masked fraction at time t, in float32, op by op as LaViDa."""
  if schedule == "shift":
    # α·t / (1 + (α − 1)·t); α and α − 1 are rounded to float32 separately,
    # as torch does with a Python float times a float32 tensor.
    a, a_minus_1 = np.float32(alpha), np.float32(alpha - 1.0)
    return (a * t) / (np.float32(1.0) + a_minus_1 * t)
  if schedule == "cosine":
    # 1 − (1 + cos(π·t)) / 2, i.e. sin²(π·t / 2).
    cos = np.cos(np.float32(np.pi) * t)
    return np.float32(1.0) - np.float32(0.5) * (np.float32(1.0) + cos)
  raise AssertionError(schedule)


def _counts_by_floors(sigma: np.ndarray, n: int) -> np.ndarray:
  """Steps 3–6 of the module docstring. sigma: [K + 1] float32 → [K] int64."""
  c = np.floor(sigma * np.float32(n)).astype(np.int64)
  d = np.maximum(np.diff(c), 1)
  deficit = n - int(d.sum())
  if deficit > 0:  # only when float32 put σ(1) below 1; see module docstring
    d[-1] += deficit
  surplus = -deficit
  while surplus > 0:  # one full sweep over j = 1..K per iteration
    big = np.flatnonzero(d > 1)[:surplus]  # non-empty: Σd > N ≥ K
    d[big] -= 1
    surplus -= big.size
  return d[::-1]


def _check_positive_int(name: str, value) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an integer, got {value!r}") from None
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")
  return value


def transfer_counts(n_masks: int, steps: int, schedule: str = "shift",
                    alpha: float = 1 / 3) -> np.ndarray:
  """Tokens committed at each step when denoising `n_masks` masks.

  Args:
    n_masks: N, the masked tokens in the block (>= 1).
    steps: the steps asked for (>= 1); K = min(steps, N) are used.
    schedule: one of `SCHEDULES`:
      "shift"   σ(t) = α·t / (1 + (α − 1)·t), counts by floors (module
                docstring). α < 1 commits more tokens early, α > 1 late,
                α = 1 is σ(t) = t (N/K per step, spread by floors).
      "linear"  LLaDA's rule: ⌊N/K⌋ every step, plus one on each of the first
                N mod K steps.
      "cosine"  σ(t) = (1 − cos(π·t)) / 2, float32, counts by floors: LaViDa's
                cosine schedule (few tokens at both ends, most in the middle).
    alpha: the shift α (> 0); used by "shift" only. 1/3 is the paper's value;
      LaViDa's evaluation scripts pass 0.33, which gives other counts.

  Returns:
    counts: [K] int32, every entry >= 1, summing to N; counts[i] is the number
    of tokens step i commits.
  """
  n = _check_positive_int("n_masks", n_masks)
  steps = _check_positive_int("steps", steps)
  if schedule not in SCHEDULES:
    raise ValueError(
        f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
  alpha = float(alpha)
  if not (np.isfinite(alpha) and alpha > 0):
    raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
  k = min(steps, n)
  if schedule == "linear":
    counts = np.full(k, n // k, np.int64)
    counts[:n % k] += 1
  else:
    counts = _counts_by_floors(_sigma(schedule, _linspace01(k + 1), alpha), n)
  return counts.astype(np.int32)


def _split_blocks(gen_length: int, block_length: int,
                  steps: int) -> tuple[int, int]:
  """(num_blocks, steps_per_block), checking LLaDA's divisibility rules."""
  gen_length = _check_positive_int("gen_length", gen_length)
  block_length = _check_positive_int("block_length", block_length)
  steps = _check_positive_int("steps", steps)
  if gen_length % block_length:
    raise ValueError(f"gen_length {gen_length} is not a multiple of "
                     f"block_length {block_length}")
  num_blocks = gen_length // block_length
  if steps % num_blocks:
    raise ValueError(f"steps {steps} is not a multiple of the number of blocks "
                     f"{num_blocks} (gen_length {gen_length} / block_length "
                     f"{block_length})")
  return num_blocks, steps // num_blocks


def block_schedule(gen_length: int, block_length: int, steps: int,
                   schedule: str = "shift", alpha: float = 1 / 3) -> np.ndarray:
  """The sampler's whole schedule, one static array (LLaDA semantics).

  The canvas of `gen_length` masks is split into `num_blocks = gen_length /
  block_length` blocks, denoised left to right; `steps` are split evenly,
  `steps_per_block = steps / num_blocks` each. Both divisions must be exact.

  Returns:
    counts: [num_blocks, steps_per_block] int32; counts[b, i] is the number of
    tokens step i of block b commits, i.e. `transfer_counts(block_length,
    steps_per_block, schedule, alpha)`. When steps_per_block > block_length
    only the first block_length steps are used and each row ends in zeros
    (the same zeros LLaDA's `get_num_transfer_tokens` gives for the linear
    schedule); a step with count 0 commits nothing and the sampler should
    skip its forward pass. The zeros are always trailing, so a sampler can
    equally loop over only the first `min(steps_per_block, block_length)`
    columns. Every row sums to block_length.
  """
  num_blocks, steps_per_block = _split_blocks(gen_length, block_length, steps)
  row = transfer_counts(block_length, steps_per_block, schedule, alpha)
  counts = np.zeros((num_blocks, steps_per_block), np.int32)
  counts[:, :row.size] = row
  return counts


def nfe(gen_length: int, block_length: int, steps: int) -> int:
  """Denoising forward passes the sampler makes (skipping count-0 steps).

  num_blocks · min(steps_per_block, block_length); the same for every
  schedule. A prefix-cache prefill (SPEC §7.3) is one more pass, not counted.
  """
  num_blocks, steps_per_block = _split_blocks(gen_length, block_length, steps)
  return num_blocks * min(steps_per_block, block_length)
