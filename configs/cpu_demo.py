"""CPU demo: a tiny LaViDa on a laptop CPU (the embedded default of lavida_jax.main).

Until the training loop lands this runs one end-to-end multimodal forward pass on
a generated image: pixels -> anyres views -> SigLIP -> projector/pool/newline ->
spliced prompt -> bidirectional LM logits.

Usage: python -m lavida_jax.main --config=configs/cpu_demo.py:model=lavida-dream
"""
import ml_collections


def parse_arg(arg: str | None, **defaults) -> dict:
  """'model=lavida-llada,size=tiny' -> dict, refusing unknown keys."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(defaults)}")
    out[key] = value
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, model="lavida-llada", size="tiny")
  cfg = ml_collections.ConfigDict()
  cfg.model = args["model"]  # lavida-llada | lavida-dream | llada-v
  cfg.size = args["size"]  # tiny | full (full needs ~34 GB in fp32)
  cfg.checkpoint = ""  # a Hugging Face checkpoint folder; empty: random init
  cfg.dtype = "float32"
  cfg.mesh = (1, -1, 1)  # (data, fsdp, tensor); -1 = all remaining devices
  cfg.seed = 0
  cfg.image_size = (640, 480)  # (W, H) of the generated demo image
  cfg.prompt = "What shapes are in the image?"
  return cfg
