"""Generation latency, ours vs LaViDa's PyTorch sampler on the same shapes (issue 12).

A LaViDa-L-shaped model scaled to the machine: LLaDA structure (MHA, SwiGLU,
untied head, 128-wide heads) with --d_model/--layers, a SigLIP tower of
--vision_width/--vision_depth, the real anyres pipeline on one rendered image
(default 384x624: 3 views, a ~600-token prompt with LaViDa's system prompt)
and a canvas of L = 32, greedy, low-confidence remasking, one block. Random
weights: only speed is measured, and that both sides commit the same tokens.

Both sides, with the prefix KV cache (and with --no_cache also without it):
  - ours: `generate.Generator` (the jitted prefill + the one-jit sampler);
  - LaViDa's loop restated in PyTorch (`torch_sampler.py`), the same weights,
    the same transfer counts, in a subprocess so the two runtimes' thread pools
    never compete; --rounds alternates the two sides.
Ours also with each --lookahead (the fixed decoder's exact speculation: the same
tokens in fewer passes; "ms/pass" and the JSON's per_step_ms are then per pass).
Timed per side: vision (+ projector + anyres layout), prefill, the denoising
steps, and their sum ("total"); host image preprocessing (decode, anyres crops)
and tokenising are outside every figure. Medians over --runs calls per round
after one warm-up (compilation) call.

  python benchmarks/generate.py --d_model=512 --layers=8 --vision_width=128 --vision_depth=4
  python benchmarks/generate.py --d_model=1024 --layers=16 --vision_width=256 --vision_depth=6
  python benchmarks/generate.py --sweep   # ours only: NFE 100/50/25% x cache on/off
  python benchmarks/generate.py --cache_steps   # ours only: ms/step per cache, L = 64..256
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from lavida_jax import generate
from lavida_jax.data import demo, shapes
from lavida_jax.diffusion import sampler as sampler_lib
from lavida_jax.diffusion.sampler import SamplerConfig
from lavida_jax.models.lavida import LaViDa, LaViDaConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def build(d_model: int, layers: int, vision_width: int, dtype: str, vision_depth: int = 2):
  tok = demo.demo_tokenizer()
  sp = demo.demo_special_tokens("llada", tok)
  cfg = LaViDaConfig.create("lavida-llada", "tiny")
  heads = max(1, d_model // 128)
  lm = dataclasses.replace(cfg.lm, vocab_size=len(tok), d_model=d_model, n_layers=layers,
                           n_heads=heads, n_kv_heads=heads, head_dim=d_model // heads,
                           mlp_dim=3 * d_model, mask_id=sp.mask_id, eos_id=sp.eos_id)
  vision = dataclasses.replace(cfg.vision, width=vision_width, depth=vision_depth,
                               num_heads=max(1, vision_width // 64), mlp_dim=4 * vision_width)
  conn = dataclasses.replace(cfg.connector, vision_dim=vision_width, lm_dim=d_model)
  cfg = dataclasses.replace(cfg, lm=lm, vision=vision, connector=conn)
  model = LaViDa(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)
  return model, tok


def torch_inputs(model: LaViDa, prompt, canvas0, counts) -> dict:
  """Everything the PyTorch side needs, as arrays (weights in LaViDa's names)."""
  from torch_sampler import export_weights  # pylint: disable=import-outside-toplevel
  ids, images = prompt
  pixels, size = images[0]
  layout = model.layout(pixels, size)
  c = model.cfg
  cfg = dict(pool_size=c.connector.pool_size,
             vision=dict(width=c.vision.width, mlp_dim=c.vision.mlp_dim, depth=c.vision.depth,
                         num_heads=c.vision.num_heads, image_size=c.vision.image_size,
                         patch_size=c.vision.patch_size, eps=c.vision.eps),
             lm=dict(d_model=c.lm.d_model, n_layers=c.lm.n_layers, n_heads=c.lm.n_heads,
                     norm_eps=c.lm.norm_eps, rope_theta=c.lm.rope_theta))
  out = {f"w/{k}": v for k, v in export_weights(model).items()}
  out.update(config=json.dumps(cfg), ids=np.asarray(ids), pixels=np.asarray(pixels, np.float32),
             layout_base=layout.base, layout_canvas=layout.canvas,
             out_hw=np.asarray(layout.out_hw), canvas0=np.asarray(canvas0[0]),
             counts=np.asarray(counts[0]).reshape(-1), mask_id=c.lm.mask_id)
  return out


def run_torch(inputs_path: str, runs: int, threads: int | None, cache: bool) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    cmd = [sys.executable, os.path.join(HERE, "torch_sampler.py"), f"--inputs={inputs_path}",
           f"--runs={runs}", f"--out={f.name}"] + (["--no_cache"] if not cache else [])
    if threads:
      cmd.append(f"--threads={threads}")
    subprocess.run(cmd, check=True)
    with open(f.name) as g:
      return json.load(g)


def time_ours(model, tok, req, cfg, cache, runs: int, unroll=None) -> dict:
  """Ours, split as the PyTorch side is: vision, prefill, steps; the Generator's own
  compiled programs (vision + splice + prefill is one of them: its vision part is
  timed apart with the same weights, the rest counts as prefill)."""
  gen = generate.Generator(model, tok, cfg, cache, unroll_layers=unroll)
  vision = jax.jit(lambda state, px: nnx.merge(gen.graphdef, state).project(
      nnx.merge(gen.graphdef, state).vision(px)))

  def parts():
    t0 = time.perf_counter()
    prompts = [generate.prompt_ids(model, tok, req)]  # host: image decode, crops, tokens
    length = generate.bucket(generate.prompt_length(model, *prompts[0]))
    packed = generate.pack_prompts(model, prompts, length)
    canvas0 = gen.canvas([req])
    counts = sampler_lib.transfer_schedule(canvas0, gen.cfg)
    t1 = time.perf_counter()
    jax.block_until_ready(vision(gen.state, packed["pixels"][0]))
    t2 = time.perf_counter()
    ops = jax.block_until_ready(gen._prepare(gen.state, **packed))
    t3 = time.perf_counter()
    out, steps = jax.block_until_ready(
        gen._sample(canvas0, counts, jax.random.key(0), gen.lm_state, *ops))
    t4 = time.perf_counter()
    return dict(host_s=t1 - t0, vision_s=t2 - t1, prepare_s=t3 - t2, steps_s=t4 - t3,
                n=len(prompts[0][0]), length=length), (np.asarray(out)[0], int(steps[0]))

  parts()  # compile
  rows = [parts() for _ in range(runs)]
  med = {k: statistics.median(r[0][k] for r in rows) for k in ("host_s", "vision_s",
                                                              "prepare_s", "steps_s")}
  tokens, steps = rows[-1][1]
  prefill = med["prepare_s"] - med["vision_s"]  # splice + prefill (+ vision in one program)
  prompt = generate.prompt_ids(model, tok, req)
  return dict(vision_s=med["vision_s"], prefill_s=prefill, steps_s=med["steps_s"],
              total_s=med["prepare_s"] + med["steps_s"],
              per_step_ms=1e3 * med["steps_s"] / steps, steps=steps,
              prefix=generate.prompt_length(model, *prompt), bucket=rows[-1][0]["length"],
              tokens=[int(t) for t in tokens], host_s=med["host_s"])


def cache_steps(args, model, tok):
  """Ours only: the cost of a denoising step per cache at L = 64, 128, 256 (blocks of
  32, L/4 steps: 8 per block), batch --batch."""
  size = tuple(int(v) for v in args.image_size.split("x"))
  image = shapes.render(shapes.sample_scene(np.random.default_rng(0), size), size)
  reqs = [generate.Request(args.prompt, image)] * args.batch
  rows = []
  for L in (64, 128, 256):
    cfg = SamplerConfig(gen_length=L, block_length=32, steps=L // 4,
                        mask_id=model.cfg.lm.mask_id)
    for cache in ("none", "prefix", "dual"):
      gen = generate.Generator(model, tok, cfg, cache)
      prompts = [generate.prompt_ids(model, tok, r) for r in reqs]
      length = generate.bucket(max(generate.prompt_length(model, *p) for p in prompts))
      ops = gen._prepare(gen.state, **generate.pack_prompts(model, prompts, length))
      canvas0 = gen.canvas(reqs)
      counts = sampler_lib.transfer_schedule(canvas0, cfg)
      run = lambda: jax.block_until_ready(gen._sample(canvas0, counts, jax.random.key(0),
                                                      gen.lm_state, *ops))
      steps = int(run()[1][0])  # compile
      times = []
      for _ in range(args.runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
      med = statistics.median(times)
      rows.append(dict(L=L, cache=cache, steps=steps, sample_s=med,
                       ms_per_step=1e3 * med / steps, prefix=length))
      print(json.dumps(rows[-1]), flush=True)
  print(f"{'L':>4} {'cache':>6} {'steps':>5} {'ms/step':>8} {'sampler s':>9} {'vs none':>7}")
  for r in rows:
    base = next(b for b in rows if b["L"] == r["L"] and b["cache"] == "none")
    print(f"{r['L']:>4} {r['cache']:>6} {r['steps']:>5} {r['ms_per_step']:>8.1f} "
          f"{r['sample_s']:>9.3f} {base['sample_s'] / r['sample_s']:>6.2f}x")
  return rows


def compare(args, model, tok):
  size = tuple(int(v) for v in args.image_size.split("x"))
  image = shapes.render(shapes.sample_scene(np.random.default_rng(0), size), size)
  req = generate.Request(args.prompt, image)
  L = args.gen_length
  cfg = SamplerConfig(gen_length=L, block_length=L, steps=args.steps,
                      mask_id=model.cfg.lm.mask_id)
  lookaheads = [int(j) for j in args.lookahead.split(",")]
  prompt = generate.prompt_ids(model, tok, req)
  gen = generate.Generator(model, tok, cfg, True)
  canvas0 = gen.canvas([req])
  counts = sampler_lib.transfer_schedule(canvas0, cfg)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "inputs.npz")
    np.savez(path, **torch_inputs(model, prompt, canvas0, counts))
    for cache in (True, False) if args.no_cache else (True,):
      ours, theirs = {j: [] for j in lookaheads}, []
      for _ in range(args.rounds):
        theirs.append(run_torch(path, args.runs, args.torch_threads, cache))
        for j in lookaheads if cache else (0,):
          ours[j].append(time_ours(model, tok, req, dataclasses.replace(cfg, lookahead=j),
                                   cache, args.runs, False if args.scanned else None))
      keys = ("vision_s", "prefill_s", "steps_s", "total_s", "per_step_ms")
      sides = [("lavida-jax" + (f" lookahead {j}" if j else ""), rs)
               for j, rs in ours.items() if rs] + [("LaViDa PyTorch", theirs)]
      for side, rs in sides:
        row = {k: statistics.median(r[k] for r in rs) for k in keys}
        row.update(side=side, cache=cache, tokens=rs[-1]["tokens"], prefix=rs[-1]["prefix"],
                   steps=rs[-1]["steps"], bucket=rs[-1].get("bucket"))
        rows.append(row)
  print(f"backend={jax.default_backend()} d_model={args.d_model} layers={args.layers} "
        f"vision {args.vision_width}x{args.vision_depth} image {args.image_size} "
        f"prefix={rows[0]['prefix']} (bucket {rows[0]['bucket']}) L={L} steps={args.steps} "
        f"runs={args.runs}x{args.rounds} torch threads={theirs[-1]['threads']}"
        + (" scanned layers" if args.scanned else " layers unrolled on the CPU"))
  print(f"{'side':>26} {'cache':>6} {'total s':>8} {'vision s':>9} {'prefill s':>10} "
        f"{'steps s':>8} {'passes':>6} {'ms/pass':>8}")
  for r in rows:
    print(f"{r['side']:>26} {str(r['cache']):>6} {r['total_s']:>8.3f} {r['vision_s']:>9.3f} "
          f"{r['prefill_s']:>10.3f} {r['steps_s']:>8.3f} {r['steps']:>6} "
          f"{r['per_step_ms']:>8.1f}")
  for cache in sorted({r["cache"] for r in rows}, reverse=True):
    *mine, b = [r for r in rows if r["cache"] == cache]
    for a in mine:
      same = a["tokens"] == b["tokens"]
      print(f"cache={cache} {a['side']}: PyTorch / ours total = "
            f"{b['total_s'] / a['total_s']:.2f}x; tokens identical: {same}"
            + ("" if same else f"\n  ours  {a['tokens']}\n  torch {b['tokens']}"))
  return rows


def sweep(args, model, tok):
  """Ours only: NFE 100/50/25% of L, prefix cache on/off (the issue-4 table)."""
  scene = shapes.sample_scene(np.random.default_rng(0), (640, 480))
  reqs = [generate.Request("Describe the image in detail.", shapes.render(scene, (640, 480)))]
  reqs = reqs * args.batch
  rows, L = [], args.gen_length
  for frac in (1.0, 0.5, 0.25):
    steps = max(1, int(L * frac))
    cfg = SamplerConfig(gen_length=L, block_length=L, steps=steps, mask_id=model.cfg.lm.mask_id)
    for cache in (True, False):
      gen = generate.Generator(model, tok, cfg, cache)
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
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--d_model", type=int, default=512)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--vision_width", type=int, default=128)
  ap.add_argument("--vision_depth", type=int, default=4)
  ap.add_argument("--image_size", default="384x624", help="WxH of the rendered image")
  ap.add_argument("--prompt", default="Describe the image in detail, one shape at a time.")
  ap.add_argument("--gen_length", type=int, default=32)
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--runs", type=int, default=5, help="timed calls per side and round")
  ap.add_argument("--rounds", type=int, default=1, help="alternations of the two sides")
  ap.add_argument("--no_cache", action="store_true", help="also compare without the cache")
  ap.add_argument("--torch_threads", type=int, default=None, help="default: torch's own")
  ap.add_argument("--sweep", action="store_true", help="ours only: NFE x cache table")
  ap.add_argument("--batch", type=int, default=1, help="--sweep and --cache_steps only")
  ap.add_argument("--scanned", action="store_true",
                  help="ours with the layers scanned (Generator(unroll_layers=False))")
  ap.add_argument("--cache_steps", action="store_true",
                  help="ours only: ms per step of each cache at L = 64, 128, 256")
  ap.add_argument("--bucket", type=int, default=None,
                  help="pad every prompt to this length (e.g. 1024: the old bucket of 601)")
  ap.add_argument("--lookahead", default="0,1",
                  help="ours with each of these fixed-decoder lookaheads (prefix cache)")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--json", default=None, help="also write the results here")
  args = ap.parse_args()
  sys.path.insert(0, HERE)

  model, tok = build(args.d_model, args.layers, args.vision_width, args.dtype,
                     args.vision_depth)
  if args.bucket:
    generate.bucket = lambda n, _b=args.bucket: max(_b, n)
  if args.cache_steps:
    rows = cache_steps(args, model, tok)
  else:
    rows = sweep(args, model, tok) if args.sweep else compare(args, model, tok)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
