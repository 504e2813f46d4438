"""The masked-diffusion sampler: LLaDA's `generate` with LaViDa's schedule, and
Fast-dLLM's parallel decoders (SPEC §7, §14).

Model-agnostic and pure: the model enters as a `Denoiser` (the block logits of
each row, optionally a refresh pass that rebuilds a cache: the dual KV cache),
or as a plain `denoise_fn(canvas, *operands) -> logits` over the whole canvas;
logits are already aligned to the canvas (the caller shifts Dream's logits and
owns the KV caches, SPEC §7.3). Decoders (static config, one program each):
  fixed      LaViDa's transfer counts: one `lax.scan` over num_blocks ·
             steps_per_block steps inside one `jax.jit` (`make_sampler`), the
             schedule a precomputed integer array (`transfer_schedule`, host);
             with `lookahead` the same commits from fewer, wider passes
             (`_sample_lookahead`);
  threshold  every mask of the block with confidence >= τ, at least one;
  factor     the top n with (n + 1)(1 − c_n) < f, at least one;
the last two in a `lax.while_loop` whose rows move through their blocks at
their own pace (`_sample_adaptive`).

Shapes: B rows, L = gen_length canvas positions, Lb = block_length, V the
vocabulary (the logits' last axis).

One step of the fixed decoder (SPEC §7.1), with `blk, s = divmod(step,
steps_per_block)` and `k = counts[:, blk, s]` (the adaptive decoders differ in
step 5's choice of positions):
  1. logits = denoise_fn(canvas) [B, L, V], cast to float32; only block `blk`
     (positions blk·Lb .. (blk+1)·Lb − 1) is used from here on, since every
     other position has confidence −∞ and is never committed;
  2. `forbid_ids` and `mask_id` (unless `forbid_mask=False`) get logit −∞
     (never sampled; the softmax of step 4 is taken over the remaining ids,
     like LLaDA's `logits_eos_inf`);
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

Deviation from LLaDA (default): `mask_id` is forbidden, so a committed position
never stays a mask (a trained model gives it negligible probability; with
LLaDA's code a predicted mask would be silently left masked) and confidences
are softmaxes over the other ids. `forbid_mask=False` is LaViDa's behaviour
(argmax and softmax over the whole vocabulary, mask id included), what the
Generator uses under `reference_compat`; the two differ only where the mask
logit is not negligible.

Forward passes: a step where every row has k = 0 skips `denoise_fn` (a
`lax.cond` inside the scan; LaViDa skips the same steps). Under `jax.vmap`
the cond becomes a select and the pass runs anyway. `forward_passes(counts)`
counts the passes actually made; `schedule.nfe` is the count for an all-mask
canvas.

Randomness (temperature > 0 or `random` confidence): row b at step t uses
`step_key(rng, b, t)` for one uniform draw over the block positions, which
gives both the Gumbel noise and the `random` confidence (`_noise`); for the
adaptive decoders t is the row's own step count. A row's result thus depends
only on its own canvas, counts, index and the key, never on the batch size or
the other rows.

Lookahead (fixed decoder, `lookahead` = J > 0): exact speculation. The
positions a step ranks just below its k commits are usually the next steps'
commits (the demo's captions: 82-89% for the next step). So each pass
denoises 1 + J canvases of a row side by side over its prompt cache: the
canvas now, and the canvases the next J steps would give if they committed
the last pass's runners-up with its tokens. Each is verified against the true
step from the one before it; the accepted prefix advances the row by up to
1 + J steps. Every accepted canvas is exactly the fixed decoder's (same
logits, keys and tie-breaks), so the tokens are the same; a wrong guess costs
only its share of the pass. Worth it where guesses mostly hold and a pass's
cost is its weights more than its rows: small batches of a model that is not
tiny (the d512 CPU bench: 32 steps in 17 passes, denoising 2.1x faster; the
demo's 3-layer d96 LM: fewer passes, no faster).
Needs a Denoiser whose `logits` take [B, S, L] canvases (`Denoiser.canvases`,
the prefix cache's). Passes (the NFE) count each pass once.

Caches: with a `Denoiser.refresh` (the dual cache), a row's first step in a
block is a refresh pass, its other steps read the cache. A batch whose rows all
refresh, or all read, makes one pass; a batch that mixes them (adaptive
decoders, rows in different blocks) makes both and keeps each row's own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lavida_jax.diffusion import schedule as schedule_lib

CONFIDENCES = ("low_confidence", "random", "margin", "entropy")
DECODERS = ("fixed", "threshold", "factor")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Sampler settings; hashable, so it is a static argument of `jax.jit`.

  gen_length: L, the canvas length. block_length: positions per block
  (L must be a multiple). steps: steps over all blocks (a multiple of the
  number of blocks). schedule, alpha: `schedule.transfer_counts`.
  lookahead: fixed decoder only: canvases guessed ahead and verified per pass
  (module docstring, Lookahead); 0 (default) makes one step per pass.
  temperature: 0 for argmax, > 0 for Gumbel-max sampling. confidence: one of
  CONFIDENCES. mask_id: the mask token. forbid_ids: ids never sampled at mask
  positions (EOS, BOS, header ids, ...). forbid_mask: the mask id is never
  sampled and left out of the confidence softmax (default); False includes
  it as LaViDa does (fixed decoder only: an adaptive decoder could then loop
  on a position that keeps predicting the mask).
  decoder (SPEC §14): "fixed" commits the schedule's counts (steps, schedule,
  alpha); "threshold" commits every mask of the block whose confidence is
  >= threshold (at least the most confident one); "factor" commits the top n,
  n the largest with (n + 1)(1 - c_n) < factor (at least one). The adaptive
  decoders take as many steps as the data needs (steps/schedule unused) and stop
  a row early once every mask left lies after a committed `stop_ids` token (the
  tail is then filled with that token).
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
  decoder: str = "fixed"
  threshold: float = 0.9
  factor: float = 1.0
  stop_ids: tuple[int, ...] = ()
  forbid_mask: bool = True
  lookahead: int = 0

  def __post_init__(self):
    if self.decoder not in DECODERS:
      raise ValueError(f"unknown decoder {self.decoder!r}; expected one of "
                       f"{', '.join(DECODERS)}")
    if self.decoder != "fixed" and self.confidence not in ("low_confidence", "margin"):
      raise ValueError(f"the {self.decoder} decoder compares probabilities; confidence "
                       f"must be low_confidence or margin, got {self.confidence!r}")
    if not self.forbid_mask and self.decoder != "fixed":
      raise ValueError(f"forbid_mask=False needs the fixed decoder, got {self.decoder!r}")
    if not (isinstance(self.lookahead, int) and self.lookahead >= 0):
      raise ValueError(f"lookahead must be an int >= 0, got {self.lookahead!r}")
    if self.lookahead and self.decoder != "fixed":
      raise ValueError(f"lookahead needs the fixed decoder, got {self.decoder!r}")
    if not 0 < self.threshold <= 1:
      raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
    if not (math.isfinite(self.factor) and self.factor > 0):
      raise ValueError(f"factor must be a finite number > 0, got {self.factor}")
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
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

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
  mask = {cfg.mask_id} if cfg.forbid_mask and cfg.mask_id < v else set()
  ids = sorted(set(cfg.forbid_ids) | mask)
  if not ids:
    return logits_BLV
  return logits_BLV.at[..., np.asarray(ids)].set(-jnp.inf)


class Denoiser(NamedTuple):
  """The model side of the sampler (the caller owns the model and its caches).

  logits(canvas [B, L], start [B], cache, *operands) -> [B, Lb, V] float: the
    logits of each row's current block, canvas positions start..start + Lb - 1,
    aligned (logit i predicts position i; the caller shifts Dream's).
  refresh: None, or (canvas, start, *operands) -> (block logits, cache): one pass
    over the whole canvas that also returns the cache `logits` reads afterwards
    (the dual cache, SPEC §14). It runs at each row's first step of a block;
    without it `cache` is None.
  cache_batch_axes: cache -> the cache's structure with each leaf's batch axis
    (an int), or None: axis 0 everywhere. Rows refresh at different steps, so a
    refresh replaces only the refreshed rows' part of the cache.
  setup: None, or (canvas0 [B, L], *operands) -> operands: loop-invariant work done
    once before the first step (the canvas's rotary angles); `logits` and
    `refresh` then receive its operands. XLA does not hoist such work out of
    the loop itself.
  canvases: `logits` also takes canvases [B, S, L] (S per row, each over the
    row's operands, none seeing another) -> [B, S, Lb, V]: the lookahead's pass.
  """
  logits: Callable[..., jax.Array]
  refresh: Callable[..., tuple[jax.Array, object]] | None = None
  cache_batch_axes: Callable[[object], object] | None = None
  setup: Callable[..., tuple] | None = None
  canvases: bool = False


def full_canvas_denoiser(denoise_fn: Callable[..., jax.Array], block_length: int) -> Denoiser:
  """A Denoiser from `denoise_fn(canvas, *operands) -> logits [B, L, V]`."""
  def logits(canvas, start, cache, *operands):
    del cache
    out = denoise_fn(canvas, *operands)
    if out.ndim != 3 or out.shape[:2] != canvas.shape:
      raise ValueError(f"denoise_fn returned logits of shape {out.shape}, "
                       f"expected {canvas.shape + ('V',)}")
    return block_slice(out, start, block_length)
  return Denoiser(logits)


def block_slice(x_BL, start_B, size: int):
  """x[b, start[b]:start[b] + size] for every row (any trailing axes)."""
  return jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, size, 0))(x_BL, start_B)


def block_update(x_BL, block_BLb, start_B):
  """x with x[b, start[b]:start[b] + Lb] = block[b]."""
  return jax.vmap(lambda x, y, s: jax.lax.dynamic_update_slice_in_dim(x, y, s, 0))(
      x_BL, block_BLb, start_B)


def _block_step(logits_BLbV, block_BLb, keys_B, select, cfg: SamplerConfig):
  """One denoising step on each row's block -> its new tokens [B, Lb]."""
  logits = _forbid(logits_BLbV.astype(jnp.float32), cfg)
  x0, conf = _predict(logits, keys_B, cfg)
  eligible = block_BLb == cfg.mask_id
  commit = select(jnp.where(eligible, conf, -jnp.inf), eligible)
  return jnp.where(commit, x0, block_BLb)


def _select_top_k(k_B):
  """The k_B[b] most confident eligible positions (ties: the lower position first)."""
  def select(conf_BLb, eligible_BLb):
    order = jnp.argsort(-conf_BLb, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)  # the inverse permutation
    return eligible_BLb & (rank < k_B[:, None])
  return select


def _select_threshold(tau: float):
  """Every eligible position with confidence >= tau, else the most confident one."""
  def select(conf_BLb, eligible_BLb):
    above = eligible_BLb & (conf_BLb >= tau)
    best = jax.nn.one_hot(jnp.argmax(conf_BLb, axis=-1), conf_BLb.shape[-1], dtype=bool)
    return above | (best & eligible_BLb & ~above.any(-1, keepdims=True))
  return select


def _select_factor(f: float):
  """The top n, n the largest with (n + 1)(1 - c_n) < f (c descending), at least 1."""
  def select(conf_BLb, eligible_BLb):
    c = -jnp.sort(-conf_BLb, axis=-1)  # descending; -inf (not eligible) last
    n = jnp.arange(1, c.shape[-1] + 1)
    ok = jnp.isfinite(c) & ((n + 1) * (1 - c) < f)
    k = jnp.maximum(jnp.max(jnp.where(ok, n, 0), axis=-1), 1)
    return _select_top_k(k)(conf_BLb, eligible_BLb)
  return select


def _empty_cache(den: Denoiser, canvas, operands):
  """Zeros shaped like the refresh pass's cache (the loops' initial carry)."""
  if den.refresh is None:
    return None
  start = jnp.zeros(canvas.shape[:1], jnp.int32)
  shapes = jax.eval_shape(den.refresh, canvas, start, *operands)[1]
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


def _block_logits(den: Denoiser, refresh_B, active_B, canvas, start_B, cache, operands):
  """(block logits [B, Lb, V] float32, cache) for the active rows: those in refresh_B
  take a refresh pass (and their new cache), the others a cached pass. A batch in
  step runs one pass; only a mixed batch (adaptive decoders) runs both."""
  def cached(cache):
    return den.logits(canvas, start_B, cache, *operands).astype(jnp.float32), cache

  if den.refresh is None:
    return cached(cache)

  def refreshed(cache):  # every active row refreshes; done rows never need a cache again
    logits, new = den.refresh(canvas, start_B, *operands)
    return logits.astype(jnp.float32), new

  def mixed(cache):
    logits_r, new = refreshed(cache)
    axes = (jax.tree.map(lambda _: 0, cache) if den.cache_batch_axes is None
            else den.cache_batch_axes(cache))

    def keep(axis, n, o):
      rows = refresh_B.reshape((1,) * axis + (-1,) + (1,) * (o.ndim - axis - 1))
      return jnp.where(rows, n, o)
    cache = jax.tree.map(keep, axes, new, cache)
    logits_c, _ = cached(cache)
    return jnp.where(refresh_B[:, None, None], logits_r, logits_c), cache

  refresh_B = refresh_B & active_B
  index = jnp.where(~refresh_B.any(), 0, jnp.where((refresh_B | ~active_B).all(), 1, 2))
  return jax.lax.switch(index, (cached, refreshed, mixed), cache)


def sample(denoise_fn, canvas0: jax.Array, counts: jax.Array, rng: jax.Array,
           cfg: SamplerConfig, *operands, return_history: bool = False,
           return_steps: bool = False, on_step=None):
  """Denoises the canvas; jit-compatible with `denoise_fn`, `cfg` static.

  Args:
    denoise_fn: a `Denoiser`, or `denoise_fn(canvas [B, L] int32, *operands)
      -> logits [B, L, V]`, pure JAX, aligned to the canvas (logits[:, i]
      predict the token at canvas position i).
    canvas0: [B, L] int, `mask_id` where to generate, fixed tokens elsewhere.
    counts: [B, num_blocks, steps_per_block] int, from `transfer_schedule`
      (used by the fixed decoder only).
    rng: a PRNG key (used only when temperature > 0 or confidence "random").
    cfg: the SamplerConfig.
    *operands: pytrees passed through to the denoiser (parameters, prefix KV
      cache): jit arguments, not constants, so new values never recompile.
    return_history: also return the canvas after every step.
    return_steps: also return steps [B] int32, the denoising steps each row
      took (its forward passes; a refresh pass counts as one).
    on_step: a host function `on_step(canvas [B, L], steps [B])` called after
      every denoising step, with `lookahead` after every pass (`jax.debug.callback`;
      streaming), steps as above.

  Returns:
    canvas [B, L] int32, then history [S, B, L] if asked (fixed: S =
    num_blocks · steps_per_block, history[t] the canvas after step t;
    threshold/factor: S = L, the canvas after each loop iteration, the last one
    repeated), then steps if asked.
  """
  canvas0 = jnp.asarray(canvas0).astype(jnp.int32)
  _check_canvas(canvas0.shape, cfg)
  den = (denoise_fn if isinstance(denoise_fn, Denoiser)
         else full_canvas_denoiser(denoise_fn, cfg.block_length))
  if den.setup is not None:
    operands = tuple(den.setup(canvas0, *operands))
  if cfg.lookahead and not den.canvases:
    raise ValueError("lookahead needs a Denoiser whose logits take [B, S, L] canvases "
                     "(Denoiser.canvases; the Generator's prefix cache)")
  if cfg.decoder == "fixed":
    counts = jnp.asarray(counts).astype(jnp.int32)
    expected = (canvas0.shape[0], cfg.num_blocks, cfg.steps_per_block)
    if counts.shape != expected:
      raise ValueError(f"counts has shape {counts.shape}, expected (batch, "
                       f"num_blocks, steps_per_block) = {expected}")
    fixed = _sample_lookahead if cfg.lookahead else _sample_fixed
    canvas, history, steps = fixed(den, canvas0, counts, rng, cfg, operands,
                                   return_history, on_step)
  else:
    canvas, history, steps = _sample_adaptive(den, canvas0, rng, cfg, operands,
                                              return_history, on_step)
  out = (canvas,) + ((history,) if return_history else ()) + ((steps,) if return_steps else ())
  return out if len(out) > 1 else canvas


def _sample_fixed(den: Denoiser, canvas0, counts, rng, cfg: SamplerConfig, operands,
                  return_history: bool, on_step=None):
  """The schedule's counts: one `lax.scan` over num_blocks · steps_per_block steps.

  A step where every row has k = 0 skips the forward pass (`lax.cond`). With a
  refresh (dual cache) the first step of each block is the refresh pass.
  """
  batch = canvas0.shape[0]
  nb, spb, lb = cfg.num_blocks, cfg.steps_per_block, cfg.block_length
  rows = jnp.arange(batch)

  def body(carry, step):
    canvas, cache, steps = carry
    k = counts[:, step // spb, step % spb]
    start = jnp.full((batch,), (step // spb) * lb, jnp.int32)

    def denoise(canvas, cache):
      refresh = jnp.full((batch,), step % spb == 0)
      logits, cache = _block_logits(den, refresh, k > 0, canvas, start, cache, operands)
      keys = jax.vmap(step_key, (None, 0, None))(rng, rows, step)
      block = _block_step(logits, block_slice(canvas, start, lb), keys,
                          _select_top_k(k), cfg)
      return block_update(canvas, block, start), cache

    active = jnp.any(k > 0)
    canvas, cache = jax.lax.cond(active, denoise, lambda c, m: (c, m), canvas, cache)
    carry = (canvas, cache, steps + active.astype(jnp.int32))
    if on_step is not None:
      jax.debug.callback(on_step, canvas, carry[2])
    return carry, (canvas if return_history else None)

  carry = (canvas0, _empty_cache(den, canvas0, operands), jnp.zeros((batch,), jnp.int32))
  (canvas, _, steps), history = jax.lax.scan(body, carry, jnp.arange(nb * spb))
  return canvas, history, steps


def _sample_lookahead(den: Denoiser, canvas0, counts, rng, cfg: SamplerConfig, operands,
                      return_history: bool, on_step=None):
  """The fixed decoder's steps, up to 1 + lookahead per pass (module docstring).

  Each row walks its live steps (k > 0) in order at its own pace: a
  `lax.while_loop` until every row has made them all. Carry per row: the
  canvas, live steps done, and the last pass's ranking of its block (rank of
  each position by confidence, its x0, and how many of it were committed),
  from which the next pass's canvases are guessed.
  """
  batch, length = canvas0.shape
  nb, spb, lb = cfg.num_blocks, cfg.steps_per_block, cfg.block_length
  width, total = cfg.lookahead + 1, nb * spb
  rows = jnp.arange(batch)
  flat = counts.reshape(batch, total)
  n_live = (flat > 0).sum(-1)
  # live steps in order, then `total` (past the end) as padding
  live_steps = jnp.argsort(flat == 0, axis=-1, stable=True).astype(jnp.int32)
  live_steps = jnp.where(jnp.arange(total)[None] < n_live[:, None], live_steps, total)
  live_steps = jnp.concatenate([live_steps, jnp.full((batch, width), total, jnp.int32)], -1)

  def body(carry):
    canvas, done, rank, guess, used, passes, history = carry
    step = jax.vmap(lambda r, d: jax.lax.dynamic_slice_in_dim(r, d, width))(
        live_steps, done)                                           # [B, S]
    k = jnp.take_along_axis(flat, jnp.minimum(step, total - 1), -1) * (step < total)
    blk = step // spb
    start = jnp.minimum(blk[:, 0], nb - 1) * lb
    block = block_slice(canvas, start, lb)                          # [B, Lb]
    # canvas j commits the ranking's next (k_0 + .. + k_{j-1}) positions
    ahead = jnp.cumsum(k, -1) - k                                   # [B, S]
    pick = ((rank[:, None] >= used[:, None, None])
            & (rank[:, None] < (used[:, None] + ahead)[..., None])
            & (block[:, None] == cfg.mask_id))
    blocks = jnp.where(pick, guess[:, None], block[:, None])       # [B, S, Lb]
    canvases = jax.vmap(block_update, (None, 1, None), 1)(canvas, blocks, start)
    logits = den.logits(canvases, start, None, *operands)           # [B, S, Lb, V]
    logits = _forbid(logits.astype(jnp.float32), cfg)
    keys = jax.vmap(jax.vmap(step_key, (None, None, 0)), (None, 0, 0))(rng, rows, step)
    x0, conf = jax.vmap(lambda lg, ks: _predict(lg, ks, cfg), 1, 1)(logits, keys)
    eligible = blocks == cfg.mask_id
    conf = jnp.where(eligible, conf, -jnp.inf)
    order = jnp.argsort(-conf, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1).astype(jnp.int32)           # [B, S, Lb]
    after = jnp.where(eligible & (ranks < k[..., None]), x0, blocks)  # each canvas's step
    # canvas j is a true canvas of the fixed decoder if j - 1 was and its step gave j
    real = (step < total) & (blk == blk[:, :1])
    follows = jnp.all(after[:, :-1] == blocks[:, 1:], -1)
    ok = jnp.cumprod(jnp.concatenate([real[:, :1], real[:, 1:] & follows], -1), -1)
    made = ok.sum(-1)                                               # steps this pass
    last = jnp.maximum(made - 1, 0)
    pick_last = lambda a: jnp.take_along_axis(a, last.reshape((-1,) + (1,) * (a.ndim - 1)),
                                              1)[:, 0]
    moved = made > 0
    canvas = jnp.where(moved[:, None], block_update(canvas, pick_last(after), start), canvas)
    if return_history:  # each made step's canvas at its step index
      full = jax.vmap(block_update, (1, 1, None), 1)(canvases, after, start)  # [B, S, L]
      at = jnp.where(ok.astype(bool), step, total)
      history = history.at[at, rows[:, None]].set(full, mode="drop")
    carry = (canvas, done + made, pick_last(ranks), pick_last(x0).astype(jnp.int32),
             jnp.where(moved, pick_last(k), used), passes + moved.astype(jnp.int32), history)
    if on_step is not None:
      jax.debug.callback(on_step, canvas, carry[5])
    return carry

  zeros_b = jnp.zeros((batch,), jnp.int32)
  history = jnp.zeros((total + 1, batch, length), jnp.int32) if return_history else None
  no_rank = jnp.full((batch, lb), jnp.iinfo(jnp.int32).max, jnp.int32)  # nothing guessed
  carry = (canvas0, zeros_b, no_rank,
           jnp.full((batch, lb), cfg.mask_id, jnp.int32), zeros_b, zeros_b, history)
  canvas, _, _, _, _, passes, history = jax.lax.while_loop(
      lambda c: jnp.any(c[1] < n_live), body, carry)
  if return_history:  # steps without a commit keep the canvas before them
    live = (flat > 0).T                                             # [total, B]

    def fill(prev, x):
      made, canvas = x
      out = jnp.where(made[:, None], canvas, prev)
      return out, out
    _, history = jax.lax.scan(fill, canvas0, (live, history[:total]))
  return canvas, history, passes


def _sample_adaptive(den: Denoiser, canvas0, rng, cfg: SamplerConfig, operands,
                     return_history: bool, on_step=None):
  """Threshold / factor decoding: a `lax.while_loop` until every row is done.

  Each row works on its first block that still has a mask; it moves on when
  that block is full, and is done when no mask is left or every mask left lies
  after a committed stop token. Per row: its own step count (its PRNG step
  index and NFE) and its previous block (a new block means a refresh pass), so
  a row's tokens never depend on its batch-mates.
  """
  batch, length = canvas0.shape
  nb, lb = cfg.num_blocks, cfg.block_length
  rows = jnp.arange(batch)
  select = (_select_threshold(cfg.threshold) if cfg.decoder == "threshold"
            else _select_factor(cfg.factor))

  def status(canvas):
    """(active [B], current block [B])."""
    masks = canvas == cfg.mask_id
    if cfg.stop_ids:  # masks after the first stop token no longer count
      stop = jnp.isin(canvas, jnp.asarray(cfg.stop_ids))
      first_stop = jnp.where(stop.any(-1), jnp.argmax(stop, -1), length)
      masks &= jnp.arange(length)[None] < first_stop[:, None]
    has = masks.reshape(batch, nb, lb).any(-1)
    return has.any(-1), jnp.argmax(has, -1).astype(jnp.int32)

  def cond(carry):
    return status(carry[0])[0].any()

  def body(carry):
    canvas, cache, steps, prev_block, it, history = carry
    active, block = status(canvas)
    start = block * lb
    refresh = active & (block != prev_block)
    logits, cache = _block_logits(den, refresh, active, canvas, start, cache, operands)
    keys = jax.vmap(step_key, (None, 0, 0))(rng, rows, steps)
    tokens = block_slice(canvas, start, lb)
    new = _block_step(logits, tokens, keys, select, cfg)
    canvas = block_update(canvas, jnp.where(active[:, None], new, tokens), start)
    if return_history:
      history = history.at[it].set(canvas)
    if on_step is not None:
      jax.debug.callback(on_step, canvas, steps + active)
    return (canvas, cache, steps + active, jnp.where(active, block, prev_block), it + 1,
            history)

  history0 = (jnp.zeros((length, batch, length), jnp.int32) if return_history else None)
  carry = (canvas0, _empty_cache(den, canvas0, operands), jnp.zeros((batch,), jnp.int32),
           jnp.full((batch,), -1, jnp.int32), jnp.int32(0), history0)
  canvas, _, steps, _, it, history = jax.lax.while_loop(cond, body, carry)
  if cfg.stop_ids:  # fill the tail of an early-stopped row with its stop token
    stop = jnp.isin(canvas, jnp.asarray(cfg.stop_ids))
    first = jnp.take_along_axis(canvas, jnp.argmax(stop, -1)[:, None], -1)
    canvas = jnp.where(canvas == cfg.mask_id, first, canvas)
  if return_history:
    history = jnp.where(jnp.arange(length)[:, None, None] < it, history, canvas[None])
  return canvas, history, steps


def make_sampler(denoise_fn, cfg: SamplerConfig, *, return_history: bool = False,
                 return_steps: bool = False, on_step=None, **jit_kwargs):
  """`sample` jitted once: `(canvas0, counts, rng, *operands) -> canvas`.

  Calls with the same shapes (one bucket) reuse one compilation.
  `jit_kwargs` go to `jax.jit` (in_shardings, out_shardings, donate_argnums).
  """
  def run(canvas0, counts, rng, *operands):
    return sample(denoise_fn, canvas0, counts, rng, cfg, *operands,
                  return_history=return_history, return_steps=return_steps,
                  on_step=on_step)
  return jax.jit(run, **jit_kwargs)
