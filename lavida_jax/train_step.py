"""The objective and the train step: pure functions, jitted once (SPEC §6).

state = {"step", "params" (trained groups, pure dict), "frozen" (the rest),
"opt_state", "rng"}. The model is rebuilt inside the step from a static
graphdef; frozen parameters get no gradient and no optimizer state.

batch (from `data/pipeline.py`, leading axis B): input_ids, labels [B, T] int32;
image_index [B, T, 4] int32, image_weight [B, T, 4] float32; pixel_values
[B, V, S, S, 3]; view_mask [B, V].
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lavida_jax.diffusion import loss as loss_lib
from lavida_jax.diffusion import masking
from lavida_jax.models import lora
from lavida_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class StepConfig:
  mask_id: int
  shifted_logits: bool = False  # Dream: the logit at i predicts token i + 1
  masking: str = "complementary"  # LaViDa | "iid" (LLaDA-V)
  eps: float = 1e-3
  weighting: str = "none"  # LaViDa | "inv_t"
  normalize: str = "tokens"  # LaViDa | "per_sequence" (LLaDA-V)
  fim_ids: tuple[int, ...] = ()
  vocab_chunk: int = 8192
  capacity: int | None = None  # gathered masked positions; None: every position
  grad_accum: int = 1

  def __post_init__(self):
    if self.masking not in ("complementary", "iid"):
      raise ValueError(f"masking is {self.masking!r}, expected 'complementary' or 'iid'")


def loss_fn(params, frozen, graphdef, batch, rng, sc: StepConfig):
  """-> (loss, metrics) for one (micro)batch."""
  model = nnx.merge(graphdef, nnx.State(params), nnx.State(frozen))
  lora.set_dropout_keys(model, jax.random.fold_in(rng, 1))  # (no-op without LoRA dropout)
  # Vision features are computed once and shared by both masked views.
  x = model.embed_packed(batch["input_ids"], batch["pixel_values"], batch["image_index"],
                         batch["image_weight"])
  labels = batch["labels"]
  b, t = labels.shape
  eligible = masking.eligible_positions(labels, sc.fim_ids)
  mask_emb = model.lm.embed_tokens(jnp.array([sc.mask_id]))[0]
  if sc.masking == "complementary":
    m1, m2, p = masking.complementary_masks(rng, eligible, sc.eps)
    x = jnp.concatenate([masking.apply_mask(x, m1, mask_emb),
                         masking.apply_mask(x, m2, mask_emb)])
    select, p = jnp.concatenate([m1, m2]), jnp.concatenate([p, p])
    labels, eligible = jnp.concatenate([labels, labels]), jnp.concatenate([eligible, eligible])
  else:
    select, p = masking.iid_mask(rng, eligible, sc.eps)
    x = masking.apply_mask(x, select, mask_emb)
  rows = labels.shape[0]
  x = constrain(x, ("batch", "length", None))
  h = model.lm.hidden(x)
  if sc.shifted_logits:
    select, labels = masking.shift_left(select, False), masking.shift_labels(labels)
  capacity = sc.capacity or rows * t
  h_n, idx, valid = loss_lib.gather_rows(h, select, capacity)
  h_n = constrain(h_n, ("batch", None))
  targets = labels.reshape(-1)[idx]
  head = model.lm.head.dense_kernel(h_n.dtype)  # int8 dequantized (QLoRA); + A B if adapted
  ce, argmax = loss_lib.chunked_cross_entropy(h_n, head, targets, sc.vocab_chunk,
                                              return_argmax=True)
  row = idx // t
  loss, metrics = loss_lib.diffusion_loss(
      ce, valid, p[row], row, rows, sc.weighting, sc.normalize,
      label_counts_B=eligible.sum(axis=1), correct_N=argmax == targets)
  metrics["dropped"] = loss_lib.count_dropped(select, capacity)
  return loss, metrics


def train_step(state: dict, batch: dict, *, graphdef, tx: optax.GradientTransformation,
               sc: StepConfig, schedules: dict | None = None) -> tuple[dict, dict]:
  """One optimizer step (with sc.grad_accum micro-batches) -> (new state, metrics)."""
  rng = jax.random.fold_in(state["rng"], state["step"])
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  if sc.grad_accum == 1:
    (_, metrics), grads = grad_fn(state["params"], state["frozen"], graphdef, batch, rng, sc)
  else:
    micro = jax.tree.map(lambda x: x.reshape(sc.grad_accum, -1, *x.shape[1:]), batch)

    def one(carry, xs):
      i, mb = xs
      (_, m), g = grad_fn(state["params"], state["frozen"], graphdef, mb,
                          jax.random.fold_in(rng, i), sc)
      return jax.tree.map(jnp.add, carry, (g, m)), None

    shapes = jax.eval_shape(lambda mb: loss_fn(state["params"], state["frozen"], graphdef,
                                               mb, rng, sc)[1], jax.tree.map(lambda x: x[0], micro))
    init = (jax.tree.map(jnp.zeros_like, state["params"]),
            jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes))
    (grads, metrics), _ = jax.lax.scan(one, init, (jnp.arange(sc.grad_accum), micro))
    grads = jax.tree.map(lambda g: g / sc.grad_accum, grads)
    metrics = jax.tree.map(lambda m: m / sc.grad_accum, metrics)

  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  for group, sched in (schedules or {}).items():
    metrics[f"lr/{group}"] = sched(state["step"])
  new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def split_params(model: nnx.Module, trained_groups: tuple[str, ...],
                 adapters_only: bool = False) -> tuple[Any, dict, dict]:
  """(graphdef, trained params, frozen params) as pure dicts, by optimizer group.

  adapters_only: only the groups' LoRA adapters are trained (models/lora.py).
  """
  from lavida_jax.optimizer import group_of
  trained = lambda path, _: group_of(path) in trained_groups
  kind = lora.LoRAParam if adapters_only else nnx.Param
  graphdef, params, frozen = nnx.split(model, nnx.All(kind, trained), ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
