"""AdamW with per-group learning rates and freezing by stage (SPEC §6.3).

Parameters fall into groups by the first element of their path: `vision`,
`projector` (with `image_newline`) and `lm`. A stage trains some groups; the
others are split off before differentiation, so they get no gradient, no
update and no optimizer state.
"""
from __future__ import annotations

import jax
import optax

GROUPS = ("vision", "projector", "lm")


def group_of(path: tuple) -> str:
  head = str(path[0])
  if head in ("projector", "image_newline"):
    return "projector"
  if head in GROUPS:
    return head
  raise ValueError(f"parameter {'/'.join(map(str, path))} belongs to no optimizer group")


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float = 0.03,
                final_ratio: float = 0.0) -> optax.Schedule:
  """Linear warmup to `peak`, then cosine decay to final_ratio * peak."""
  warmup = max(1, int(round(warmup_ratio * total_steps)))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=peak * final_ratio)


def make_optimizer(lrs: dict[str, float], total_steps: int, *, warmup_ratio=0.03,
                   final_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                   clip_norm=1.0) -> tuple[optax.GradientTransformation, dict]:
  """One AdamW per trained group (its own schedule), global-norm clipping first.

  lrs: {group: peak lr} for the *trained* groups only. Returns (tx, schedules).
  The tx expects a pytree of labels made with `param_labels`.
  """
  unknown = set(lrs) - set(GROUPS)
  if unknown:
    raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; expected {GROUPS}")
  schedules = {g: lr_schedule(lr, total_steps, warmup_ratio, final_ratio)
               for g, lr in lrs.items()}
  transforms = {g: optax.adamw(s, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
                for g, s in schedules.items()}
  chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  return optax.chain(*chain, optax.multi_transform(transforms, param_labels)), schedules


def param_labels(params: dict) -> dict:
  """{group: subtree} params (a pure dict) -> the same tree of group labels."""
  return jax.tree_util.tree_map_with_path(lambda path, _: group_of((path[0].key,)), params)
