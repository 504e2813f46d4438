"""Ahead-of-time compilation of the full-size train step for TPU slices, on a CPU machine.

For each TPU config, libtpu's topology description gives the slice's devices
without any TPU (SPEC §9); the step is lowered with abstract, sharded arguments
(`ShapeDtypeStruct` + `NamedSharding`: no parameter is ever allocated) and
compiled by the TPU compiler. Two compiles per config, each in its own process
(only one process may load libtpu at a time, and an 8B compile is memory-hungry):

  memory  the real step (layers scanned, its micro-batch loop, XLA's default flags)
          -> `memory_analysis()`: bytes per chip = arguments + temps + outputs
          - aliased (the donated state), checked against the chip's HBM.
  flops   the same step made loop-free, because `cost_analysis()` counts a
          while-loop body once (SPEC §9 traps): every `lax.scan`/`fori_loop` is
          unrolled at trace time (the layer scans, the vocabulary-chunk loop of the
          loss; this is a monkeypatch of `jax.lax.scan`/`fori_loop` in that
          process, the library has no unroll switch), one micro-batch
          (grad_accum=1, its batch), windowed-einsum loops off
          (`xla_tpu_enable_windowed_einsum_for_{all_gather,reduce_scatter}=false`);
          `optimal_seconds` is then corrected for libtpu's -1 s per `ConcatBitcast`
          custom call on v4/v5e and per `PrepareAsyncCall{Start,Done}` on v5p
          (their count is read from the optimized HLO) and multiplied by
          grad_accum (the optimizer update, counted once per micro-batch this way,
          is < 0.1% of the step).
          A fully unrolled 32-layer compile is slow on a small machine, so by default
          the flops compile runs at depth 1 and depth 2 (LM and vision layers) and
          every quantity is extrapolated linearly per layer (`extrapolate`);
          --full_unroll does the single exact compile.

Estimated MFU = model FLOPs (`lavida_jax.flops`, all micro-batches) / estimated
step time / (chips x peak bf16). The table is printed and, with --readme, written
into benchmarks/README.md between the AOT markers.

Needs libtpu: `pip install "jax[tpu]==0.10.2"` (libtpu 0.0.42.1), or, to keep it
away from other JAX processes on a shared machine,
`pip install --no-deps --target=/tmp/libtpu_site libtpu==0.0.42.1` and
`--libtpu=/tmp/libtpu_site`.

  python benchmarks/aot_tpu.py [--configs=tpu_v4_64,tpu_v5p_128,tpu_v5e_256]
      [--arg=model=lavida-llada,stage=2] [--set=train.grad_accum=2 ...]
      [--only=memory|flops] [--libtpu=/tmp/libtpu_site] [--timeout=3000] [--readme]
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GiB = 2 ** 30

# Slice -> libtpu topology description (SPEC §9) and chip facts.
SLICES = {
    "tpu_v4_64": dict(accelerator="v4-64", topology="v4:2x4x4", chip_config="megacore",
                      chips=32, hbm_gib=32, peak="v4", negative_calls=("ConcatBitcast",)),
    "tpu_v5p_128": dict(accelerator="v5p-128", topology="v5p:4x4x4", chip_config="megacore",
                        chips=64, hbm_gib=95, peak="v5p",
                        negative_calls=("PrepareAsyncCallStart", "PrepareAsyncCallDone")),
    "tpu_v5e_256": dict(accelerator="v5litepod-256", topology="v5e:16x16",
                        chip_config="default", chips=256, hbm_gib=16, peak="v5e",
                        negative_calls=("ConcatBitcast",)),
    # LoRA fine-tuning on the small slices (issue 15): the full-size config with
    # --set=lora.rank=16 etc. (`config` names the file; --lora below sets the rest).
    "tpu_v5e_8": dict(accelerator="v5litepod-8", topology="v5e:2x4", chip_config="default",
                      chips=8, hbm_gib=16, peak="v5e", negative_calls=("ConcatBitcast",),
                      config="tpu_v5e_256"),
    "tpu_v4_8": dict(accelerator="v4-8", topology="v4:2x2x1", chip_config="megacore",
                     chips=4, hbm_gib=32, peak="v4", negative_calls=("ConcatBitcast",),
                     config="tpu_v4_64"),
    "tpu_v5p_8": dict(accelerator="v5p-8", topology="v5p:2x2x1", chip_config="megacore",
                      chips=4, hbm_gib=95, peak="v5p",
                      negative_calls=("PrepareAsyncCallStart", "PrepareAsyncCallDone"),
                      config="tpu_v5p_128"),
}
# --lora: LaViDa-L LoRA fine-tuning at sequence 4096 (adapters fp32 on a bf16 base, the
# mesh all FSDP over the slice, one micro-batch per step).
LORA_SETS = ("lora.rank=16", "train.param_dtype=bfloat16", "data.length=4096",
             "mesh=1,-1,1", "train.grad_accum=1")
FLOPS_FLAGS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
               "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


# --- building the abstract step (no TPU needed; also used by tests on CPU devices) ----

def load_config(name_or_path: str, arg: str | None = None, overrides=()):
  """configs/NAME.py (or a path) with its :arg, then `key=value` overrides."""
  path = name_or_path if name_or_path.endswith(".py") else os.path.join(
      ROOT, "configs", f"{name_or_path}.py")
  spec = importlib.util.spec_from_file_location(f"_cfg_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(arg)
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not key=value")
    *path, leaf = key.split(".")
    parent = functools.reduce(getattr, path, cfg)
    with parent.unlocked() if hasattr(parent, "unlocked") else _nothing():
      parent[leaf] = _parse(value, parent.get(leaf))
  return cfg


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _parse(value: str, old):
  """A command-line value, typed like the field it replaces (or guessed for new fields)."""
  if isinstance(old, bool):
    return value.lower() in ("1", "true", "yes")
  if isinstance(old, tuple):
    return tuple(int(v) for v in value.strip("()").split(",") if v)
  if isinstance(old, (int, float)):
    return type(old)(value)
  if old is None:
    for kind in (int, float):
      try:
        return kind(value)
      except ValueError:
        pass
  return value


class _FimTokenizer:
  """The one thing `train.step_config` asks a tokenizer: the [FIM] id (SPEC §3.3)."""

  def __init__(self, family: str):
    self.fim = None if family == "lavida-dream" else 126085

  def token_to_id(self, token):
    return self.fim if token == "[FIM]" else None


def abstract_step(cfg, mesh, *, micro_batches: int | None = None):
  """-> (jitted step, abstract state, abstract batch, mcfg, trained groups).

  The state and batch are `ShapeDtypeStruct`s with `NamedSharding`s on `mesh`;
  the jitted step is `train.make_step`'s (in/out shardings, donation).
  micro_batches: overrides cfg.train.grad_accum (1 for the loop-free flops compile).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lavida_jax import optimizer, sharding, text, train
  from lavida_jax.data import pipeline
  from lavida_jax.models import lora as lora_lib
  from lavida_jax.models.lavida import LaViDa

  if micro_batches is not None:
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.train.grad_accum = micro_batches
  family = cfg.model.family
  if cfg.model.size == "tiny":  # LMConfig.tiny_*: a 256-id vocabulary, eos 254, mask 255
    specials, vocab = text.SpecialTokens(255, 254, 254, None, "<|eot_id|>"), 256
  else:  # the released vocabularies; only the ids matter here
    specials = (text.SpecialTokens.dream() if family == "lavida-dream"
                else text.SpecialTokens.llada())
    vocab = 0
  mcfg = train.model_config(cfg, specials, vocab)
  sc = train.step_config(cfg, mcfg, _FimTokenizer(family))
  groups, lrs = train.trained_groups(cfg)
  lcfg = train.lora_config(cfg)
  tx, schedules = optimizer.make_optimizer(
      lrs, cfg.train.steps,
      warmup_ratio=cfg.train.warmup_ratio, final_ratio=cfg.train.final_ratio,
      weight_decay=cfg.train.weight_decay, clip_norm=cfg.train.clip_norm)

  def make_model():
    model = LaViDa(mcfg, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(cfg.train.param_dtype),
                   dtype=jnp.dtype(cfg.train.compute_dtype))
    if lcfg is not None:  # adapters (fp32) on the base, as train.init_model adds them
      lora_lib.add_adapters(model, lcfg)
    return model

  model = nnx.eval_shape(make_model)
  graphdef, abstract = nnx.split(model)
  shard_model = nnx.merge(graphdef, sharding.state_shardings(abstract, mesh))
  only = lcfg is not None
  graphdef, params, frozen = train.train_step.split_params(model, groups, only)
  _, params_sh, frozen_sh = train.train_step.split_params(shard_model, groups, only)
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  params = jax.tree.map(sds, params, params_sh)
  frozen = jax.tree.map(sds, frozen, frozen_sh)
  # Optimizer state as train.init_state makes it: Adam's mu/nu sharded like their
  # parameters, the step counts replicated.
  rep = NamedSharding(mesh, P())
  opt_state = jax.tree.map(sds, jax.eval_shape(tx.init, params),
                           train.opt_shardings(tx, params, rep))
  state = dict(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=params,
               frozen=frozen, opt_state=opt_state,
               rng=jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                        sharding=rep))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_spec = P(dict(sharding.DEFAULT_RULES)["batch"])
  batch_sh = NamedSharding(mesh, batch_spec)
  step_batch = cfg.train.batch_size * cfg.train.grad_accum
  shapes = pipeline.batch_shapes(mcfg, cfg.data.length, step_batch)
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh) for k, (s, d) in shapes.items()}
  run = train.make_step(graphdef, tx, sc, schedules, shardings, batch_sh)
  return run, state, batch, mcfg, groups


def model_flops(cfg, mcfg, groups) -> dict:
  from lavida_jax import flops
  step_batch = cfg.train.batch_size * cfg.train.grad_accum
  f = flops.train_step_flops(
      mcfg, batch_size=step_batch, length=cfg.data.length, views=mcfg.image.max_views,
      label_tokens=(cfg.train.capacity or 2 * cfg.train.batch_size * cfg.data.length)
      * cfg.train.grad_accum, trained=groups, masking=cfg.train.masking)
  return f.as_dict()


# --- one compile (worker process) ------------------------------------------------------

def _unroll_loops():
  """Make every lax.scan / fori_loop traced from now on fully unrolled (loop-free HLO)."""
  import jax
  scan, fori = jax.lax.scan, jax.lax.fori_loop

  def scan_unrolled(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
    return scan(f, init, xs, length, reverse=reverse, unroll=True, **kw)

  def fori_unrolled(lower, upper, body_fun, init_val, *, unroll=None):
    return fori(lower, upper, body_fun, init_val, unroll=True)

  jax.lax.scan, jax.lax.fori_loop = scan_unrolled, fori_unrolled


def worker(name: str, arg: str | None, overrides, mode: str) -> dict:
  info = SLICES[name]
  if mode == "flops":
    _unroll_loops()
  import jax
  from jax.experimental import topologies

  from lavida_jax import flops as flops_lib
  from lavida_jax import sharding

  cfg = load_config(info.get("config", name), arg, overrides)
  t0 = time.perf_counter()
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=info["topology"], chip_config_name=info["chip_config"],
      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  devices = topo.devices
  mesh = sharding.make_mesh(tuple(cfg.mesh), devices=devices)
  accum = cfg.train.grad_accum
  # (nnx.eval_shape must not run under set_mesh: train.py)
  run, state, batch, mcfg, groups = abstract_step(
      cfg, mesh, micro_batches=1 if mode == "flops" else None)
  with jax.set_mesh(mesh):
    lowered = run.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile(FLOPS_FLAGS if mode == "flops" else {})
  t2 = time.perf_counter()
  out = dict(config=name, arg=arg or "", overrides=list(overrides), mode=mode,
             devices=len(devices), device_kind=devices[0].device_kind,
             mesh=dict(mesh.shape), grad_accum=accum, lower_s=round(t1 - t0, 1),
             compile_s=round(t2 - t1, 1))
  hlo = compiled.as_text()
  out["while_loops"] = len(re.findall(r"\bwhile\(", hlo))
  targets = re.findall(r'custom_call_target="([^"]+)"', hlo)
  out["custom_calls"] = {t: targets.count(t) for t in sorted(set(targets))}
  out["splash_calls"] = splash_calls(hlo)
  # Every Pallas call must be a splash kernel we priced.
  out["unpriced_pallas_calls"] = (out["custom_calls"].get("tpu_custom_call", 0)
                                  - sum(out["splash_calls"].values()))
  if mode == "memory":
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes)
    out.update(argument=m.argument_size_in_bytes, temp=m.temp_size_in_bytes,
               output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
               generated_code=m.generated_code_size_in_bytes, bytes_per_chip=total,
               hbm=info["hbm_gib"] * GiB, fits=total <= info["hbm_gib"] * GiB)
  else:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    negative = negative_calls(name, out["custom_calls"])
    optimal = float(cost.get("optimal_seconds", float("nan")))
    corrected = optimal + negative
    # cost_analysis() describes one device's partition of the SPMD program: its
    # seconds are the step's, its flops are per chip (x devices for the slice).
    splash = splash_flops(out["splash_calls"])  # per chip: Pallas calls carry no cost
    splash_s = splash / flops_lib.PEAK_BF16[info["peak"]]
    out.update(xla_flops_micro=float(cost.get("flops", 0.0)) * len(devices),
               bytes_accessed_micro=float(cost.get("bytes accessed", 0.0)),
               optimal_seconds_micro=optimal, negative_calls=negative,
               splash_flops_micro=splash * len(devices), splash_seconds_micro=splash_s,
               step_seconds=(corrected + splash_s) * accum,
               xla_flops_step=(float(cost.get("flops", 0.0)) + splash) * len(devices) * accum)
  out["model_flops"] = model_flops(cfg, mcfg, groups)
  return out


# --- driver ----------------------------------------------------------------------------

def run_worker(name, arg, overrides, mode, libtpu, timeout) -> dict:
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)
  env["TPU_ACCELERATOR_TYPE"] = SLICES[name]["accelerator"]
  env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Fake CPU devices from a test setup would only confuse the TPU compile.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", ""))
  if libtpu:
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [libtpu, env.get("PYTHONPATH")]))
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--configs={name}",
         f"--only={mode}"] + ([f"--arg={arg}"] if arg else []) + [f"--set={s}" for s in overrides]
  t = time.perf_counter()
  with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout.seek(0)
    stderr.seek(0)
    out_text, err_text = stdout.read(), stderr.read()
  wall = round(time.perf_counter() - t, 1)
  rss = round(usage.ru_maxrss / 2 ** 20, 1)  # KiB -> GiB
  if wall >= timeout:
    return dict(config=name, mode=mode, error=f"timed out after {timeout} s", peak_rss_gib=rss)
  lines = [l for l in out_text.splitlines() if l.startswith("AOT_RESULT ")]
  if proc.returncode or not lines:
    tail = (err_text or out_text).strip().splitlines()[-15:]
    return dict(config=name, mode=mode, peak_rss_gib=rss,
                error=f"exit {proc.returncode}: " + "\n".join(tail))
  out = json.loads(lines[-1][len("AOT_RESULT "):])
  out.update(wall_s=wall, peak_rss_gib=rss)
  return out


def negative_calls(name: str, custom_calls: dict) -> int:
  """Custom calls that libtpu 0.0.42.1 prices at -1 s each in `optimal_seconds`.

  v4/v5e: ConcatBitcast (SPEC §9). v5p: the PrepareAsyncCall{Start,Done} pair that
  `jnp.nonzero` (the loss's gather of masked rows) lowers to -- found here: a probe
  program of just `jnp.nonzero` has optimal_seconds = -2.0 on v5p, +4e-7 on v4/v5e.
  """
  return sum(custom_calls.get(t, 0) for t in SLICES[name]["negative_calls"])


# Matmuls of [L, L] x H per (example, query head) in each splash kernel (JAX's
# splash_attention_kernel.py): forward QK^T, PV; dq QK^T (recomputed), dO V^T, dS K;
# dkv QK^T (recomputed), dO V^T, P^T dO, dS^T Q.
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
_SPLASH_CALL = re.compile(r"%splash_mha_(fwd|dq|dkv)[\w.]* = \(([^=]*?)\) custom-call\(")
_SHAPE_4D = re.compile(r"(?:bf16|f16|f32)\[(\d+),(\d+),(\d+),(\d+)\]")


def splash_calls(hlo: str) -> dict:
  """Splash kernel calls in optimized HLO: {"kind B heads L H": count}.

  The first 4-D array a call returns is [B, heads, L, H] of this chip's shard (the
  output, dq, or dk): query heads for fwd/dq, kv heads for dkv; L the padded length
  (queries = keys in every training call).
  """
  out: dict[str, int] = {}
  for m in _SPLASH_CALL.finditer(hlo):
    shape = _SHAPE_4D.search(m.group(2))
    if shape is None:
      raise ValueError(f"splash call without a 4-D result: {m.group(0)[:200]}")
    key = " ".join((m.group(1), *shape.groups()))
    out[key] = out.get(key, 0) + 1
  return out


def splash_flops(calls: dict) -> float:
  """Per-chip FLOPs of the splash calls (2 per multiply-add, like lavida_jax.flops).

  A call of kind k on [B, N, L, H] does SPLASH_MATMULS[k] matmuls of 2 B N L^2 H. A dkv
  call reports kv heads; its query heads (GQA) are those of the fwd call with the
  same B, L and H.
  """
  parsed = [(k.split()[0], *map(int, k.split()[1:]), n) for k, n in calls.items()]
  q_heads = {(b, l, h): heads for kind, b, heads, l, h, _ in parsed if kind != "dkv"}
  total = 0.0
  for kind, b, heads, l, h, n in parsed:
    if kind == "dkv":
      heads = q_heads.get((b, l, h), heads)
    total += n * SPLASH_MATMULS[kind] * 2.0 * b * heads * l * l * h
  return total


def extrapolate(name, arg, overrides, one: dict, two: dict) -> dict:
  """Full-depth loop-free cost from compiles with 1 and 2 layers (LM and vision).

  Every per-step quantity q (XLA flops, corrected optimal seconds) is affine in the
  depths: q = q(1, 1) + (L - 1) a + (Lv - 1) b. The two compiles give a + b = q(2, 2) -
  q(1, 1); it is split between one LM layer (a) and one vision layer (b) in the ratio of
  their model FLOPs (lavida_jax.flops), the vision layer being ~3% of the pair.
  """
  if "error" in one or "error" in two:
    return dict(config=name, mode="flops", error=one.get("error") or two.get("error"))
  from lavida_jax import flops as flops_lib
  cfg = load_config(name, arg, overrides)
  mcfg = _mcfg(cfg)
  rows = cfg.train.batch_size * (2 if cfg.train.masking == "complementary" else 1)
  lm_layer = 3 * rows * (flops_lib.lm_dense_forward_per_token(mcfg.lm) * cfg.data.length
                         + flops_lib.lm_attention_forward_per_row(mcfg.lm, cfg.data.length)
                         ) / mcfg.lm.n_layers
  v = mcfg.vision
  p = v.num_patches
  vis_layer = 3 * cfg.train.batch_size * mcfg.image.max_views * (
      2 * p * (4 * v.width ** 2 + 2 * v.width * v.mlp_dim) + 4 * p * p * v.width)
  share = lm_layer / (lm_layer + vis_layer)
  n_lm, n_vis = mcfg.lm.n_layers - 1, v.depth - 1
  accum = cfg.train.grad_accum

  def full(r1, r2):
    d = r2 - r1
    return r1 + n_lm * share * d + n_vis * (1 - share) * d

  sec = lambda r: (r["optimal_seconds_micro"] + negative_calls(name, r["custom_calls"])
                   + r.get("splash_seconds_micro", 0.0))
  micro_s = full(sec(one), sec(two))
  fl = lambda r: r["xla_flops_micro"] + r.get("splash_flops_micro", 0.0)
  micro_flops = full(fl(one), fl(two))
  splash = full(one.get("splash_flops_micro", 0.0), two.get("splash_flops_micro", 0.0))
  splash_s = full(one.get("splash_seconds_micro", 0.0), two.get("splash_seconds_micro", 0.0))
  return dict(config=name, mode="flops", method="1- and 2-layer loop-free compiles, "
              f"extrapolated to {mcfg.lm.n_layers} LM / {v.depth} vision layers",
              mesh=one["mesh"], grad_accum=accum, lm_share_of_layer_pair=round(share, 4),
              optimal_seconds_micro=micro_s, step_seconds=micro_s * accum,
              xla_flops_step=micro_flops * accum, splash_flops_step=splash * accum,
              splash_seconds_step=splash_s * accum,
              negative_calls=f"{negative_calls(name, one['custom_calls'])}/"
                             f"{negative_calls(name, two['custom_calls'])}",
              while_loops=max(one["while_loops"], two["while_loops"]),
              model_flops=model_flops(cfg, mcfg, train_groups(cfg)))


def _mcfg(cfg):
  from lavida_jax import text, train
  specials = (text.SpecialTokens.dream() if cfg.model.family == "lavida-dream"
              else text.SpecialTokens.llada())
  return train.model_config(cfg, specials, 0)


def train_groups(cfg):
  from lavida_jax import train
  return train.STAGE_GROUPS[cfg.train.stage]


def summarise(name, mem: dict, fl: dict) -> dict:
  from lavida_jax import flops
  info = SLICES[name]
  row = dict(config=name, topology=f"{info['topology']} ({info['chips']} chips)")
  src = mem if "mesh" in mem else fl
  if "mesh" in src:
    m = src["mesh"]
    row["mesh"] = f"{m.get('data')}x{m.get('fsdp')}x{m.get('tensor')}"
    row["grad_accum"] = src["grad_accum"]
  if "bytes_per_chip" in mem:
    row["gib_per_chip"] = round(mem["bytes_per_chip"] / GiB, 2)
    row["fits"] = f"{'yes' if mem['fits'] else 'NO'} (of {info['hbm_gib']} GiB)"
  else:
    row["gib_per_chip"] = mem.get("error", "-")
  if "step_seconds" in fl:
    model = fl["model_flops"]["total"]
    row["est_step_s"] = round(fl["step_seconds"], 3)
    row["est_mfu"] = round(flops.mfu(model, fl["step_seconds"], info["chips"],
                                     flops.PEAK_BF16[info["peak"]]), 3)
    row["model_tflop"] = round(model / 1e12, 1)
    row["xla_tflop"] = round(fl["xla_flops_step"] / 1e12, 1)
    row["splash_tflop"] = round(fl.get("splash_flops_step", 0.0) / 1e12, 1)
    row["negative_calls"] = fl["negative_calls"]
    row["loops_left"] = fl["while_loops"]
  else:
    row["est_step_s"] = fl.get("error", "-")
  return row


def table(rows) -> str:
  head = ("| config | topology | mesh (d×f×t) | accum | GiB/chip | fits | est. step s "
          "| est. MFU | model TFLOP | XLA TFLOP | of which splash (hand) "
          "| −1 s calls (1/2 layers) | loops left |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append("| " + " | ".join(str(r.get(k, "-")) for k in (
        "config", "topology", "mesh", "grad_accum", "gib_per_chip", "fits", "est_step_s",
        "est_mfu", "model_tflop", "xla_tflop", "splash_tflop", "negative_calls",
        "loops_left")) + " |")
  return "\n".join(lines)


def write_readme(text: str, path=os.path.join(ROOT, "benchmarks", "README.md")) -> None:
  start, end = "<!-- AOT:BEGIN -->", "<!-- AOT:END -->"
  body = open(path).read() if os.path.exists(path) else f"{start}\n{end}\n"
  if start not in body:
    body += f"\n{start}\n{end}\n"
  pre, rest = body.split(start, 1)
  post = rest.split(end, 1)[1]
  open(path, "w").write(f"{pre}{start}\n{text}\n{end}{post}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--configs", default="tpu_v4_64,tpu_v5p_128,tpu_v5e_256")
  ap.add_argument("--arg", default="", help="config argument, e.g. model=lavida-llada,stage=2")
  ap.add_argument("--set", action="append", default=[], help="config override key=value")
  ap.add_argument("--only", choices=("memory", "flops"), default=None)
  ap.add_argument("--libtpu", default="", help="folder holding the libtpu package")
  ap.add_argument("--timeout", type=int, default=3000, help="seconds per compile")
  ap.add_argument("--readme", action="store_true", help="write the table into README.md")
  ap.add_argument("--json", default="", help="append every result as a JSON line here")
  ap.add_argument("--from_json", default="", help="only rebuild the table from such a file")
  ap.add_argument("--full_unroll", action="store_true",
                  help="flops from one compile with every layer unrolled (slow) instead of "
                       "two shallow compiles (1 and 2 layers) extrapolated per layer")
  ap.add_argument("--lora", action="store_true", help="LaViDa-L LoRA fine-tuning (LORA_SETS; "
                  "e.g. --configs=tpu_v5e_8,tpu_v4_8,tpu_v5p_8 --only=memory)")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.lora:
    a.set = list(LORA_SETS) + a.set
  names = [n for n in a.configs.split(",") if n]
  for n in names:
    if n not in SLICES:
      ap.error(f"unknown TPU config {n!r}; expected one of {sorted(SLICES)}")
  if a.from_json:  # rebuild the table from logged results (the last of each kind wins)
    logged = {}
    for line in open(a.from_json):
      r = json.loads(line)
      if r.get("mode") == "memory" or r.get("method"):
        logged[r["config"], r["mode"]] = r
    rows = [summarise(n, logged.get((n, "memory"), {}), logged.get((n, "flops"), {}))
            for n in names]
    print(table(rows))
    if a.readme:
      write_readme(table(rows))
    return
  if a.worker:
    print("AOT_RESULT " + json.dumps(worker(names[0], a.arg or None, a.set, a.only),
                                     default=str), flush=True)
    return
  modes = [a.only] if a.only else ["memory", "flops"]
  rows = []

  def log(r):
    print(json.dumps(r, default=str), flush=True)
    if a.json:
      with open(a.json, "a") as f:
        f.write(json.dumps(r, default=str) + "\n")

  for name in names:
    results = {}
    for mode in modes:
      if mode == "memory":
        results[mode] = run_worker(name, a.arg or None, a.set, mode, a.libtpu, a.timeout)
        log(results[mode])
        continue
      if a.full_unroll:
        results[mode] = run_worker(name, a.arg or None, a.set, mode, a.libtpu, a.timeout)
        log(results[mode])
        continue
      shallow = []
      for depth in (1, 2):
        r = run_worker(name, a.arg or None, a.set + [f"model.lm.n_layers={depth}",
                                                     f"model.vision.depth={depth}"],
                       mode, a.libtpu, a.timeout)
        log(r)
        shallow.append(r)
      results[mode] = extrapolate(name, a.arg or None, a.set, *shallow)
      log(results[mode])
    rows.append(summarise(name, results.get("memory", {}), results.get("flops", {})))
  out = table(rows)
  print(out)
  if a.readme:
    write_readme(out)


if __name__ == "__main__":
  main()
