"""Times the real jitted train step on whatever backend is present (not a timed test).

Builds the config's model directly sharded on its mesh over the local devices,
the train state, and `train.make_step`'s jitted step (in/out shardings,
donation), feeds it a fixed host batch in the pipeline's exact format (one
packed example per row: the chat prompt with its image tokens expanded, the
answer, EOS padding as labels; random pixels), and reports

  compile     lower + compile of the step, seconds
  step        median (and min/max) of --steps timed steps after --warmup steps
  tokens/s    examples x length per step / median step time (input tokens;
              the LM processes twice as many rows under complementary masking)
  MFU         model FLOPs (lavida_jax.flops) / median / (devices x peak bf16), when
              the device's peak is known (TPU v4/v5e/v5p, H100; not on CPU)

  python benchmarks/train_step.py [--config=configs/cpu_demo.py[:args]]
      [--config.train.batch_size=8 ...] [--steps=10] [--warmup=2] [--runs=1]
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "cpu_demo.py"), "Config file[:args].",
    lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_RUNS = flags.DEFINE_integer("runs", 1, "Repeat the timed loop this many times (same "
                             "compiled step); the median over all timed steps is reported.")
_JSON = flags.DEFINE_string("json", "", "Append the result as a JSON line to this file.")


def tokenizer_and_specials(cfg):
  """The demo tokenizer for demo configs; for full-size models only the ids matter."""
  from lavida_jax import text
  from lavida_jax.data import demo, pipeline

  template = pipeline.template_for(cfg.model.family)
  if cfg.data.tokenizer == "demo":
    tok = demo.demo_tokenizer()
    return tok, demo.demo_special_tokens(template, tok), len(tok)
  if cfg.data.tokenizer and os.path.exists(cfg.data.tokenizer):
    tok = text.load_tokenizer(cfg.data.tokenizer)
    specials = text.SpecialTokens.dream() if template == "dream" else text.SpecialTokens.llada()
    return tok, specials, len(tok)
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  from aot_tpu import _FimTokenizer  # pylint: disable=g-import-not-at-top
  specials = text.SpecialTokens.dream() if template == "dream" else text.SpecialTokens.llada()
  return _FimTokenizer(cfg.model.family), specials, 0


def host_batch(cfg, mcfg, specials, n: int, seed: int = 0) -> dict:
  """n packed examples in the pipeline's format (`data/pipeline.py`), random content.

  Each row: one square image (all its anyres views, padded to max_views), a short
  question, an answer of ~length/8 tokens, EOS padding to `length` (labels too).
  """
  import numpy as np

  from lavida_jax import image as image_lib
  from lavida_jax.data import packing
  from lavida_jax.models.lavida import IMAGE_TOKEN_ID
  from lavida_jax.text import IGNORE_ID

  rng = np.random.default_rng(seed)
  length, max_views = cfg.data.length, mcfg.image.max_views
  size = (mcfg.image.size * 2, mcfg.image.size * 2) if mcfg.image.anyres else (
      mcfg.image.size, mcfg.image.size)
  views = image_lib.num_views(size, mcfg.image)
  image_tokens = packing.table_size(mcfg, max_views)  # an upper bound, to size the text
  n_text = max(4, min(64, (length - image_tokens) // 8)) if length > image_tokens else 2
  vocab = min(mcfg.lm.n_embed, 1000)
  s = mcfg.vision.image_size
  rows = []
  for _ in range(n):
    q = rng.integers(10, vocab, n_text)
    a = rng.integers(10, vocab, n_text)
    ids = np.concatenate([[IMAGE_TOKEN_ID], q, a])
    labels = np.concatenate([[IGNORE_ID] * (1 + n_text), a])
    rows.append(packing.pack_example(ids, labels, size, mcfg, length, specials.pad_id,
                                     max_views))
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  pixels = rng.uniform(-1, 1, (n, max_views, s, s, 3)).astype(np.float32)
  pixels[:, views:] = 0
  batch["pixel_values"] = pixels
  batch["view_mask"] = np.broadcast_to(np.arange(max_views) < views, (n, max_views)).copy()
  return batch


def main(argv):
  del argv
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lavida_jax import flops, optimizer, sharding, train
  from lavida_jax.data import pipeline

  cfg = _CONFIG.value
  t0 = time.perf_counter()
  mesh = sharding.make_mesh(tuple(cfg.mesh))
  tok, specials, vocab = tokenizer_and_specials(cfg)
  mcfg = train.model_config(cfg, specials, vocab)
  sc = train.step_config(cfg, mcfg, tok)
  groups = train.STAGE_GROUPS[cfg.train.stage]
  tx, schedules = optimizer.make_optimizer(
      {g: cfg.train.lr[g] for g in groups}, cfg.train.steps,
      warmup_ratio=cfg.train.warmup_ratio, final_ratio=cfg.train.final_ratio,
      weight_decay=cfg.train.weight_decay, clip_norm=cfg.train.clip_norm)
  model = train.init_model(cfg, mcfg, mesh)
  graphdef, state, shardings = train.init_state(model, groups, tx, cfg.train.seed, mesh)
  del model
  batch_spec = P(dict(sharding.DEFAULT_RULES)["batch"])
  step_batch = cfg.train.batch_size * cfg.train.grad_accum
  batch = pipeline.global_batch(host_batch(cfg, mcfg, specials, step_batch), mesh, batch_spec)
  run = train.make_step(graphdef, tx, sc, schedules, shardings, NamedSharding(mesh, batch_spec))
  t1 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = run.lower(state, batch).compile()
    t2 = time.perf_counter()
    for _ in range(_WARMUP.value):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_RUNS.value):
      for _ in range(_STEPS.value):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
  median = statistics.median(times)
  devices = jax.devices()
  label_tokens = (cfg.train.capacity or 2 * cfg.train.batch_size * cfg.data.length) \
      * cfg.train.grad_accum
  model_flops = flops.train_step_flops(
      mcfg, batch_size=step_batch, length=cfg.data.length, views=mcfg.image.max_views,
      label_tokens=label_tokens, trained=groups, masking=cfg.train.masking)
  peak = flops.peak_for(devices[0].device_kind)
  result = dict(
      config=next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                  "configs/cpu_demo.py"),
      backend=jax.default_backend(), device_kind=devices[0].device_kind,
      devices=len(devices), cpu_count=os.cpu_count(), machine=platform.machine(),
      mesh=dict(mesh.shape), batch=step_batch, grad_accum=cfg.train.grad_accum,
      length=cfg.data.length, setup_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2),
      steps=len(times), warmup=_WARMUP.value, runs=_RUNS.value,
      step_s_median=round(median, 4), step_s_min=round(min(times), 4),
      step_s_max=round(max(times), 4),
      tokens_per_s=round(step_batch * cfg.data.length / median, 1),
      model_tflop_per_step=round(model_flops.total / 1e12, 4),
      model_tflops_per_s=round(model_flops.total / median / 1e12, 4),
      mfu=None if peak is None else round(flops.mfu(model_flops.total, median, len(devices),
                                                    peak), 4),
      loss=float(np.asarray(metrics["loss"])))
  print(json.dumps(result, indent=1))
  if _JSON.value:
    with open(_JSON.value, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  app.run(main)
