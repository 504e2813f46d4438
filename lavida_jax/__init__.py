"""lavida-jax: LaViDa and LLaDA-V masked-diffusion vision-language models in JAX."""
from __future__ import annotations

__version__ = "0.1.0"


def load_pretrained(path: str, dtype: str = "float32", mesh=None, revision: str | None = None,
                    quantize: str | None = None, **config_overrides):
  """Loads a model from a checkpoint folder or a Hugging Face hub id.

  path: a Hugging Face checkpoint folder (config.json + safetensors, single file or
  sharded with model.safetensors.index.json) of LaViDa-L, LaViDa-D or LLaDA-V; or an
  Orbax folder (a `params/` item beside config.json, as written by
  `python -m lavida_jax.convert hf-to-orbax` or by training; a CheckpointManager root
  gives its newest step); or a hub id "org/name" (not an existing path), fetched with
  `huggingface_hub.snapshot_download` (config, weights and tokenizer files only) at
  `revision` into the cache under HF_HOME, or found there when HF_HUB_OFFLINE=1.
  The family is read from config.json. mesh: place parameters
  sharded over it by their logical axis names; from Orbax each device reads only its
  own shard (default: the first device). A LoRA training step (lora.json beside its
  adapters) loads its base and merges the adapters in. quantize: "int8" for int8 weight-only LM
  linears (`models/quant.py`, qwix; half the bytes of bf16). config_overrides:
  LaViDaConfig fields, e.g. reference_compat=True.
  """
  from lavida_jax.checkpoint import hub, orbax
  if quantize is not None:
    from lavida_jax.models import quant
    if quantize not in quant.QUANTIZE:
      raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(quant.QUANTIZE)}")
  path = hub.resolve(path, revision)
  if orbax.is_orbax(path):
    from lavida_jax.checkpoint import adapters
    if adapters.is_adapter_step(path):  # a LoRA step: its base + the adapters, merged
      model = adapters.load_adapter_step(path, dtype=dtype, mesh=mesh, **config_overrides)
    else:
      model = orbax.load_orbax(path, dtype=dtype, mesh=mesh, **config_overrides)
  else:
    from lavida_jax.checkpoint import hf
    model = hf.load_hf(path, dtype=dtype, mesh=mesh, **config_overrides)
  if quantize is not None:
    quant.quantize_lm(model)
    if mesh is not None:  # the int8 kernels and scales placed by their logical axes
      from lavida_jax import sharding
      model = sharding.shard_model(model, mesh)
  return model
