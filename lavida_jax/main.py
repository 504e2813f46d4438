"""Entry point: python -m lavida_jax.main --config=configs/<name>.py[:args] [--workdir=DIR].

With the default config (configs/cpu_demo.py) it builds a tiny model (or loads
`--config.checkpoint`), generates a scene of coloured shapes and runs it through
the whole multimodal forward pass on the mesh the config asks for.
"""
from __future__ import annotations

import os
import time

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                               "cpu_demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "Config file (default: the CPU demo).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs go (unused by the demo).")


def run(cfg) -> dict:
  import jax
  import numpy as np
  from flax import nnx

  import lavida_jax
  from lavida_jax import image as image_lib
  from lavida_jax import sharding, text
  from lavida_jax.data import shapes
  from lavida_jax.models.lavida import LaViDa, LaViDaConfig, param_count

  mesh = sharding.make_mesh(tuple(cfg.mesh))
  t0 = time.perf_counter()
  if cfg.checkpoint:
    model = lavida_jax.load_pretrained(cfg.checkpoint, dtype=cfg.dtype, mesh=mesh)
  else:
    mcfg = LaViDaConfig.create(cfg.model, cfg.size)
    model = sharding.create_sharded(
        lambda: LaViDa(mcfg, rngs=nnx.Rngs(cfg.seed), param_dtype=cfg.dtype, dtype=cfg.dtype),
        mesh)
  load_s = time.perf_counter() - t0

  scene = shapes.sample_scene(np.random.default_rng(cfg.seed), tuple(cfg.image_size))
  pixels, image_size = image_lib.process_anyres(shapes.render(scene, tuple(cfg.image_size)),
                                                model.cfg.image)
  # Token ids of a stand-in prompt: the demo has no trained tokenizer yet, so the
  # prompt's bytes are mapped into the vocabulary around one <image> marker.
  vocab = model.cfg.lm.n_embed
  words = [b % (vocab - 2) for b in cfg.prompt.encode()]
  ids = np.array([[1, text.IMAGE_TOKEN_ID, *words]])
  with jax.set_mesh(mesh):
    t1 = time.perf_counter()
    logits = jax.block_until_ready(model.logits(ids, [(pixels, image_size)]))
    first_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    logits = jax.block_until_ready(model.logits(ids, [(pixels, image_size)]))
    second_s = time.perf_counter() - t2
  n_image = model.layout(pixels, image_size).num_tokens
  report = dict(family=model.cfg.family, params=param_count(model.cfg),
                mesh=dict(mesh.shape), scene=shapes.caption(scene), image_size=image_size,
                views=len(pixels), image_tokens=n_image, logits_shape=tuple(logits.shape),
                finite=bool(np.isfinite(np.asarray(logits)).all()),
                load_s=round(load_s, 2), first_call_s=round(first_s, 2),
                cached_call_s=round(second_s, 3))
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  report = run(_CONFIG.value)
  width = max(map(len, report))
  for key, value in report.items():
    print(f"{key:>{width}}: {value}")
  if not report["finite"]:
    raise SystemExit("the forward pass produced non-finite logits")


if __name__ == "__main__":
  app.run(main)
