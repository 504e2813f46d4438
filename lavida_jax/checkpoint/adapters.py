"""LoRA training steps: the adapters alone plus a reference to the base (issue 15).

A LoRA run's step folder (`WORKDIR/checkpoints/<step>/`) holds in `params/` only the
adapters, `nnx.to_pure_dict` of the `LoRAParam`s, e.g.
params['lm']['blocks']['attn']['q']['lora_a'] [L, D, r], and in its `files/` item,
beside config.json and the tokenizer, `lora.json`:

  {"base": the base checkpoint (Hugging Face or Orbax folder, or hub id),
   "rank", "alpha", "dropout", "targets": [...], "quantize": "" | "int8"}

`load_adapter_step(step)` loads the base (`load_pretrained`), gives it the recorded
adapters, restores their values (checksums verified) and, by default, merges them
into the kernels, so generate, evaluate, serve and convert take an adapter step
like any other.
"""
from __future__ import annotations

import json
import os

import jax
from flax import nnx
from jax.sharding import SingleDeviceSharding

from lavida_jax import sharding as sharding_lib
from lavida_jax.checkpoint import orbax
from lavida_jax.checkpoint.errors import CheckpointError
from lavida_jax.models import lora

LORA_FILE = "lora.json"


def lora_record(cfg: lora.LoRAConfig, base: str, quantize: str = "") -> dict:
  """lora.json's content; a local base path is recorded absolute."""
  if base and os.path.exists(base):
    base = os.path.abspath(base)
  return {"base": base, "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
          "targets": list(cfg.targets), "quantize": quantize or ""}


def read_record(step: str) -> dict | None:
  """A step's lora.json, or None when it is not an adapter step."""
  path = orbax.find_beside(step, LORA_FILE)
  if path is None:
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    lora.LoRAConfig(int(record["rank"]), float(record["alpha"]), float(record["dropout"]),
                    tuple(record["targets"]))
    if not isinstance(record["base"], str) or not record["base"]:
      raise ValueError("no base checkpoint")
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is corrupt: {str(e)[:100]}") from None
  return record


def is_adapter_step(path: str) -> bool:
  return orbax.is_orbax(path) and read_record(orbax.find_step(path)) is not None


def adapter_state(model: nnx.Module) -> dict:
  """The adapters as a pure dict (what an adapter step's params item holds)."""
  return nnx.to_pure_dict(nnx.state(model, lora.LoRAParam))


def load_adapter_step(path: str, dtype="float32", mesh=None, merge: bool = True,
                      **config_overrides):
  """The base named in lora.json with the step's adapters (merged unless merge=False)."""
  import lavida_jax  # pylint: disable=g-import-not-at-top

  step = orbax.find_step(path)
  orbax.verify_side_files(step)
  record = read_record(step)
  base = record["base"]
  # An int8 base cannot take the merge: load it in float, merge, quantize after.
  quantize = None if merge or not record["quantize"] else record["quantize"]
  try:
    model = lavida_jax.load_pretrained(base, dtype=dtype, quantize=quantize,
                                       **config_overrides)
  except (OSError, CheckpointError) as e:
    raise CheckpointError(f"adapter step {step}: cannot load its base {base} "
                          f"({str(e).splitlines()[0][:200]})") from None
  cfg = lora.LoRAConfig(int(record["rank"]), float(record["alpha"]), float(record["dropout"]),
                        tuple(record["targets"]))
  lora.add_adapters(model, cfg)
  expected = orbax.flatten(adapter_state(model))
  meta = orbax.params_metadata(step)
  orbax.check_params(meta, {k: v.shape for k, v in expected.items()}, step)
  device = SingleDeviceSharding(jax.devices()[0])
  target = orbax.unflatten({k: jax.ShapeDtypeStruct(v.shape, meta[k][1], sharding=device)
                            for k, v in expected.items()})
  values = orbax.flatten(orbax.restore_params(step, target))
  state = nnx.state(model, lora.LoRAParam)
  nnx.update(model, nnx.map_state(
      lambda p, v: v.replace(values["/".join(map(str, p))].astype(v.get_value().dtype)),
      state))
  if merge:
    lora.merge(model)
  if mesh is not None:
    model = sharding_lib.shard_model(model, mesh)
  return model
