"""Denoising step time of full-size LaViDa-L on one GPU, against the HBM floor (issue 12).

Random bf16 weights at the released sizes (SigLIP-so400m, LLaDA-8B), an anyres
768x768 image (1008 image tokens) plus the LaViDa system prompt and a question, so
the prompt is ~1,100 tokens. For L = 32 (one block) and L = 256 (blocks of 32), batch
1 and 8, and each cache (none / prefix / dual), the fixed decoder's sampler is timed
alone (the prompt's prefill is timed apart): time per denoising step = sampler time
÷ steps (with --lookahead, the fixed decoder's lookahead over the prefix cache: time
per pass, S = 1 + lookahead canvases a pass, and the 32 or 64 steps in fewer passes).
The floor of a step is max(LM weight bytes ÷ HBM bandwidth, FLOPs ÷ peak):
a decoding step reads every LM weight once. One warm-up (compilation) call, then
--runs timed calls; medians.

  python benchmarks/gpu_decode.py --runs=3 --json=/tmp/gpu_decode.json
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from PIL import Image

from lavida_jax import generate, text
from lavida_jax.diffusion.sampler import SamplerConfig, transfer_schedule
from lavida_jax.models.lavida import LaViDa, LaViDaConfig

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}  # datasheet
BF16_PEAK = {"H200": 989e12, "H100": 989e12}  # dense, datasheet


def step_flops(cfg, batch: int, queries: int, keys: int, head_rows: int) -> float:
  """Matmul FLOPs of one LM pass: `queries` rows per example through every layer,
  attending to `keys` keys, and the LM head on `head_rows` rows."""
  lm = cfg.lm
  per_layer = (lm.d_model * lm.head_dim * (lm.n_heads * 2 + lm.n_kv_heads * 2)
               + 3 * lm.d_model * lm.mlp_dim)
  dense = 2 * per_layer * lm.n_layers * batch * queries
  attn = 4 * lm.n_layers * batch * queries * keys * lm.n_heads * lm.head_dim
  head = 2 * lm.d_model * lm.vocab_size * batch * head_rows
  return dense + attn + head


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--gpu", default="H200", choices=sorted(HBM_BYTES_PER_S))
  ap.add_argument("--json", default=None)
  ap.add_argument("--quick", action="store_true", help="L=32, batch 1 only")
  ap.add_argument("--unroll", default="off", choices=("off", "on", "both"),
                  help="Generator(unroll_layers=...): layers unrolled on per-layer weights")
  ap.add_argument("--only", default="", help="comma list of L=...:B=... to run, e.g. 32:1,256:8")
  ap.add_argument("--lookahead", default="0",
                  help="comma list: the prefix cache also with these lookaheads (e.g. 0,1,3)")
  ap.add_argument("--size", default="full", choices=("full", "tiny"),
                  help="tiny: a smoke test of this script on the CPU")
  args = ap.parse_args()

  t0 = time.perf_counter()
  cfg = LaViDaConfig.create("lavida-llada", args.size)
  if args.size == "tiny":  # the real vocabulary and ids, tiny layers
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(
        cfg.lm, vocab_size=126464, mask_id=126336, eos_id=126081))
  model = nnx.jit(lambda: LaViDa(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16,
                                 dtype=jnp.bfloat16))()
  lm_params = nnx.state(model.lm, nnx.Param)
  lm_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lm_params))
  # the input embedding is gathered (a few rows), not read whole, by a step
  read_bytes = lm_bytes - model.lm.embed[...].size * 2
  print(f"{jax.devices()[0].device_kind}: model built in {time.perf_counter() - t0:.1f} s; "
        f"LM weights {lm_bytes / 1e9:.2f} GB ({read_bytes / 1e9:.2f} GB read per step)",
        flush=True)
  # The demo's sentencepiece tokenizer (ids < 512 fit any vocabulary); a noise image.
  tok = text.Tokenizer.from_sentencepiece("lavida_jax/data/assets/demo_tokenizer.model")
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 768, 3), np.uint8))
  req = generate.Request("Describe the image in detail.", image)
  floor_bw = read_bytes / HBM_BYTES_PER_S[args.gpu]

  rows = []
  settings = [(32, 32, 32), (256, 32, 64)]  # (L, block, steps)
  batches = (1, 8)
  if args.quick:
    settings, batches = settings[:1], (1,)
  unrolls = {"off": (False,), "on": (True,), "both": (False, True)}[args.unroll]
  caches = [("none", 0), ("prefix", 0), ("dual", 0)]
  caches += [("prefix", int(j)) for j in args.lookahead.split(",") if int(j)]
  for unroll, (L, lb, steps), batch, (cache, ahead) in itertools.product(
      unrolls, settings, batches, caches):
    if cache == "none" and L == 256 and batch == 8:
      continue  # 8 x ~1,400 tokens x 64 steps: minutes, and no news
    if args.only and f"{L}:{batch}" not in args.only.split(","):
      continue
    scfg = SamplerConfig(gen_length=L, block_length=lb, steps=steps, mask_id=cfg.lm.mask_id,
                         lookahead=ahead)
    gen = generate.Generator(model, tok, scfg, cache=cache, unroll_layers=unroll)
    prompts = [generate.prompt_ids(model, tok, req)] * batch
    ids, images = prompts[0]
    n = len(ids) - 1 + model.layout(*images[0]).num_tokens
    p = generate.bucket(n)
    x, valid = generate.embed_prompts(model, prompts, p)
    canvas0 = np.full((batch, L), cfg.lm.mask_id, np.int32)
    counts = transfer_schedule(canvas0, scfg)
    rng = jax.random.key(0)

    def prefill():
      return jax.block_until_ready(gen._prefill(gen.lm_state, x, valid))

    operands = prefill() if cache != "none" else (x, valid)
    t1 = time.perf_counter()
    out = jax.block_until_ready(gen._sample(canvas0, counts, rng, gen.lm_state, *operands))
    compile_s = time.perf_counter() - t1
    nfe = int(out[1][0])
    times, pre = [], []
    for _ in range(args.runs):
      if cache != "none":
        t1 = time.perf_counter()
        operands = prefill()
        pre.append(time.perf_counter() - t1)
      t1 = time.perf_counter()
      jax.block_until_ready(gen._sample(canvas0, counts, rng, gen.lm_state, *operands))
      times.append(time.perf_counter() - t1)
    total = statistics.median(times)
    per_step = total / nfe
    if cache == "none":
      flops = step_flops(cfg, batch, p + L, p + L, lb)
    elif cache == "prefix":  # S canvases a pass
      flops = step_flops(cfg, batch * (ahead + 1), L, p + L, lb)
    else:  # one refresh (the whole canvas) and steps - 1 window steps per block
      spb = steps // (L // lb)
      flops = (step_flops(cfg, batch, L, p + L, lb)
               + (spb - 1) * step_flops(cfg, batch, lb, p + L, lb)) / spb
    floor = max(floor_bw, flops / BF16_PEAK[args.gpu])
    row = dict(L=L, block=lb, steps=steps, batch=batch, cache=cache, lookahead=ahead,
               unroll=unroll,
               prompt=n, bucket=p,
               nfe=nfe, sample_s=round(total, 4), ms_per_step=round(per_step * 1e3, 3),
               prefill_ms=round(statistics.median(pre) * 1e3, 2) if pre else None,
               floor_ms=round(floor * 1e3, 3), x_floor=round(per_step / floor, 2),
               hbm_floor_ms=round(floor_bw * 1e3, 3),
               tflops=round(flops / per_step / 1e12, 1), compile_s=round(compile_s, 1),
               runs=args.runs)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, lm_bytes=lm_bytes,
                       read_bytes=read_bytes, rows=rows), f, indent=1)
  print(f"\n{'unroll':>6} {'L':>4} {'B':>2} {'cache':>8} {'nfe':>4} {'ms/step':>8} {'floor':>7} "
        f"{'x floor':>7} {'TFLOP/s':>7} {'sample s':>8} {'speedup':>7}")
  for r in rows:
    base = next((b for b in rows if (b["L"], b["batch"], b["cache"], b["unroll"]) ==
                 (r["L"], r["batch"], "none", r["unroll"])), None)
    cache = r["cache"] + (f"+{r['lookahead']}" if r.get("lookahead") else "")
    speed = f"{base['sample_s'] / r['sample_s']:.2f}x" if base else "-"
    print(f"{str(r['unroll']):>6} {r['L']:>4} {r['batch']:>2} {cache:>8} {r['nfe']:>4} "
          f"{r['ms_per_step']:>8.2f} "
          f"{r['floor_ms']:>7.2f} {r['x_floor']:>7.2f} {r['tflops']:>7.1f} "
          f"{r['sample_s']:>8.3f} {speed:>7}")


if __name__ == "__main__":
  main()
