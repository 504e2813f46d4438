"""Model FLOPs of one train step, from shapes only, and MFU (SPEC §9).

Convention (stated once, used by the benchmarks):

* Only matmuls are counted: 2 FLOPs per multiply-add. Norms, softmax, RoPE,
  activations, the bilinear pooling, the 4-tap image splice, embedding gathers
  and the optimizer update are left out (each is < 1% of the step).
* Per component, a forward pass costs F; its backward costs 2F if its weights are
  trained (input gradients + weight gradients) and F if it is frozen but a trained
  component sits upstream of it (input gradients only; stage 1's frozen LM carries
  the gradient back to the projector). A frozen component with nothing trained
  upstream (stage 1's vision tower) costs F alone. Attention's score and value
  matmuls have no weights: their backward is always 2F when gradients pass
  through. So "trained" parts cost 3F (MaxText's 6·N·tokens for the weights).
* Recomputation by remat is *not* counted: these are model FLOPs, not hardware
  FLOPs (XLA's `cost_analysis()` counts the recompute; the benchmarks show both).
* Vision tower (SigLIP): every view of every example in the batch, padded views
  included (the step encodes them: static shapes), P = grid² tokens per view,
  full attention 4·P²·W per layer; the patch embedding is a [14·14·3, W] matmul.
* Projector: per view, on all P tokens (the code projects before pooling).
* LM: the doubled batch of complementary masking (2B rows of T; LLaDA-V's i.i.d.
  masking: B rows), FULL bidirectional attention: QKᵀ and AV cost
  2·T²·(heads·head_dim) each, 4·T²·N·H per row and layer forward (no causal ½).
* LM head: only at the gathered masked positions, `label_tokens` rows (the
  step applies it to all `capacity` rows of its static buffer, so pass the
  capacity to count the work done, or the real label count to count the work
  needed).
"""
from __future__ import annotations

import dataclasses

# Peak dense bf16 FLOP/s per chip (SPEC §9); v4 and v5p per chip (2 TensorCores).
PEAK_BF16 = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "h100": 989e12}


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one optimizer step by component (all micro-batches together)."""
  vision: float
  projector: float
  lm_dense: float  # q/k/v/o and the MLP of every layer
  lm_attention: float  # QKᵀ and AV, full bidirectional
  lm_head: float

  @property
  def total(self) -> float:
    return self.vision + self.projector + self.lm_dense + self.lm_attention + self.lm_head

  def as_dict(self) -> dict[str, float]:
    return {**dataclasses.asdict(self), "total": self.total}


def vision_forward_per_view(vision) -> float:
  """One view through the SigLIP tower (a `SiglipConfig`)."""
  p, w, f = vision.num_patches, vision.width, vision.mlp_dim
  patch = 2 * p * (vision.patch_size ** 2 * 3) * w
  dense = 2 * p * (4 * w * w + 2 * w * f)
  attention = 4 * p * p * w
  return patch + vision.depth * (dense + attention)


def projector_forward_per_view(vision, connector) -> float:
  """The 2-layer MLP on every one of a view's grid² tokens (before pooling)."""
  h = connector.lm_dim
  return 2 * vision.num_patches * (connector.vision_dim * h + h * h)


def lm_dense_forward_per_token(lm) -> float:
  qkv_o = lm.d_model * lm.head_dim * (2 * lm.n_heads + 2 * lm.n_kv_heads)
  mlp = 3 * lm.d_model * lm.mlp_dim
  return 2 * lm.n_layers * (qkv_o + mlp)


def lm_attention_forward_per_row(lm, length: int) -> float:
  return lm.n_layers * 4 * length * length * lm.n_heads * lm.head_dim


def train_step_flops(mcfg, *, batch_size: int, length: int, views: int,
                     label_tokens: int, trained: tuple[str, ...],
                     masking: str = "complementary") -> StepFlops:
  """Model FLOPs of one train step (see the module docstring for the convention).

  mcfg: a `LaViDaConfig`; batch_size: examples per optimizer step (all
  micro-batches); length: T; views: views per example (padded ones included);
  label_tokens: rows the LM head is applied to per step; trained: the trained
  parameter groups ('vision', 'projector', 'lm').
  """
  if masking not in ("complementary", "iid"):
    raise ValueError(f"masking is {masking!r}, expected 'complementary' or 'iid'")
  unknown = set(trained) - {"vision", "projector", "lm"}
  if unknown:
    raise ValueError(f"unknown parameter group(s) {sorted(unknown)}")
  # Multipliers in pipeline order: vision -> projector -> LM -> head.
  mult, upstream = {}, False
  for group in ("vision", "projector", "lm"):
    if group in trained:
      mult[group] = 3
    else:
      mult[group] = 2 if upstream else 1
    upstream = upstream or group in trained
  attn_mult = 3 if upstream else 1  # weightless: the full 2F backward if any gradient flows
  rows = batch_size * (2 if masking == "complementary" else 1)
  n_views = batch_size * views
  lm = mcfg.lm
  return StepFlops(
      vision=mult["vision"] * n_views * vision_forward_per_view(mcfg.vision),
      projector=mult["projector"] * n_views * projector_forward_per_view(mcfg.vision,
                                                                         mcfg.connector),
      lm_dense=mult["lm"] * rows * length * lm_dense_forward_per_token(lm),
      lm_attention=attn_mult * rows * lm_attention_forward_per_row(lm, length),
      lm_head=mult["lm"] * label_tokens * 2 * lm.d_model * lm.vocab_size)


def mfu(flops_per_step: float, step_seconds: float, n_chips: int,
        peak_per_chip: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the slice's peak."""
  if step_seconds <= 0 or n_chips <= 0 or peak_per_chip <= 0:
    raise ValueError(f"mfu needs positive step time, chips and peak, got {step_seconds}, "
                     f"{n_chips}, {peak_per_chip}")
  return flops_per_step / step_seconds / (n_chips * peak_per_chip)


def peak_for(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of a device from its `device_kind` string, or None if unknown."""
  kind = device_kind.lower().replace(" ", "")
  for key, name in (("v5p", "v5p"), ("v5lite", "v5e"), ("v5e", "v5e"), ("v4", "v4"),
                    ("h100", "h100")):
    if key in kind:
      return PEAK_BF16[name]
  return None
