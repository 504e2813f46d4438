"""The masked-diffusion sampler: LLaDA's `generate` with LaViDa's schedule.

Model-agnostic and pure: the model enters as `denoise_fn(canvas, *operands)
-> logits`, a JAX function whose logits are already aligned to the canvas
(the caller shifts Dream's logits and owns the prefix KV cache, SPEC §7.3).
The whole loop over `num_blocks · steps_per_block` steps is one `lax.scan`
inside one `jax.jit` (`make_sampler`); the schedule is a precomputed integer
array (`transfer_schedule`, host side).

Shapes: B rows, L = gen_length canvas positions, Lb = block_length, V the
vocabulary (the logits' last axis).

One step (SPEC §7.1), with `blk, s = divmod(step, steps_per_block)` and
`k = counts[:, blk, s]`:
  1. logits = denoise_fn(canvas) [B, L, V], cast to float32; only block `blk`
     (positions blk·Lb .. (blk+1)·Lb − 1) is used from here on, since every
     other position has confidence −∞ and is never committed;
  2. `forbid_ids` and `mask_id` get logit −∞ (never sampled; the softmax of
     step 4 is taken over the remaining ids, like LLaDA's `logits_eos_inf`);
  3. x0 = argmax(logits) at temperature 0, else the Gumbel-max sample
     argmax(logits / T + g), g ~ Gumbel(0, 1) in float32 (LLaDA draws the
     same distribution in float64 as exp(logits) / (−log u)^T; the argmax is
     the same function of u, only the precision differs);
  4. confidence from the un-noised logits: `low_confidence` softmax(logits)[x0];
     `random` u ~ U[0, 1); `margin` top-1 − top-2 probability; `entropy`
     Σ p·log p (negative entropy; LaViDa's `entrophy` adds 1e-10 inside the
     log and works in float64, here log_softmax in float32);
  5. non-mask positions get −∞; per row the k most confident mask positions
     of the block are committed (ties: the lower position first) and take x0;
     a k above the block's remaining masks commits them all (LLaDA would
     also "commit" −∞ positions). Non-mask tokens (drafts, committed tokens)
     never change.

Deviation from LLaDA: `mask_id` is always forbidden, so a committed position
never stays a mask (a trained model gives it negligible probability; with
LLaDA's code a predicted mask would be silently left masked).

Forward passes: a step where every row has k = 0 skips `denoise_fn` (a
`lax.cond` inside the scan; LaViDa skips the same steps). Under `jax.vmap`
the cond becomes a select and the pass runs anyway. `forward_passes(counts)`
counts the passes actually made; `schedule.nfe` is the count for an all-mask
canvas.

Randomness (temperature > 0 or `random` confidence): row b at step t uses
`step_key(rng, b, t)` for one uniform draw over the block positions, which
gives both the Gumbel noise and the `random` confidence (`_noise`). A row's
result thus depends only on its own canvas, counts, index and the key, never
on the batch size or the other rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lavida_jax.diffusion import schedule as schedule_lib

CONFIDENCES = ("low_confidence", "random", "margin", "entropy")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Sampler settings; hashable, so it is a static argument of `jax.jit`.

  gen_length: L, the canvas length. block_length: positions per block
  (L must be a multiple). steps: steps over all blocks (a multiple of the
  number of blocks). schedule, alpha: `schedule.transfer_counts`.
  temperature: 0 for argmax, > 0 for Gumbel-max sampling. confidence: one of
  CONFIDENCES. mask_id: the mask token. forbid_ids: ids never sampled at mask
  positions (EOS, BOS, header ids, ...).
  """
  gen_length: int = 32
  block_length: int = 32
  steps: int = 32
  schedule: str = "shift"
  alpha: float = 1 / 3
  temperature: float = 0.0
  confidence: str = "low_confidence"
  mask_id: int = 126336
  forbid_ids: tuple[int, ...] = ()

  def __post_init__(self):
    schedule_lib._split_blocks(self.gen_length, self.block_length, self.steps)
    if self.schedule not in schedule_lib.SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r}; expected one of "
                       f"{', '.join(schedule_lib.SCHEDULES)}")
    if self.confidence not in CONFIDENCES:
      raise ValueError(f"unknown confidence {self.confidence!r}; expected one "
                       f"of {', '.join(CONFIDENCES)}")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature must be a finite number >= 0, got "
                       f"{self.temperature}")
    if not (math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}")
    ids = tuple(int(i) for i in self.forbid_ids)
    if any(i < 0 for i in ids):
      raise ValueError(f"forbid_ids must be >= 0, got {ids}")
    object.__setattr__(self, "forbid_ids", ids)

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks


# ------------------------------------------------------------------ host side

def _check_canvas(canvas0_shape, cfg: SamplerConfig) -> None:
  if len(canvas0_shape) != 2:
    raise ValueError(f"canvas must be [B, L], got shape {tuple(canvas0_shape)}")
  if canvas0_shape[1] != cfg.gen_length:
    raise ValueError(f"canvas width {canvas0_shape[1]} != gen_length "
                     f"{cfg.gen_length}")


def transfer_schedule(canvas0: np.ndarray, cfg: SamplerConfig) -> np.ndarray:
  """Per-row transfer counts for `sample`, from the masks of each block.

  canvas0: [B, L] token ids, `mask_id` where tokens are to be generated.
  Returns counts: [B, num_blocks, steps_per_block] int32; counts[b, j] is
  `transfer_counts(masks of row b in block j, steps_per_block)` padded with
  trailing zeros; all zeros for a block without masks (fixed draft text).
  Each counts[b, j] sums to the masks of row b in block j.
  """
  canvas0 = np.asarray(canvas0)
  _check_canvas(canvas0.shape, cfg)
  nb, spb = cfg.num_blocks, cfg.steps_per_block
  masks = (canvas0 == cfg.mask_id).reshape(len(canvas0), nb, cfg.block_length)
  masks = masks.sum(-1)
  counts = np.zeros((len(canvas0), nb, spb), np.int32)
  for (b, j), n in np.ndenumerate(masks):
    if n:
      row = schedule_lib.transfer_counts(int(n), spb, cfg.schedule, cfg.alpha)
      counts[b, j, :row.size] = row
  return counts


def forward_passes(counts: np.ndarray) -> int:
  """Calls of `denoise_fn` that `sample` makes: steps where some row has k > 0.

  counts: [B, num_blocks, steps_per_block]. Equals `schedule.nfe` for an
  all-mask canvas; fewer for drafts.
  """
  return int(np.any(np.asarray(counts) > 0, axis=0).sum())


def strip_fillers(ids, fill_ids) -> list[int]:
  """`ids` without the filler ids (`[S]` of the infilling model, SPEC §7.4)."""
  fill = {int(fill_ids)} if np.isscalar(fill_ids) else {int(i) for i in fill_ids}
  return [int(i) for i in ids if int(i) not in fill]


def stop_at(ids, stop_ids) -> list[int]:
  """`ids` up to (not including) the first stop id (EOS, end of turn)."""
  stop = {int(stop_ids)} if np.isscalar(stop_ids) else {int(i) for i in stop_ids}
  out = []
  for i in ids:
    if int(i) in stop:
      break
    out.append(int(i))
  return out


# ------------------------------------------------------------------ JAX side

def step_key(rng: jax.Array, row, step) -> jax.Array:
  """The key of row `row` at step `step` (module docstring, Randomness)."""
  return jax.random.fold_in(jax.random.fold_in(rng, row), step)


def _noise(keys_B, lb: int, v: int, cfg: SamplerConfig):
  """(Gumbel noise [B, Lb, V] or None, uniforms [B, Lb]): one draw per row.

  u = uniform(key, (Lb, V + 1) if temperature > 0 else (Lb, 1), in [tiny, 1));
  the Gumbel noise is −log(−log u[:, :V]) and the `random` confidence
  u[:, V]. (One draw instead of two: every threefry instance costs compile
  time, and the uniforms are independent either way.)
  """
  width = v + 1 if cfg.temperature > 0 else 1
  tiny = jnp.finfo(jnp.float32).tiny
  u = jax.vmap(lambda k: jax.random.uniform(
      k, (lb, width), jnp.float32, minval=tiny, maxval=1.0))(keys_B)
  gumbel = -jnp.log(-jnp.log(u[..., :v])) if cfg.temperature > 0 else None
  return gumbel, u[..., -1]


def _predict(logits_BLV: jax.Array, keys_B, cfg: SamplerConfig):
  """(x0 [B, Lb] int32, confidence [B, Lb] float32) from block logits."""
  b, lb, v = logits_BLV.shape
  if cfg.temperature > 0 or cfg.confidence == "random":
    gumbel, uniform = _noise(keys_B, lb, v, cfg)
  if cfg.temperature > 0:
    x0 = jnp.argmax(logits_BLV / cfg.temperature + gumbel, axis=-1)
  else:
    x0 = jnp.argmax(logits_BLV, axis=-1)
  x0 = x0.astype(jnp.int32)

  if cfg.confidence == "random":
    conf = uniform
  elif cfg.confidence == "low_confidence":
    probs = jax.nn.softmax(logits_BLV, axis=-1)
    conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
  elif cfg.confidence == "margin":
    top2 = jax.lax.top_k(jax.nn.softmax(logits_BLV, axis=-1), 2)[0]
    conf = top2[..., 0] - top2[..., 1]
  elif cfg.confidence == "entropy":
    logp = jax.nn.log_softmax(logits_BLV, axis=-1)
    p = jnp.exp(logp)
    conf = jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
  else:
    raise AssertionError(cfg.confidence)
  return x0, conf


def _forbid(logits_BLV: jax.Array, cfg: SamplerConfig) -> jax.Array:
  v = logits_BLV.shape[-1]
  bad = [i for i in cfg.forbid_ids if i >= v]
  if bad:
    raise ValueError(f"forbid_ids {bad} are outside the vocabulary of {v} "
                     "logits")
  ids = sorted(set(cfg.forbid_ids) | ({cfg.mask_id} if cfg.mask_id < v else set()))
  if not ids:
    return logits_BLV
  return logits_BLV.at[..., np.asarray(ids)].set(-jnp.inf)


def _commit(tokens_BL, x0_BL, conf_BL, k_B, mask_id):
  """Commits the k_B[b] most confident mask positions of each row."""
  eligible = tokens_BL == mask_id
  conf = jnp.where(eligible, conf_BL, -jnp.inf)
  order = jnp.argsort(-conf, axis=-1, stable=True)  # ties: lower position first
  rank = jnp.argsort(order, axis=-1)  # the inverse permutation
  commit = eligible & (rank < k_B[:, None])
  return jnp.where(commit, x0_BL, tokens_BL)


def sample(denoise_fn: Callable[..., jax.Array], canvas0: jax.Array,
           counts: jax.Array, rng: jax.Array, cfg: SamplerConfig, *operands,
           return_history: bool = False):
  """Denoises the canvas; jit-compatible with `denoise_fn`, `cfg` static.

  Args:
    denoise_fn: `denoise_fn(canvas [B, L] int32, *operands) -> logits
      [B, L, V]`, pure JAX, aligned to the canvas (logits[:, i] predict the
      token at canvas position i).
    canvas0: [B, L] int, `mask_id` where to generate, fixed tokens elsewhere.
    counts: [B, num_blocks, steps_per_block] int, from `transfer_schedule`.
    rng: a PRNG key (used only when temperature > 0 or confidence "random").
    cfg: the SamplerConfig.
    *operands: pytrees passed through to `denoise_fn` (parameters, prefix KV
      cache): jit arguments, not constants, so new values never recompile.
    return_history: also return the canvas after every step.

  Returns:
    canvas [B, L] int32; with return_history, (canvas, history [S, B, L])
    where S = num_blocks · steps_per_block and history[t] is the canvas after
    step t.
  """
  canvas0 = jnp.asarray(canvas0).astype(jnp.int32)
  counts = jnp.asarray(counts).astype(jnp.int32)
  _check_canvas(canvas0.shape, cfg)
  batch = canvas0.shape[0]
  nb, spb, lb = cfg.num_blocks, cfg.steps_per_block, cfg.block_length
  if counts.shape != (batch, nb, spb):
    raise ValueError(f"counts has shape {counts.shape}, expected (batch, "
                     f"num_blocks, steps_per_block) = {(batch, nb, spb)}")
  rows = jnp.arange(batch)

  def denoise_step(canvas, step):
    logits = denoise_fn(canvas, *operands)
    if logits.ndim != 3 or logits.shape[:2] != canvas.shape:
      raise ValueError(f"denoise_fn returned logits of shape {logits.shape}, "
                       f"expected {canvas.shape + ('V',)}")
    start = (step // spb) * lb
    logits = jax.lax.dynamic_slice_in_dim(logits, start, lb, axis=1)
    logits = _forbid(logits.astype(jnp.float32), cfg)
    keys = jax.vmap(step_key, (None, 0, None))(rng, rows, step)
    x0, conf = _predict(logits, keys, cfg)
    tokens = jax.lax.dynamic_slice_in_dim(canvas, start, lb, axis=1)
    k = counts[:, step // spb, step % spb]
    tokens = _commit(tokens, x0, conf, k, cfg.mask_id)
    return jax.lax.dynamic_update_slice_in_dim(canvas, tokens, start, axis=1)

  def body(canvas, step):
    k = counts[:, step // spb, step % spb]
    canvas = jax.lax.cond(jnp.any(k > 0), denoise_step, lambda c, _: c,
                          canvas, step)
    return canvas, (canvas if return_history else None)

  canvas, history = jax.lax.scan(body, canvas0, jnp.arange(nb * spb))
  return (canvas, history) if return_history else canvas


def make_sampler(denoise_fn: Callable[..., jax.Array], cfg: SamplerConfig, *,
                 return_history: bool = False, **jit_kwargs):
  """`sample` jitted once: `(canvas0, counts, rng, *operands) -> canvas`.

  Calls with the same shapes (one bucket) reuse one compilation.
  `jit_kwargs` go to `jax.jit` (in_shardings, out_shardings, donate_argnums).
  """
  def run(canvas0, counts, rng, *operands):
    return sample(denoise_fn, canvas0, counts, rng, cfg, *operands,
                  return_history=return_history)
  return jax.jit(run, **jit_kwargs)
