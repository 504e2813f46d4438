"""Log-likelihood of an answer under a masked-diffusion LM: LLaDA's Monte Carlo ELBO.

log p(answer | prompt) >= -E_t E_mask [ sum over masked i of CE_i / t ], where a
fraction t of the answer's T tokens is masked. LLaDA (and LaViDa's, LLaDA-V's
harnesses) estimate it with mini-batches of b rows: one k ~ U{1..T} per mini-batch,
row j masks x_j = ((round(k + j*T/b) - 1) mod T) + 1 tokens (stratified over the
batch, so each mini-batch spans the noise levels), chosen uniformly at random; the
row's term is sum CE / (x_j / T). The estimate is minus the mean term over all rows.

Pure functions; the model enters as its logits for the noisy rows (see
`lmms/likelihood.py` for the jitted forward).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def noisy_answers(rng, answer_L, length, rows: int, mask_id: int):
  """LLaDA's `forward_process` for one mini-batch.

  answer_L: [L] int, the answer right-padded to L; length: its real T (1 <= T <= L,
  a traced scalar is fine). -> (noisy [rows, L] with masks, masked [rows, L] bool,
  ratio [rows] = x_j / T). Padding positions are never masked.
  """
  k_rng, perm_rng = jax.random.split(rng)
  big_l = answer_L.shape[0]
  t = jnp.asarray(length, jnp.int32)
  k = jax.random.randint(k_rng, (), 1, t + 1)
  x = jnp.round(k + jnp.arange(rows) * (t / rows)).astype(jnp.int32)
  x = (x - 1) % t + 1  # [rows] in 1..T
  real = jnp.arange(big_l) < t
  # A uniformly random subset of x_j real positions: the x_j smallest of iid scores.
  scores = jnp.where(real, jax.random.uniform(perm_rng, (rows, big_l)), 2.0)
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  masked = rank < x[:, None]
  noisy = jnp.where(masked, mask_id, answer_L[None, :])
  return noisy, masked, x / t


def elbo_terms(logits_RLV, answer_L, masked_RL, ratio_R):
  """Per row sum over masked positions of CE / ratio -> [rows] (LLaDA's loss)."""
  logp = jax.nn.log_softmax(logits_RLV.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, answer_L[None, :, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(masked_RL, ce, 0.0), axis=1) / ratio_R
