"""The full model's Monte Carlo ELBO of an answer (LLaDA's `get_log_likelihood`).

Every noisy row runs prompt + answer through the bidirectional LM (Full-DLM: the
prompt attends to the answer, as in LLaDA's estimator; a prefix cache would change
the quantity). The answer is right-padded to a bucket; padded positions are no keys
and are never masked, so a row's terms do not depend on the padding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavida_jax import generate
from lavida_jax.diffusion import likelihood as lik
from lavida_jax.diffusion import sampler as sampler_lib

ANSWER_BUCKET = 16  # answers are padded to a multiple of this: one compile per bucket


def _terms(lm_state, prefix_x_1PD, prefix_valid_1P, answer_L, length, rng, *, lm_graphdef,
           rows: int, mask_id: int, shifted: bool):
  """-> [rows] sum of CE / ratio over each noisy row's masked answer positions."""
  lm = nnx.merge(lm_graphdef, lm_state)
  noisy, masked, ratio = lik.noisy_answers(rng, answer_L, length, rows, mask_id)
  _, p, d = prefix_x_1PD.shape
  big_l = answer_L.shape[0]
  x = jnp.concatenate([jnp.broadcast_to(prefix_x_1PD, (rows, p, d)),
                       lm.embed_tokens(noisy).astype(prefix_x_1PD.dtype)], axis=1)
  valid = jnp.concatenate([jnp.broadcast_to(prefix_valid_1P, (rows, p)),
                           jnp.broadcast_to(jnp.arange(big_l) < length, (rows, big_l))], axis=1)
  h = lm.hidden(x, valid, jnp.cumsum(valid, axis=1) - 1)
  h = h[:, p - 1:-1] if shifted else h[:, p:]  # Dream: position i predicts i + 1
  return lik.elbo_terms(lm.logits_from_hidden(h), answer_L, masked, ratio)


class Scorer:
  """log p(continuation | prompt, image) >= ELBO, estimated with `mc_num` noisy rows
  in mini-batches of `rows` (LLaDA: 128 and 16; LaViDa's harness: 16 and 16)."""

  def __init__(self, model, tokenizer, system_prompt, mc_num: int = 128, rows: int = 16):
    if mc_num < 1 or rows < 1:
      raise ValueError(f"mc_num ({mc_num}) and mc_batch ({rows}) must be >= 1")
    self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
    self.batches, self.rows = max(mc_num // rows, 1), rows
    self._copy = generate.inference_copy(model)  # the Generators' arrangement, shared
    lm_graphdef, self.lm_state = nnx.split(self._copy.model.lm)
    self._terms = jax.jit(functools.partial(
        _terms, lm_graphdef=lm_graphdef, rows=rows, mask_id=model.cfg.lm.mask_id,
        shifted=model.cfg.lm.shifted_logits))
    self._greedy = {}

  def greedy(self, request: generate.Request, ids: list[int]) -> bool:
    """LLaDA's `is_target_greedy_dec`: would decoding len(ids) masks after the prompt,
    one token per step, most confident first, argmax (the Full-DLM fixed decoder),
    give exactly these token ids?"""
    if len(ids) not in self._greedy:  # one compiled sampler per answer length
      cfg = sampler_lib.SamplerConfig(gen_length=len(ids), block_length=len(ids),
                                      steps=len(ids), schedule="none",
                                      mask_id=self.model.cfg.lm.mask_id)
      self._greedy[len(ids)] = generate.Generator(self.model, self.tokenizer, cfg, "none",
                                                  system_prompt=self.system_prompt)
    return self._greedy[len(ids)]([request])[0].ids == ids

  def prefix(self, request: generate.Request):
    """The prompt's embeddings, left-padded to its bucket: (x [1, P, D], valid [1, P])."""
    ids, images = generate.prompt_ids(self.model, self.tokenizer, request, self.system_prompt)
    length = generate.bucket(generate.prompt_length(self.model, ids, images))
    return generate.embed_prompts(self._copy.model, [(ids, images)], length)

  def __call__(self, prefix, continuation: str, rng) -> float:
    """ELBO estimate of `continuation`'s tokens after `prefix` (from `prefix()`)."""
    ids = self.tokenizer.encode(continuation)
    if not ids:
      raise ValueError(f"continuation {continuation!r} has no tokens")
    padded = np.zeros(-(-len(ids) // ANSWER_BUCKET) * ANSWER_BUCKET, np.int32)
    padded[:len(ids)] = ids
    total = 0.0
    for key in jax.random.split(rng, self.batches):
      total += float(jnp.sum(self._terms(self.lm_state, *prefix, padded, len(ids), key)))
    return -total / (self.batches * self.rows)
