"""Full-size conversion benchmark: peak memory and time of HF -> Orbax -> HF (issue 5).

Writes a random bf16 LaViDa-L checkpoint of the released size (8.43 B
parameters, ~16.9 GB of 5 GB safetensors shards, the real key names from
hf.KEY_TABLES), every tensor generated on the fly, then converts it both ways
with `python -m lavida_jax.convert`, each step in its own process, and reports
the peak resident memory (ru_maxrss of that process, from wait4) and wall time.
Finally it checks that the round trip reproduced the tensors bit for bit.

  python benchmarks/convert_full_size.py [--dir=/tmp] [--family=lavida-llada]
      [--layers=N] [--verify=all|sample] [--keep]

Needs about 3x the checkpoint size on disk (source, Orbax, exported copy); with
less, pass --layers to shrink the LM depth (same layout, smaller model).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GB = 1e9
GiB = 2 ** 30


def _entries(cfg):
  """(name, HF shape, bf16) for every tensor of the model, natural order."""
  from flax import nnx

  from lavida_jax.checkpoint import export, hf
  from lavida_jax.models.lavida import LaViDa

  abstract = nnx.state(nnx.eval_shape(lambda: LaViDa(cfg, rngs=nnx.Rngs(0))))
  flat = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(abstract)}
  out = []
  for path, names, transform, stacked in hf.expand_rows(cfg):
    shape = flat[path][1:] if stacked else flat[path]
    out += [(n, hf.HF_SHAPE[transform](shape), np.dtype(ml_dtypes.bfloat16)) for n in names]
  return sorted(out, key=lambda e: export.natural_key(e[0]))


def write_source(folder: str, family: str, layers: int | None):
  """The random bf16 HF checkpoint, one tensor in memory at a time."""
  from lavida_jax.checkpoint import export, hf
  from lavida_jax.models.lavida import LaViDaConfig

  cfg = LaViDaConfig.create(family)
  if layers:
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, n_layers=layers))
  os.makedirs(folder)
  raw = hf.config_to_hf(cfg)
  raw["torch_dtype"] = "bfloat16"
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(raw, f, indent=2)
  rng = np.random.default_rng(0)
  shapes = {n: s for n, s, _ in _entries(cfg)}

  def produce(name):
    bits = rng.integers(0, 1 << 16, size=shapes[name], dtype=np.uint16)
    # Finite values of magnitude ~1e-2..1: sign, 7 mantissa bits, a few exponents.
    bits &= 0x80FF
    bits |= 0x3C00
    return bits.view(ml_dtypes.bfloat16)

  index = export.write_safetensors(folder, _entries(cfg), produce)
  print(json.dumps({"tensors": len(index["weight_map"]),
                    "bytes": index["metadata"]["total_size"]}))


def run_measured(cmd: list[str]) -> dict:
  start = time.time()
  pid = os.spawnv(os.P_NOWAIT, cmd[0], cmd)
  _, status, usage = os.wait4(pid, 0)
  wall = time.time() - start
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
  return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GiB, 2),
          "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1)}


def verify(a_dir: str, b_dir: str, sample: bool) -> int:
  """Bitwise comparison of the two HF folders (all tensors, or first/last layers)."""
  from lavida_jax.checkpoint.shards import Checkpoint
  from lavida_jax.convert import _read

  checked = 0
  with Checkpoint(a_dir) as a, Checkpoint(b_dir) as b:
    if a.keys() != b.keys():
      raise SystemExit(f"key sets differ: {sorted(set(a.keys()) ^ set(b.keys()))[:5]}")
    for k in a.keys():
      if sample and any(f".{i}." in k for i in range(1, 25)):
        continue
      x, y = _read(a, k), _read(b, k)
      if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
        raise SystemExit(f"tensor {k} differs after the round trip")
      checked += 1
  return checked


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dir", default=None, help="working folder (default: a temp dir in /tmp)")
  p.add_argument("--family", default="lavida-llada")
  p.add_argument("--layers", type=int, default=None, help="LM depth (default: released)")
  p.add_argument("--verify", choices=("all", "sample"), default="sample")
  p.add_argument("--keep", action="store_true", help="keep the checkpoints")
  p.add_argument("--write-source", dest="write_source", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.write_source:
    return write_source(args.write_source, args.family, args.layers)

  from lavida_jax.models.lavida import LaViDaConfig, param_count

  cfg = LaViDaConfig.create(args.family)
  if args.layers:
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, n_layers=args.layers))
  nbytes = 2 * param_count(cfg)
  root = tempfile.mkdtemp(prefix="lavida-convert-bench-", dir=args.dir or "/tmp")
  free = shutil.disk_usage(root).free
  print(f"model {args.family}, {nbytes / 2 / 1e9:.2f} B parameters, {nbytes / GB:.2f} GB bf16; "
        f"{free / GB:.1f} GB free in {root}")
  if free < 3.1 * nbytes:
    shutil.rmtree(root)
    raise SystemExit(f"need ~{3.1 * nbytes / GB:.0f} GB free; pass --layers to shrink the model")
  src, orb, dst = (os.path.join(root, n) for n in ("hf", "orbax", "hf-export"))
  py = sys.executable
  layer_args = [f"--layers={args.layers}"] if args.layers else []
  results = {"machine": f"{os.cpu_count()} CPUs, "
                        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.1f} "
                        "GiB RAM"}
  try:
    results["write_source"] = run_measured(
        [py, os.path.abspath(__file__), f"--write-source={src}", f"--family={args.family}",
         *layer_args])
    print("write source:", results["write_source"])
    results["hf_to_orbax"] = run_measured(
        [py, "-m", "lavida_jax.convert", "hf-to-orbax", f"--src={src}", f"--dst={orb}"])
    print("hf-to-orbax:", results["hf_to_orbax"])
    results["orbax_to_hf"] = run_measured(
        [py, "-m", "lavida_jax.convert", "orbax-to-hf", f"--src={orb}", f"--dst={dst}"])
    print("orbax-to-hf:", results["orbax_to_hf"])
    sizes = {n: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)
             for n, p in (("hf", src), ("orbax", orb), ("hf_export", dst))}
    results["bytes_on_disk"] = sizes
    start = time.time()
    results["verified_tensors"] = verify(src, dst, args.verify == "sample")
    results["verify_s"] = round(time.time() - start, 1)
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
