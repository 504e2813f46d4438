"""LoRA adapters on the model's linear layers (issue 15).

`add_adapters(model, LoRAConfig(rank=16, alpha=32))` gives each targeted
`layers.Linear` (kernel W: [*in, *out], a leading 'layers' axis when stacked) two
fp32 `LoRAParam`s, A: [*in, r] and B: [r, *out], so that

    y = x W (+ b) + (alpha / r) · dropout(x) A B

(PEFT's LoRA, with PEFT's init: A ~ U(±1/sqrt(fan_in)), B = 0, so a fresh adapter
changes nothing). The base may be fp32, bf16 or int8 (`quant.py`: QLoRA); the
adapters stay fp32. `LoRAParam` is an `nnx.Param`, so the train step selects the
adapters alone by type (`train_step.split_params`) and everything else is frozen.
`merge(model)` folds W + (alpha / r) A B into the kernels and removes the adapters.

Targets are names: the LM's q, k, v, o, gate, up, down; "projector" (its fc1, fc2);
"vision" (the tower's attention and MLP linears, not the patch embedding).
Every adapter carries logical axis names: the kernel's input axes + "lora_rank" for
A, "lora_rank" + its output axes for B ("lora_rank" has no sharding rule:
replicated, it is r wide).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lavida_jax.models import layers

LM_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Opt-in: the LM head (its rows for words the base never trained, e.g. a new answer
# vocabulary), the projector, the vision tower's linears.
HEAD_TARGET = "head"
GROUP_TARGETS = ("projector", "vision")
VISION_LINEARS = ("q", "k", "v", "o", "fc1", "fc2")
RANK_AXIS = "lora_rank"


class LoRAParam(nnx.Param):
  """An adapter matrix (the only parameters a LoRA step trains)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: tuple[str, ...] = LM_TARGETS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank is {self.rank}; expected >= 1 (rank 0 means no LoRA)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout is {self.dropout}; expected 0 <= dropout < 1")
    known = LM_TARGETS + (HEAD_TARGET,) + GROUP_TARGETS
    unknown = sorted(set(self.targets) - set(known))
    if unknown or not self.targets:
      raise ValueError(f"unknown LoRA target(s) {unknown or '(none given)'}; expected names "
                       f"from {', '.join(known)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, c) -> "LoRAConfig | None":
    """From a config's `lora` block (rank 0: None, no LoRA); targets a comma string."""
    if not c.rank:
      return None
    targets = tuple(t.strip() for t in str(c.targets).split(",") if t.strip())
    return cls(int(c.rank), float(c.alpha), float(c.dropout), targets)


def is_target(path: tuple, targets) -> bool:
  """Whether the Linear at `path` (e.g. ('lm', 'blocks', 'attn', 'q')) is targeted."""
  path = tuple(map(str, path))
  group, name = path[0], path[-1]
  if group == "lm":
    if path == ("lm", HEAD_TARGET):
      return HEAD_TARGET in targets
    return name in targets and name in LM_TARGETS
  if group == "projector":
    return "projector" in targets
  if group == "vision":
    return "vision" in targets and "blocks" in path and name in VISION_LINEARS
  return False


def linears(model: nnx.Module):
  """(path, Linear) of every linear layer, in graph order."""
  return [(tuple(map(str, p)), m) for p, m in nnx.iter_graph(model)
          if isinstance(m, layers.Linear)]


def _layer_dims(linear: layers.Linear) -> tuple[int, ...]:
  """The leading stacked-layer dims of a Linear's kernel (() when not stacked)."""
  n = linear.kernel[...].ndim - len(linear.in_shape) - len(linear.out_shape)
  return tuple(linear.kernel[...].shape[:n])


def attach(linear: layers.Linear, a, b, scale: float, dropout: float = 0.0) -> None:
  """Sets a Linear's adapter: a [L.., *in, r], b [L.., r, *out] (fp32), and its scale."""
  names = linear.kernel.get_metadata().get("out_sharding") or (None,) * linear.kernel[...].ndim
  n_lead = len(_layer_dims(linear))
  lead, n_in = tuple(names[:n_lead]), len(linear.in_shape)
  in_names, out_names = tuple(names[n_lead:n_lead + n_in]), tuple(names[n_lead + n_in:])
  linear.lora_a = LoRAParam(jnp.asarray(a, jnp.float32),
                            out_sharding=lead + in_names + (RANK_AXIS,), eager_sharding=False)
  linear.lora_b = LoRAParam(jnp.asarray(b, jnp.float32),
                            out_sharding=lead + (RANK_AXIS,) + out_names, eager_sharding=False)
  linear.lora_scale, linear.lora_dropout = float(scale), float(dropout)


def add_adapters(model: nnx.Module, cfg: LoRAConfig, seed: int = 0) -> list[tuple]:
  """Gives every targeted Linear a fresh adapter (in place); returns their paths.

  Refuses a model with no targeted linear and a Linear that already has one.
  """
  found = [(p, m) for p, m in linears(model) if is_target(p, cfg.targets)]
  if not found:
    raise ValueError(f"LoRA targets {cfg.targets} match no linear layer of the model")
  key = jax.random.key(seed)
  for i, (path, linear) in enumerate(found):
    if linear.lora_a is not None:
      raise ValueError(f"{'/'.join(path)} already has a LoRA adapter")
    lead = _layer_dims(linear)
    fan_in = math.prod(linear.in_shape)
    bound = fan_in ** -0.5  # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, in]
    a = jax.random.uniform(jax.random.fold_in(key, i), lead + linear.in_shape + (cfg.rank,),
                           jnp.float32, -bound, bound)
    b = jnp.zeros(lead + (cfg.rank,) + linear.out_shape, jnp.float32)
    attach(linear, a, b, cfg.scale, cfg.dropout)
  return [p for p, _ in found]


def adapted(model: nnx.Module) -> list[tuple[tuple, layers.Linear]]:
  """(path, Linear) of the linears that carry an adapter."""
  return [(p, m) for p, m in linears(model) if m.lora_a is not None]


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its kernel (W + scale · A B, in W's dtype) and removes it.

  An int8 kernel cannot take a float update: merge before quantizing.
  """
  for path, linear in adapted(model):
    if linear.kernel_scale is not None:
      raise ValueError(f"cannot merge the LoRA adapter of {'/'.join(path)} into an int8 "
                       "kernel; load the base in float, merge, then quantize")
    w = linear.kernel[...]
    linear.kernel[...] = (w.astype(jnp.float32) + linear.lora_delta()).astype(w.dtype)
    linear.lora_a = linear.lora_b = linear.lora_key = None
    linear.lora_scale, linear.lora_dropout = 0.0, 0.0
  return model


def set_dropout_keys(model: nnx.Module, key) -> None:
  """Gives each adapter with dropout its own key (one per stacked layer) for one step.

  Called on the model rebuilt inside the loss; without it adapters apply no dropout.
  """
  for i, (_, linear) in enumerate(adapted(model)):
    if linear.lora_dropout > 0:
      lead = _layer_dims(linear)
      k = jax.random.fold_in(key, i)
      keys = jax.random.split(k, math.prod(lead)).reshape(lead) if lead else k
      linear.lora_key = nnx.Variable(jax.random.key_data(keys))
