"""lavida-jax: LaViDa and LLaDA-V masked-diffusion vision-language models in JAX."""
from __future__ import annotations

__version__ = "0.1.0"


def load_pretrained(path: str, dtype: str = "float32", mesh=None, **config_overrides):
  """Loads a model from a checkpoint folder.

  path: a Hugging Face checkpoint folder (config.json + safetensors, single file or
  sharded with model.safetensors.index.json) of LaViDa-L, LaViDa-D or LLaDA-V; or an
  Orbax folder (a `params/` item beside config.json, as written by
  `python -m lavida_jax.convert hf-to-orbax` or by training; a CheckpointManager root
  gives its newest step). The family is read from config.json. mesh: place parameters
  sharded over it by their logical axis names; from Orbax each device reads only its
  own shard (default: the first device). config_overrides: LaViDaConfig fields, e.g.
  reference_compat=True.
  """
  from lavida_jax.checkpoint import orbax
  if orbax.is_orbax(path):
    return orbax.load_orbax(path, dtype=dtype, mesh=mesh, **config_overrides)
  from lavida_jax.checkpoint import hf
  return hf.load_hf(path, dtype=dtype, mesh=mesh, **config_overrides)
