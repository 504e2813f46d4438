"""Generation latency with and without the prefix KV cache (SPEC §7.3, issue 4).

A LaViDa-L-shaped model scaled to the machine: LLaDA structure (MHA, SwiGLU,
untied head) with --d_model/--layers, the real anyres pipeline on a 640x480
image (834 image tokens) plus the LaViDa system prompt, so the prefix is
~1000 tokens (bucket 1024) and the canvas L = 32, as in the paper's COCO
setting. Random weights: only speed is measured. For each NFE (100/50/25% of
L steps) and cache on/off: median latency per sample over --runs calls after
one warm-up (compilation) call, and time per forward pass.

  python benchmarks/generate.py --d_model=512 --layers=8 --runs=5
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

from lavida_jax import generate
from lavida_jax.data import demo, shapes
from lavida_jax.diffusion.sampler import SamplerConfig
from lavida_jax.models.lavida import LaViDa, LaViDaConfig


def build(d_model: int, layers: int, vision_width: int, dtype: str):
  tok = demo.demo_tokenizer()
  sp = demo.demo_special_tokens("llada", tok)
  cfg = LaViDaConfig.create("lavida-llada", "tiny")
  heads = max(1, d_model // 128)
  lm = dataclasses.replace(cfg.lm, vocab_size=len(tok), d_model=d_model, n_layers=layers,
                           n_heads=heads, n_kv_heads=heads, head_dim=d_model // heads,
                           mlp_dim=3 * d_model, mask_id=sp.mask_id, eos_id=sp.eos_id)
  vision = dataclasses.replace(cfg.vision, width=vision_width, num_heads=max(1, vision_width // 64),
                               mlp_dim=4 * vision_width)
  conn = dataclasses.replace(cfg.connector, vision_dim=vision_width, lm_dim=d_model)
  cfg = dataclasses.replace(cfg, lm=lm, vision=vision, connector=conn)
  model = LaViDa(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)
  return model, tok


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--d_model", type=int, default=512)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--vision_width", type=int, default=128)
  ap.add_argument("--gen_length", type=int, default=32)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--json", default=None, help="also write the results here")
  args = ap.parse_args()

  model, tok = build(args.d_model, args.layers, args.vision_width, args.dtype)
  scene = shapes.sample_scene(np.random.default_rng(0), (640, 480))
  image = shapes.render(scene, (640, 480))
  reqs = [generate.Request("Describe the image in detail.", image)] * args.batch
  ids, images = generate.prompt_ids(model, tok, reqs[0])
  prefix = len(ids) - 1 + model.layout(*images[0]).num_tokens
  print(f"backend={jax.default_backend()} devices={len(jax.devices())} "
        f"prefix={prefix} tokens (bucket {generate.bucket(prefix)}), L={args.gen_length}, "
        f"d_model={args.d_model} layers={args.layers} batch={args.batch} runs={args.runs}")
  rows = []
  L = args.gen_length
  for frac in (1.0, 0.5, 0.25):
    steps = max(1, int(L * frac))
    cfg = SamplerConfig(gen_length=L, block_length=L, steps=steps, mask_id=model.cfg.lm.mask_id)
    for cache in (True, False):
      gen = generate.Generator(model, tok, cfg, prefix_cache=cache)
      res = gen(reqs)  # compile
      times = []
      for _ in range(args.runs):
        t0 = time.perf_counter()
        res = gen(reqs)
        times.append((time.perf_counter() - t0) / args.batch)
      med = statistics.median(times)
      rows.append(dict(nfe_pct=int(frac * 100), steps=steps, prefix_cache=cache,
                       nfe=res[0].nfe, latency_s=med, per_pass_ms=1e3 * med / res[0].nfe))
  print(f"{'NFE':>5} {'steps':>5} {'cache':>6} {'passes':>6} {'latency s':>10} {'ms/pass':>8}")
  for r in rows:
    print(f"{r['nfe_pct']:>4}% {r['steps']:>5} {str(r['prefix_cache']):>6} {r['nfe']:>6} "
          f"{r['latency_s']:>10.3f} {r['per_pass_ms']:>8.1f}")
  for frac in (100, 50, 25):
    on = next(r for r in rows if r["nfe_pct"] == frac and r["prefix_cache"])
    off = next(r for r in rows if r["nfe_pct"] == frac and not r["prefix_cache"])
    print(f"speedup from the prefix cache at NFE {frac}%: {off['latency_s'] / on['latency_s']:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), prefix=prefix, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
