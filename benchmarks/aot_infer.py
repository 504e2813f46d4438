"""Ahead-of-time proof that full-size LaViDa-L inference fits Colab-sized TPUs (issue 15).

For each runtime, libtpu's topology description gives the chips without any TPU
(SPEC §9, as `aot_tpu.py` does for training); the Generator's two programs, the
prompt program (vision tower + splice + prefill, one anyres image, a ~1,100-token
prompt in the 1,152 bucket) and the sampler (prefix cache, layers scanned as TPUs
run them), are lowered with abstract sharded arguments (nothing is allocated) and
compiled by the TPU compiler; `memory_analysis()` gives their bytes per chip.

  peak per chip = the whole model's parameters (they stay resident)
                + max(prompt program's temps + outputs,
                      prefix cache + sampler's temps + outputs)

checked against the chip's HBM. One process per compile (one libtpu at a time):

  pip install --no-deps --target=/tmp/libtpu_site libtpu==0.0.42.1
  python benchmarks/aot_infer.py --libtpu=/tmp/libtpu_site [--plan="v5e-1:int8:32x1,256x8"]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GiB = 2 ** 30

# Colab's TPU runtimes: topology, HBM per device (v2/v3: per core; each core a device).
RUNTIMES = {
    "v5e-1": dict(accelerator="v5litepod-1", topology="v5e:1x1", chip_config="default",
                  bounds=(1, 1, 1), hbm_gib=16, mesh=(1, 1, 1)),
    "v6e-1": dict(accelerator="v6e-1", topology="v6e:1x1", chip_config="default",
                  bounds=(1, 1, 1), hbm_gib=32, mesh=(1, 1, 1)),
    "v2-8": dict(accelerator="v2-8", topology="v2:2x2", chip_config="default",
                 bounds=(2, 2, 1), hbm_gib=8, mesh=(1, 8, 1)),
    "v3-8": dict(accelerator="v3-8", topology="v3:2x2", chip_config="default",
                 bounds=(2, 2, 1), hbm_gib=16, mesh=(1, 8, 1)),
}
PROMPT = 1152  # the bucket of a ~1,100-token prompt (an anyres image is ~980 of them)


def per_device_bytes(tree) -> int:
  import jax
  return sum(int(x.dtype.itemsize) * int(_prod(x.sharding.shard_shape(x.shape)))
             for x in jax.tree.leaves(tree))


def _prod(shape):
  n = 1
  for s in shape:
    n *= s
  return n


def _total(m) -> int:
  return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)


def worker(runtime: str, length: int, batch: int, quantize: str | None,
           lookahead: int = 0) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.experimental import topologies
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lavida_jax import generate, sharding
  from lavida_jax.diffusion import sampler as sampler_lib
  from lavida_jax.models import quant
  from lavida_jax.models.lavida import LaViDa, LaViDaConfig

  info = RUNTIMES[runtime]
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=info["topology"], chip_config_name=info["chip_config"],
      chips_per_host_bounds=info["bounds"], num_slices=1)
  mesh = sharding.make_mesh(info["mesh"], devices=topo.devices)
  cfg = LaViDaConfig.create("lavida-llada")

  def make():
    model = LaViDa(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    return quant.quantize_lm(model) if quantize else model

  abstract = nnx.eval_shape(make)
  graphdef, state = nnx.split(abstract)
  shardings = sharding.state_shardings(state, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       state, shardings)
  model = nnx.merge(graphdef, state)
  scfg = sampler_lib.SamplerConfig(gen_length=length, block_length=length, steps=length,
                                   mask_id=cfg.lm.mask_id, lookahead=lookahead)
  gen = generate.Generator(model, None, scfg, "prefix", unroll_layers=False)
  views, size = cfg.image.max_views, cfg.image.size
  batch_sh = NamedSharding(mesh, P())
  arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
  packed = dict(ids=arr((batch, PROMPT), jnp.int32),
                pixels=arr((batch, views, size, size, 3), jnp.float32),
                image_index=arr((batch, PROMPT, 4), jnp.int32),
                image_weight=arr((batch, PROMPT, 4), jnp.float32),
                valid=arr((batch, PROMPT), jnp.bool_))
  out = dict(runtime=runtime, quantize=quantize or "bf16", L=length, B=batch,
             lookahead=lookahead,
             devices=len(topo.devices), device_kind=topo.devices[0].device_kind,
             hbm=info["hbm_gib"] * GiB, params=per_device_bytes(gen.state),
             lm_params=per_device_bytes(gen.lm_state))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    prep = gen._prepare.lower(gen.state, **packed).compile()
    cache, first = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        prep.out_info, prep.output_shardings) if hasattr(prep, "out_info") else (None, None)
    if cache is None:
      shapes = jax.eval_shape(gen._prepare, gen.state, **packed)
      cache, first = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
          shapes, prep.output_shardings)
    canvas = arr((batch, length), jnp.int32)
    counts = arr((batch, scfg.num_blocks, scfg.steps_per_block), jnp.int32)
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=batch_sh)
    samp = gen._sample.lower(canvas, counts, rng, gen.lm_state, cache, first).compile()
  mp, ms = prep.memory_analysis(), samp.memory_analysis()
  cache_bytes = per_device_bytes(cache)
  prompt_peak = out["params"] + mp.temp_size_in_bytes + mp.output_size_in_bytes
  sample_peak = (out["params"] + cache_bytes + ms.temp_size_in_bytes
                 + ms.output_size_in_bytes)
  out.update(compile_s=round(time.perf_counter() - t0, 1), cache=cache_bytes,
             prompt_temp=mp.temp_size_in_bytes, sample_temp=ms.temp_size_in_bytes,
             prompt_total=_total(mp), sample_total=_total(ms),
             peak=max(prompt_peak, sample_peak))
  out["fits"] = out["peak"] <= out["hbm"]
  del np
  return out


def run_worker(runtime, length, batch, quantize, libtpu, timeout, lookahead=0) -> dict:
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)
  env["TPU_ACCELERATOR_TYPE"] = RUNTIMES[runtime]["accelerator"]
  env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", ""))
  if libtpu:
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [libtpu, ROOT, env.get("PYTHONPATH")]))
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--runtimes={runtime}",
         f"--L={length}", f"--B={batch}", f"--lookahead={lookahead}"] + (
             [f"--quantize={quantize}"] if quantize else [])
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(runtime=runtime, L=length, B=batch, error=f"timed out after {timeout} s")
  lines = [l for l in proc.stdout.splitlines() if l.startswith("AOT_RESULT ")]
  if proc.returncode or not lines:
    row = dict(runtime=runtime, quantize=quantize or "bf16", L=length, B=batch,
               hbm=RUNTIMES[runtime]["hbm_gib"] * GiB)
    oom = [l for l in proc.stderr.splitlines() if "RESOURCE_EXHAUSTED" in l]
    if oom:  # the TPU compiler refuses a program that cannot fit: the answer is "no"
      return dict(row, fits=False, error=oom[-1].split("RESOURCE_EXHAUSTED:")[-1].strip())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return dict(row, error=f"exit {proc.returncode}: " + " | ".join(tail))
  return json.loads(lines[-1][len("AOT_RESULT "):])


def table(rows) -> str:
  g = lambda b: f"{b / GiB:.2f}"
  lines = ["| runtime | weights | L | batch | params GiB/device | prefix cache | prompt temps "
           "| sampler temps | peak GiB/device | HBM GiB | fits |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      verdict = "no" if r.get("fits") is False else "error"
      lines.append(f"| {r['runtime']} | {r.get('quantize', '')} | {r['L']} | {r['B']} | "
                   f"{r['error'][:160]} ||||| {r['hbm'] // GiB} | {verdict} |")
      continue
    lines.append(f"| {r['runtime']} ({r['devices']}x {r['device_kind']}) | {r['quantize']} | "
                 f"{r['L']} | {r['B']} | {g(r['params'])} | {g(r['cache'])} | "
                 f"{g(r['prompt_temp'])} | {g(r['sample_temp'])} | {g(r['peak'])} | "
                 f"{r['hbm'] // GiB} | {'yes' if r['fits'] else 'no'} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--plan", default="v5e-1:int8:32x1,32x8,256x1,256x8;v5e-1:bf16:32x1;"
                  "v6e-1:bf16:32x1,32x8,256x1,256x8;v2-8:bf16:32x1,256x8;"
                  "v3-8:bf16:32x1,256x8",
                  help="runtime:weights:LxB,... groups separated by ';'")
  ap.add_argument("--runtimes", default=None, help="(worker) the runtime")
  ap.add_argument("--libtpu", default=None)
  ap.add_argument("--timeout", type=int, default=1800)
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                "aot_infer.json"))
  ap.add_argument("--worker", action="store_true")
  ap.add_argument("--L", type=int)
  ap.add_argument("--B", type=int)
  ap.add_argument("--quantize", default=None)
  ap.add_argument("--lookahead", type=int, default=0,
                  help="the sampler with the fixed decoder's lookahead (1 + this canvases)")
  args = ap.parse_args()
  if args.worker:
    print("AOT_RESULT " + json.dumps(worker(args.runtimes, args.L, args.B, args.quantize,
                                            args.lookahead)))
    return
  rows = []
  for group in args.plan.split(";"):
    runtime, weights, cases = group.split(":")
    for case in cases.split(","):
      length, batch = (int(v) for v in case.split("x"))
      row = run_worker(runtime, length, batch, None if weights == "bf16" else weights,
                       args.libtpu, args.timeout, args.lookahead)
      print(json.dumps(row), flush=True)
      rows.append(row)
  with open(args.out, "w") as f:
    json.dump(rows, f, indent=1)
  print(table(rows))


if __name__ == "__main__":
  main()
