"""PEFT LoRA folders: our adapters out, PEFT's in (issue 15).

A PEFT LoRA folder holds adapter_config.json and adapter_model.safetensors with, for
each adapted `torch.nn.Linear` of the PyTorch model (its module name, as hf.py's key
tables give it: the row `{module}.weight` of a kernel),

  base_model.model.{module}.lora_A.weight   [r, in_features]
  base_model.model.{module}.lora_B.weight   [out_features, r]

and PEFT computes y = x W^T + (lora_alpha / r) (x A^T) B^T (lora_alpha / sqrt(r) with
use_rslora). Ours is A: [*in, r], B: [r, *out] on the kernel [*in, *out]; the key
tables' transforms flatten heads row-major ([D, N, H] <-> [N*H, D]), so for every
linear transform A_hf = A.reshape(in, r).T and B_hf = B.reshape(r, out).T, and back.

`export_peft(model, folder)` writes the folder (loads with
`peft.PeftModel.from_pretrained` onto the family's PyTorch model); `import_peft(model,
folder)` attaches a PEFT LoRA folder's adapters to a loaded model (per-module ranks
and alphas allowed: a stacked layer's ranks are zero-padded to the largest, which
leaves A B unchanged, and its per-layer scales folded into B when they differ).
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from lavida_jax.checkpoint import hf
from lavida_jax.checkpoint.errors import CheckpointError
from lavida_jax.checkpoint.shards import SafetensorsFile
from lavida_jax.models import lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
LINEAR_TRANSFORMS = ("linear", "heads_in", "heads_out")


def module_table(family: str) -> dict[str, str]:
  """{our Linear path: PyTorch module name pattern ('{i}' for the layer)}."""
  out = {}
  for hf_name, path, transform in hf.KEY_TABLES[family]:
    if path.endswith("/kernel") and transform in LINEAR_TRANSFORMS:
      out[path[:-len("/kernel")]] = hf_name[:-len(".weight")]
  return out


def _n_layers(linear) -> int | None:
  lead = linear.kernel[...].ndim - len(linear.in_shape) - len(linear.out_shape)
  return linear.kernel[...].shape[0] if lead else None


def export_peft(model: nnx.Module, folder: str, base: str | None = None) -> str:
  """Writes the model's adapters as a PEFT LoRA folder; returns the folder.

  base: recorded as base_model_name_or_path (a hub id or path of the base).
  """
  family = model.cfg.family
  table = module_table(family)
  found = lora.adapted(model)
  if not found:
    raise ValueError("the model has no LoRA adapter to export")
  tensors, modules, ranks, scales = {}, [], set(), set()
  for path, linear in found:
    key = "/".join(path)
    if key not in table:
      raise ValueError(f"{key} has no PyTorch module name in the {family} key table")
    a, b = np.asarray(linear.lora_a[...], np.float32), np.asarray(linear.lora_b[...], np.float32)
    r = a.shape[-1]
    ranks.add(r)
    scales.add(linear.lora_scale)
    n = _n_layers(linear)
    for i, (a_l, b_l) in enumerate(zip(*((a, b) if n else (a[None], b[None])))):
      name = table[key].format(i=i)
      tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_l.reshape(-1, r).T)
      tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_l.reshape(r, -1).T)
      modules.append(name)
  if len(ranks) != 1 or len(scales) != 1:
    raise ValueError(f"PEFT export needs one rank and one scale for all adapters, got ranks "
                     f"{sorted(ranks)} and scales {sorted(scales)}")
  (r,), (scale,) = ranks, scales
  first = found[0][1]
  os.makedirs(folder, exist_ok=True)
  # One regex over the exact module names: a suffix list would also catch e.g. OLMo's
  # head `model.transformer.ff_out` for the MLP's `ff_out`.
  pattern = "|".join(re.escape(table["/".join(p)]).replace(r"\{i\}", r"\d+") for p, _ in found)
  config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base,
      "r": r, "lora_alpha": scale * r, "lora_dropout": first.lora_dropout,
      "target_modules": f"^(?:{pattern})$", "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "init_lora_weights": True,
      "modules_to_save": None, "inference_mode": True, "rank_pattern": {},
      "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
      "revision": None}
  with open(os.path.join(folder, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=1)
  save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
  return folder


def read_config(folder: str) -> dict:
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{folder} is not a PEFT adapter folder: no {CONFIG_FILE}")
  try:
    with open(path) as f:
      config = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is corrupt: {str(e)[:100]}") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{path} is corrupt: not a JSON object")
  if config.get("peft_type") != "LORA":
    raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; "
                          "expected 'LORA'")
  for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
    if config.get(key, ok) != ok:
      raise CheckpointError(f"{path}: {key}={config[key]!r} is not supported (expected {ok!r})")
  if config.get("modules_to_save"):
    raise CheckpointError(f"{path}: modules_to_save {config['modules_to_save']} (fully "
                          "trained modules) is not supported; merge them into the base first")
  return config


def _alpha(config: dict, module: str) -> float:
  """PEFT's alpha for a module: alpha_pattern's first key matching its name's end."""
  for key, alpha in (config.get("alpha_pattern") or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return float(alpha)
  return float(config["lora_alpha"])


def import_peft(model: nnx.Module, folder: str) -> list[tuple]:
  """Attaches a PEFT LoRA folder's adapters to `model` (in place); returns their paths.

  Every tensor must belong to a linear layer of the family's key table and have its
  in/out width; an unknown key or shape is refused by name.
  """
  config = read_config(folder)
  family = model.cfg.family
  linears = dict(("/".join(p), m) for p, m in lora.linears(model))
  patterns = {path: re.compile(re.escape(name).replace(r"\{i\}", r"(\d+)") + r"$")
              for path, name in module_table(family).items() if path in linears}
  weights = os.path.join(folder, WEIGHTS_FILE)
  if not os.path.isfile(weights):
    raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
  grouped: dict[str, dict[int, dict]] = {}
  reader = SafetensorsFile(weights)
  try:
    for key in reader.keys():
      m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight", key)
      hit = None
      if m:
        hit = next(((path, p.match(m.group(1))) for path, p in patterns.items()
                    if p.match(m.group(1))), None)
      if hit is None:
        raise CheckpointError(f"PEFT tensor {key} in {weights} matches no linear layer of "
                              f"{family}")
      path, match = hit
      layer = int(match.group(1)) if match.groups() else 0
      entry = grouped.setdefault(path, {}).setdefault(layer, {"module": m.group(1)})
      entry[m.group(2)] = reader.get(key).astype(np.float32)
  finally:
    reader.close()
  for path, layers_ in grouped.items():
    _attach(linears[path], path, layers_, config)
  return [tuple(p.split("/")) for p in grouped]


def _attach(linear, path: str, layers_: dict[int, dict], config: dict) -> None:
  """One Linear's adapter from PEFT's per-layer (A [r, in], B [out, r]) pairs."""
  n_in, n_out = math.prod(linear.in_shape), math.prod(linear.out_shape)
  n = _n_layers(linear)
  if any(i >= (n or 1) for i in layers_):
    raise CheckpointError(f"PEFT adapter of {path} names layer {max(layers_)}, but the model "
                          f"has {n or 1}")
  rslora = bool(config.get("use_rslora", False))
  ranks, scales = {}, {}
  for i, e in layers_.items():
    if "A" not in e or "B" not in e:
      raise CheckpointError(f"PEFT adapter of {e['module']} lacks lora_{'B' if 'A' in e else 'A'}")
    r = e["A"].shape[0]
    if e["A"].shape != (r, n_in) or e["B"].shape != (n_out, r):
      raise CheckpointError(f"PEFT adapter of {e['module']} has lora_A {e['A'].shape} and "
                            f"lora_B {e['B'].shape}, expected ({r}, {n_in}) and ({n_out}, {r})")
    ranks[i] = r
    alpha = _alpha(config, e["module"])
    scales[i] = alpha / math.sqrt(r) if rslora else alpha / r
  r_max = max(ranks.values())
  uniform = len(set(scales.values())) == 1 and len(layers_) == (n or 1)
  a = np.zeros(((n or 1), n_in, r_max), np.float32)
  b = np.zeros(((n or 1), r_max, n_out), np.float32)
  for i, e in layers_.items():  # absent layers keep A = B = 0: no change
    r = ranks[i]
    a[i, :, :r] = e["A"].T
    b[i, :r, :] = e["B"].T * (1.0 if uniform else scales[i])
  a = a.reshape((n or 1,) + linear.in_shape + (r_max,))
  b = b.reshape((n or 1, r_max) + linear.out_shape)
  if n is None:
    a, b = a[0], b[0]
  scale = next(iter(scales.values())) if uniform else 1.0
  lora.attach(linear, a, b, scale, float(config.get("lora_dropout") or 0.0))
