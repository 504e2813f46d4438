"""How many masked tokens the sampler commits at each denoising step.

Host-side (numpy only, no JAX): the counts are static integers, computed once
and handed to the jitted sampler as one array (SPEC §7.1, §7.2).

Notation: a block holds `N` masked tokens and is denoised in
`K = min(steps, N)` steps (a step always commits at least one token, so more
than `N` steps are never useful). The diffusion time runs from t = 1 (all
masked) down to t = 0; a schedule is a curve `σ(t)`, the fraction of the block
still masked at time `t`, with σ(0) = 0 and σ(1) = 1.

The names are LaViDa's (`generate(..., schedule=, schedule_kwargs=)` in its
`llada/generate.py`, SPEC §7.2), so that an evaluation's kwargs mean the same
here:

  "none"          LLaDA's uniform rule (LaViDa's `schedule=None`): ⌊N/K⌋ per
                  step, one more on each of the first N mod K steps.
  "linear"        σ(t) = t, counts by floors (= "shift" with α = 1).
  "shift"         σ(t) = α·t / (1 + (α − 1)·t), counts by floors; LaViDa's
                  `schedule_kwargs={'shift': α}`, default α = 3 (commits late).
                  The paper's choice is α = 1/3 (commits early; SamplerConfig's
                  default); LaViDa's evaluation scripts pass 0.33.
  "cosine"        σ(t) = 1 − (1 + cos(π·t)) / 2, counts by floors.
  "logit_normal"  σ(t) = Φ(logit t) = (1 + erf(log(t / (1 − t)) / √2)) / 2,
                  counts by floors (LaViDa's `sigmoid_normal_cdf`).

(An earlier SPEC called LLaDA's uniform rule "linear"; in LaViDa "linear" is
σ = t through the floors, which spreads N/K unevenly: N = 6, K = 3 gives
[3, 1, 2], not [2, 2, 2].)

"Counts by floors" (every schedule but "none", reproducing LaViDa's
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

"logit_normal" needs log and erf, which PyTorch computes with its own float32
kernels (SLEEF on AVX2/AVX-512, glibc otherwise): not correctly rounded, and not
even the same bits on every CPU, so LaViDa's counts for it change with the
machine (9,834 of the (N ≤ 1024, K ≤ 256) cases differ between torch's AVX-512
and default kernels). Here each float32 operation is rounded once, correctly
(log and erf in float64, then rounded): the same counts on every machine, equal
to torch's AVX-512 ones in 99.6% of those cases, and differing only where
torch's σ_j is off by an ulp.
"""

from __future__ import annotations

import functools
import math
import operator

import numpy as np

SCHEDULES = ("none", "linear", "shift", "cosine", "logit_normal")
DEFAULT_SHIFT = 3.0  # LaViDa's `schedule_kwargs.get('shift', 3)`


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


@functools.lru_cache(maxsize=4096)
def _sigmas(schedule: str, k: int, alpha: float) -> np.ndarray:
  """σ(t_j) for j = 0..K, float32, read-only (cached: it depends on K, not N)."""
  sigma = _sigma(schedule, _linspace01(k + 1), alpha)
  sigma.setflags(write=False)
  return sigma


def _sigma(schedule: str, t: np.ndarray, alpha: float) -> np.ndarray:
  """σ(t), the masked fraction at time t, in float32, op by op as LaViDa."""
  if schedule == "shift":
    # α·t / (1 + (α − 1)·t); α and α − 1 are rounded to float32 separately,
    # as torch does with a Python float times a float32 tensor.
    a, a_minus_1 = np.float32(alpha), np.float32(alpha - 1.0)
    return (a * t) / (np.float32(1.0) + a_minus_1 * t)
  if schedule == "linear":
    return t
  if schedule == "cosine":
    # 1 − (1 + cos(π·t)) / 2, i.e. sin²(π·t / 2).
    cos = np.cos(np.float32(np.pi) * t)
    return np.float32(1.0) - np.float32(0.5) * (np.float32(1.0) + cos)
  if schedule == "logit_normal":
    # Φ(logit t): t / (1 − t) → log → / √2 → erf → (1 + ·) / 2, each rounded to
    # float32 once (t = 0 → log 0 = −inf → σ = 0; t = 1 → +inf → σ = 1).
    with np.errstate(divide="ignore"):
      ratio = t / (np.float32(1.0) - t)
      logit = np.log(ratio.astype(np.float64)).astype(np.float32)
    z = logit / np.float32(math.sqrt(2.0))
    erf = np.array([math.erf(v) for v in z.astype(np.float64)]).astype(np.float32)
    return np.float32(0.5) * (np.float32(1.0) + erf)
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


def check_schedule(schedule: str | None) -> str:
  """The schedule's name (None → "none", as LaViDa's `schedule=None`), or an error."""
  schedule = "none" if schedule is None else schedule
  if schedule not in SCHEDULES:
    raise ValueError(
        f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
  return schedule


def check_alpha(alpha: float | None) -> float:
  """The shift α as a float (None → LaViDa's default 3), or an error."""
  alpha = DEFAULT_SHIFT if alpha is None else float(alpha)
  if not (np.isfinite(alpha) and alpha > 0):
    raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
  return alpha


def _check_positive_int(name: str, value) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an integer, got {value!r}") from None
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")
  return value


def transfer_counts(n_masks: int, steps: int, schedule: str | None = "shift",
                    alpha: float | None = None) -> np.ndarray:
  """Tokens committed at each step when denoising `n_masks` masks.

  Args:
    n_masks: N, the masked tokens in the block (>= 1).
    steps: the steps asked for (>= 1); K = min(steps, N) are used.
    schedule: one of `SCHEDULES` (module docstring), or None for "none" as
      LaViDa spells it:
      "none"          LLaDA's rule: ⌊N/K⌋ every step, plus one on each of the
                      first N mod K steps.
      "linear"        σ(t) = t, counts by floors.
      "shift"         σ(t) = α·t / (1 + (α − 1)·t), counts by floors. α < 1
                      commits more tokens early, α > 1 late.
      "cosine"        σ(t) = (1 − cos(π·t)) / 2: few tokens at both ends.
      "logit_normal"  σ(t) = Φ(logit t): few at both ends, sharper.
    alpha: the shift α (> 0), LaViDa's `schedule_kwargs['shift']`; used by
      "shift" only; None is LaViDa's default, 3. 1/3 is the paper's value;
      LaViDa's evaluation scripts pass 0.33, which gives other counts.

  Returns:
    counts: [K] int32, every entry >= 1, summing to N; counts[i] is the number
    of tokens step i commits.
  """
  n = _check_positive_int("n_masks", n_masks)
  steps = _check_positive_int("steps", steps)
  schedule = check_schedule(schedule)
  alpha = check_alpha(alpha)
  k = min(steps, n)
  if schedule == "none":
    counts = np.full(k, n // k, np.int64)
    counts[:n % k] += 1
  else:
    counts = _counts_by_floors(_sigmas(schedule, k, alpha if schedule == "shift" else 0.0), n)
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
                   schedule: str | None = "shift", alpha: float | None = None) -> np.ndarray:
  """The sampler's whole schedule, one static array (LLaDA semantics).

  The canvas of `gen_length` masks is split into `num_blocks = gen_length /
  block_length` blocks, denoised left to right; `steps` are split evenly,
  `steps_per_block = steps / num_blocks` each. Both divisions must be exact.

  Returns:
    counts: [num_blocks, steps_per_block] int32; counts[b, i] is the number of
    tokens step i of block b commits, i.e. `transfer_counts(block_length,
    steps_per_block, schedule, alpha)`. When steps_per_block > block_length
    only the first block_length steps are used and each row ends in zeros
    (the same zeros LLaDA's `get_num_transfer_tokens` gives for the "none"
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
