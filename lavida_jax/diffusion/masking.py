"""The forward (noising) process of training: which answer tokens are masked.

Pure JAX, static shapes, explicit PRNG keys (SPEC §6.1). Axes: B = batch rows,
T = sequence positions (the spliced sequence the LM sees: text + image
tokens), D = embedding width. A position is *eligible* when it is a label
(the answer side, pad tokens included, SPEC §5) and not a `[FIM]` token.

Complementary masking (LaViDa, code; `forward_process` in `llava_llada.py`):

  t ~ U(0, 1) per row;  p = (1 − ε)·t + ε;  u ~ U(0, 1) per position;
  M = u ≤ max(p, min_T u)
  view 1 masks M ∧ eligible; view 2 masks ¬M ∧ eligible.

In LaViDa `min_T u` runs over **all** T positions of the row (prompt and image
positions included), not only the eligible ones: every row of M has at least
one True, but that True may fall on a prompt position, so view 1 can mask no
eligible token (with probability about (1 − p)^n for n eligible positions; it
is then view 2 that masks every eligible token, since the views partition the
eligible set). That is the default here (`min_over="all"`); `min_over=
"eligible"` takes the minimum over eligible positions only and so guarantees
at least one masked token in view 1 of every row that has an eligible
position. Either way the two views are exact complements over eligible
positions: each answer token is predicted exactly once per step. A row with no
eligible position gets all-False masks in both views (and contributes nothing
to the loss).

Masking is done in embedding space (`apply_mask`): masked rows of the input
embeddings are replaced by the embedding of the mask id; vision features are
computed once and shared by both views.

Dream (SPEC §3.4) predicts token i+1 from the logit at position i. Masks and
labels are drawn and applied in the *token* frame exactly as for LLaDA (the
token at i+1 is replaced by the mask embedding); the loss then reads the logit
at i for it: select `shift_left(masked_BT, False)` and target
`shift_labels(labels_BT)`, so position i is selected iff token i+1 is masked
and its target is token i+1. The last position predicts nothing, and a token at
position 0 (never an answer token) could never be predicted.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from lavida_jax.text import IGNORE_ID

EPS = 1e-3


def eligible_positions(labels_BT: jax.Array, fim_ids: Sequence[int] = ()) -> jax.Array:
  """labels: [B, T] int -> bool [B, T]: a label (≠ IGNORE_ID) and not a `[FIM]` id.

  `[FIM]` positions are never masked or predicted (SPEC §6.4); `[S]` are
  ordinary targets.
  """
  eligible = labels_BT != IGNORE_ID
  for fim_id in fim_ids:
    eligible &= labels_BT != fim_id
  return eligible


def sample_uniforms(rng: jax.Array, shape_BT: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """The randomness of one noising step: t [B] and u [B, T], float32 in [0, 1)."""
  rng_t, rng_u = jax.random.split(rng)
  b, t = shape_BT
  return (jax.random.uniform(rng_t, (b,), jnp.float32),
          jax.random.uniform(rng_u, (b, t), jnp.float32))


def mask_rate(t_B: jax.Array, eps: float = EPS) -> jax.Array:
  """p = (1 − ε)·t + ε: the masking probability of each row [B], float32."""
  return jnp.float32(1.0 - eps) * t_B.astype(jnp.float32) + jnp.float32(eps)


def _row_min(u_BT: jax.Array, over_BT: jax.Array | None) -> jax.Array:
  """min of u over each row [B, 1], restricted to `over_BT` when given (+inf if empty)."""
  if over_BT is not None:
    u_BT = jnp.where(over_BT, u_BT, jnp.inf)
  return u_BT.min(axis=1, keepdims=True)


def complementary_masks_from_uniforms(
    t_B: jax.Array, u_BT: jax.Array, eligible_BT: jax.Array, eps: float = EPS,
    min_over: str = "all") -> tuple[jax.Array, jax.Array, jax.Array]:
  """The complementary rule given its uniforms (see the module docstring).

  t: [B], u: [B, T] float32 in [0, 1); eligible: bool [B, T].
  Returns (masked1 [B, T], masked2 [B, T], p [B]) with masked1 ∨ masked2 =
  eligible and masked1 ∧ masked2 = False.
  """
  if min_over not in ("all", "eligible"):
    raise ValueError(f"min_over is {min_over!r}, expected 'all' or 'eligible'")
  p_B = mask_rate(t_B, eps)
  u_BT = u_BT.astype(jnp.float32)
  over = eligible_BT if min_over == "eligible" else None
  cutoff_B1 = jnp.maximum(p_B[:, None], _row_min(u_BT, over))
  m_BT = u_BT <= cutoff_B1
  return m_BT & eligible_BT, ~m_BT & eligible_BT, p_B


def complementary_masks(rng: jax.Array, eligible_BT: jax.Array, eps: float = EPS,
                        min_over: str = "all") -> tuple[jax.Array, jax.Array, jax.Array]:
  """LaViDa's complementary masks for one step.

  rng: a PRNG key; eligible: bool [B, T] (from `eligible_positions`).
  Returns (masked1 [B, T], masked2 [B, T], p [B]); the uniforms are
  `sample_uniforms(rng, eligible.shape)`.
  """
  t_B, u_BT = sample_uniforms(rng, eligible_BT.shape)
  return complementary_masks_from_uniforms(t_B, u_BT, eligible_BT, eps, min_over)


def iid_mask_from_uniforms(t_B: jax.Array, u_BT: jax.Array, eligible_BT: jax.Array,
                           eps: float = EPS, at_least_one: bool = True
                           ) -> tuple[jax.Array, jax.Array]:
  """LLaDA-V's i.i.d. rule given its uniforms: returns (masked [B, T], p [B]).

  at_least_one=True: masked = eligible ∧ (u ≤ max(p, min over eligible u)), so
  every row with an eligible position masks at least one. False reproduces
  LLaDA-V exactly (masked = eligible ∧ u < p; a row can mask nothing).
  """
  p_B = mask_rate(t_B, eps)
  u_BT = u_BT.astype(jnp.float32)
  if at_least_one:
    m_BT = u_BT <= jnp.maximum(p_B[:, None], _row_min(u_BT, eligible_BT))
  else:
    m_BT = u_BT < p_B[:, None]
  return m_BT & eligible_BT, p_B


def iid_mask(rng: jax.Array, eligible_BT: jax.Array, eps: float = EPS,
             at_least_one: bool = True) -> tuple[jax.Array, jax.Array]:
  """LLaDA-V's i.i.d. masking (no complement): returns (masked [B, T], p [B])."""
  t_B, u_BT = sample_uniforms(rng, eligible_BT.shape)
  return iid_mask_from_uniforms(t_B, u_BT, eligible_BT, eps, at_least_one)


def apply_mask(x_BTD: jax.Array, masked_BT: jax.Array, mask_embedding_D: jax.Array) -> jax.Array:
  """Masking in embedding space: rows of x where masked are replaced by the mask embedding.

  x: [B, T, D]; masked: bool [B, T]; mask_embedding: [D] (the embedding of the
  mask id, e.g. `lm.embed_tokens(jnp.array([mask_id]))[0]`, so it is trained).
  """
  return jnp.where(masked_BT[..., None], mask_embedding_D.astype(x_BTD.dtype), x_BTD)


def shift_left(x_BT: jax.Array, fill) -> jax.Array:
  """[B, T] -> [B, T] with out[:, i] = x[:, i + 1] and out[:, T − 1] = fill."""
  tail = jnp.full_like(x_BT[:, :1], fill)
  return jnp.concatenate([x_BT[:, 1:], tail], axis=1)


def shift_labels(labels_BT: jax.Array, ignore: int = IGNORE_ID) -> jax.Array:
  """Dream's targets: position i is trained to predict token i+1; the last is ignored.

  Same as the shift in `transformers`' causal-LM loss that LaViDa's Dream uses.
  Pair it with `shift_left(masked_BT, False)` as the selection (module docstring).
  """
  return shift_left(labels_BT, ignore)
