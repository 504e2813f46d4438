"""The masked-diffusion loss, with logits only at masked positions (SPEC §6.2).

Never materialises [2B, T, V] logits: the hidden states of the masked
positions are gathered into a static buffer of N rows (`gather_rows`), and the
LM head is applied to that buffer a vocabulary chunk at a time
(`chunked_cross_entropy`, [N, chunk] logits live at once, forward and
backward). Axes: B rows, T positions, D model width, V vocabulary, N gathered
(masked) positions.

Train-step sequence (LaViDa, complementary views; see `masking.py`):

  eligible = eligible_positions(labels_BT, fim_ids)
  m1, m2, p_B = complementary_masks(rng, eligible)
  e = lm.embed_tokens(jnp.array([mask_id]))[0]
  x = concat([apply_mask(x_BTD, m1, e), apply_mask(x_BTD, m2, e)])    # [2B, T, D]
  h = lm.hidden(x, valid)                                             # [2B, T, D]
  select, targets = concat([m1, m2]), concat([labels_BT, labels_BT])  # [2B, T]
  (Dream: select, targets = shift_left(select, False), shift_labels(targets))
  h_N, idx_N, valid_N = gather_rows(h, select, capacity)
  ce_N, argmax_N = chunked_cross_entropy(h_N, lm.head.dense_kernel(),
                                         targets.reshape(-1)[idx_N], chunk,
                                         return_argmax=True)
  row_N = idx_N // T
  loss, metrics = diffusion_loss(ce_N, valid_N, concat([p_B, p_B])[row_N], row_N,
                                 2B, correct_N=argmax_N == targets_N, ...)

Capacity: the two views partition the eligible positions, so both views
together select exactly Σ eligible positions (for Dream, at most that). Any
static bound on the number of label tokens in a batch is a safe capacity
(e.g. the data pipeline's cap on answer tokens per batch, or B·T at worst).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


# --- gathering the masked positions -------------------------------------------------


def gather_rows(h_BTD: jax.Array, select_BT: jax.Array, capacity: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The first `capacity` selected positions (row-major) in a static buffer.

  h: [B, T, D]; select: bool [B, T]. Returns h_N [capacity, D], index_N
  [capacity] int32 (flat index b·T + t into [B·T]; 0 in padding entries) and
  valid_N [capacity] bool (True for the real entries, which come first).
  If more than `capacity` positions are selected the extra ones are dropped:
  with concrete inputs this raises ValueError; under `jit` it cannot, so put
  `count_dropped(select, capacity)` in the step's metrics.
  """
  b, t, d = h_BTD.shape
  flat_S = select_BT.reshape(b * t)
  if not isinstance(flat_S, jax.core.Tracer):
    n = int(flat_S.sum())
    if n > capacity:
      raise ValueError(f"gather_rows: {n} positions are selected, more than the "
                       f"capacity of {capacity} rows")
  (index_N,) = jnp.nonzero(flat_S, size=capacity, fill_value=0)
  index_N = index_N.astype(jnp.int32)
  valid_N = jnp.arange(capacity) < flat_S.sum()
  return h_BTD.reshape(b * t, d)[index_N], index_N, valid_N


def count_dropped(select_BT: jax.Array, capacity: int) -> jax.Array:
  """How many selected positions `gather_rows` leaves out (0 when capacity suffices)."""
  return jnp.maximum(select_BT.sum() - capacity, 0)


# --- cross-entropy over vocabulary chunks ------------------------------------------
#
# Chunk i covers columns [lo_i, lo_i + C) with lo_i = i·C, except that the last
# chunk is moved left to [V − C, V) when V is not a multiple of C; its columns
# below lo_i were counted by the previous chunk and are left out ("fresh"
# marks the columns a chunk owns). So no padded copy of the kernel is made.


def _chunking(v: int, vocab_chunk: int) -> tuple[int, int]:
  if vocab_chunk < 1:
    raise ValueError(f"vocab_chunk is {vocab_chunk}, expected a positive chunk width")
  c = min(vocab_chunk, v)
  return c, -(-v // c)


def _chunk(h_ND, kernel_DV, i, c):
  """Logits [N, C] float32 of chunk i, its kernel slice, its columns and their ownership."""
  v = kernel_DV.shape[1]
  lo = i * c
  start = jnp.minimum(lo, v - c)
  w_DC = lax.dynamic_slice_in_dim(kernel_DV, start, c, axis=1)
  cdt = h_ND.dtype
  logits_NC = jnp.dot(h_ND, w_DC.astype(cdt), preferred_element_type=jnp.float32)
  col_C = start + jnp.arange(c)
  return logits_NC, w_DC, start, col_C, col_C >= lo


def _compute_dtype(h_ND, kernel_DV):
  return jnp.promote_types(h_ND.dtype, kernel_DV.dtype)


def _ce_forward(h_ND, kernel_DV, targets_N, vocab_chunk):
  c, n_chunks = _chunking(kernel_DV.shape[1], vocab_chunk)
  h = h_ND.astype(_compute_dtype(h_ND, kernel_DV))
  n = h.shape[0]

  def body(i, carry):
    m, s, tgt, best_val, best_idx = carry
    logits, _, start, col, fresh = _chunk(h, kernel_DV, i, c)
    logits = jnp.where(fresh[None, :], logits, -jnp.inf)
    chunk_max = logits.max(axis=1)
    new_m = jnp.maximum(m, chunk_max)
    s = s * jnp.exp(m - new_m) + jnp.exp(logits - new_m[:, None]).sum(axis=1)
    hit = (targets_N >= col[0]) & (targets_N <= col[-1]) & (targets_N >= i * c)
    local = jnp.clip(targets_N - start, 0, c - 1)
    tgt = tgt + jnp.where(hit, jnp.take_along_axis(logits, local[:, None], axis=1)[:, 0], 0.0)
    better = chunk_max > best_val   # strict: the first maximum wins, as in argmax
    best_idx = jnp.where(better, start + jnp.argmax(logits, axis=1).astype(jnp.int32), best_idx)
    return new_m, s, tgt, jnp.maximum(best_val, chunk_max), best_idx

  f32 = jnp.float32
  init = (jnp.full((n,), -jnp.inf, f32), jnp.zeros((n,), f32), jnp.zeros((n,), f32),
          jnp.full((n,), -jnp.inf, f32), jnp.zeros((n,), jnp.int32))
  m, s, tgt, _, best_idx = lax.fori_loop(0, n_chunks, body, init)
  lse = m + jnp.log(s)
  return lse - tgt, best_idx, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_ce(h_ND, kernel_DV, targets_N, vocab_chunk):
  ce, argmax, _ = _ce_forward(h_ND, kernel_DV, targets_N, vocab_chunk)
  return ce, argmax


def _chunked_ce_fwd(h_ND, kernel_DV, targets_N, vocab_chunk):
  ce, argmax, lse = _ce_forward(h_ND, kernel_DV, targets_N, vocab_chunk)
  return (ce, argmax), (h_ND, kernel_DV, targets_N, lse)


def _chunked_ce_bwd(vocab_chunk, res, cts):
  """d ce_n / d logits_nv = softmax_nv − [v = target_n]; recomputed chunk by chunk."""
  h_ND, kernel_DV, targets_N, lse = res
  g_N = cts[0].astype(jnp.float32)
  c, n_chunks = _chunking(kernel_DV.shape[1], vocab_chunk)
  cdt = _compute_dtype(h_ND, kernel_DV)
  h = h_ND.astype(cdt)

  def body(i, carry):
    dh, dk = carry
    logits, w, start, col, fresh = _chunk(h, kernel_DV, i, c)
    prob = jnp.where(fresh[None, :], jnp.exp(logits - lse[:, None]), 0.0)
    onehot = (col[None, :] == targets_N[:, None]) & fresh[None, :]
    dlogits = ((prob - onehot) * g_N[:, None]).astype(cdt)             # [N, C]
    dh = dh + jnp.dot(dlogits, w.astype(cdt).T, preferred_element_type=jnp.float32)
    dw = jnp.dot(h.T, dlogits, preferred_element_type=jnp.float32)      # [D, C]
    old = lax.dynamic_slice_in_dim(dk, start, c, axis=1)
    # Columns not owned by this chunk get exactly zero, so the overlap adds nothing.
    dk = lax.dynamic_update_slice_in_dim(dk, (old.astype(jnp.float32) + dw).astype(dk.dtype),
                                         start, axis=1)
    return dh, dk

  init = (jnp.zeros(h_ND.shape, jnp.float32), jnp.zeros_like(kernel_DV))
  dh, dk = lax.fori_loop(0, n_chunks, body, init)
  return dh.astype(h_ND.dtype), dk, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def chunked_cross_entropy(h_ND: jax.Array, kernel_DV: jax.Array, targets_N: jax.Array,
                          vocab_chunk: int, return_argmax: bool = False):
  """CE_n = logsumexp_v(h_n·W_v) − h_n·W_{target_n}, [N, C] logits at a time.

  h: [N, D]; kernel: [D, V] (the LM head, `lm.head.dense_kernel()`); targets: [N] int
  in [0, V) (entries outside give CE = logsumexp, finite; mask them out).
  vocab_chunk: static chunk width C; V need not be a multiple of it.
  Returns ce [N] float32, and with return_argmax also the argmax of the logits
  [N] int32 (first maximum), tracked chunk by chunk for the accuracy metric.

  Numerics: the matmuls take h and W in their promoted dtype (bf16 stays bf16)
  with float32 accumulation; logits, the online max/sum-exp and the softmax of
  the backward pass are float32. Differentiable in h and W through a custom
  VJP that recomputes each chunk's logits, so the backward also holds only
  [N, C] logits (plus the [D, V] kernel gradient it must return).
  """
  if h_ND.ndim != 2 or kernel_DV.ndim != 2 or h_ND.shape[1] != kernel_DV.shape[0]:
    raise ValueError(f"chunked_cross_entropy: h has shape {h_ND.shape} and kernel "
                     f"{kernel_DV.shape}, expected [N, D] and [D, V]")
  ce, argmax = _chunked_ce(h_ND, kernel_DV, targets_N.astype(jnp.int32), int(vocab_chunk))
  return (ce, argmax) if return_argmax else ce


# --- reduction to the training loss --------------------------------------------------


def diffusion_loss(ce_N: jax.Array, valid_N: jax.Array, p_N: jax.Array, row_N: jax.Array,
                   n_rows: int, weighting: str = "none", normalize: str = "tokens",
                   label_counts_B: jax.Array | None = None,
                   correct_N: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """The scalar loss from per-token CE at the gathered masked positions.

  ce, p: [N] float (p = the masking rate of the token's row); valid: bool [N];
  row: [N] int in [0, n_rows), the LM-batch row of each token (2B rows for the
  complementary views). weighting: 'none' (LaViDa) or 'inv_t' (CE / p).
  normalize:
    'tokens'       Σ w·CE / (number of masked tokens): LaViDa's plain mean over
                   all masked positions of both views;
    'per_sequence' LLaDA-V: (1 / n_rows) Σ_row Σ_{masked in row} w·CE /
                   label_counts[row]; label_counts [n_rows] = label tokens of
                   each row (rows with none contribute 0; with complementary
                   views pass the eligible counts tiled over both views).
  correct: optional bool [N] (argmax == target) for the accuracy metric.
  Returns (loss, metrics) with metrics loss, ce (unweighted mean CE over
  masked tokens), n_masked and, when given `correct`, accuracy.
  """
  if weighting not in ("none", "inv_t"):
    raise ValueError(f"weighting is {weighting!r}, expected 'none' or 'inv_t'")
  if normalize not in ("tokens", "per_sequence"):
    raise ValueError(f"normalize is {normalize!r}, expected 'tokens' or 'per_sequence'")
  ce = jnp.where(valid_N, ce_N.astype(jnp.float32), 0.0)   # where, not *: padding may be inf
  w_ce = ce / p_N.astype(jnp.float32) if weighting == "inv_t" else ce
  w_ce = jnp.where(valid_N, w_ce, 0.0)
  n_masked = valid_N.sum()
  denom = jnp.maximum(n_masked, 1).astype(jnp.float32)
  if normalize == "tokens":
    loss = w_ce.sum() / denom
  else:
    if label_counts_B is None:
      raise ValueError("normalize='per_sequence' needs label_counts_B, the number of "
                       "label tokens of each row")
    per_row = jax.ops.segment_sum(w_ce, row_N, num_segments=n_rows)
    counts = jnp.maximum(label_counts_B.astype(jnp.float32), 1.0)
    loss = (per_row / counts).sum() / n_rows
  metrics = {"loss": loss, "ce": ce.sum() / denom, "n_masked": n_masked}
  if correct_N is not None:
    metrics["accuracy"] = (correct_N & valid_N).sum() / denom
  return loss, metrics
