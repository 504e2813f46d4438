"""The training loop: sharded state, one jitted step, checkpoints, evaluation (SPEC §6, §9).

One loop for every scale: a single CPU is a mesh of one. The state is created
directly sharded (`jit` with out_shardings), the step is jitted once with
in/out shardings and donation, and an Orbax CheckpointManager keeps the newest
`keep` steps under WORKDIR/checkpoints/<step>/ with the items
  params     the whole model (`nnx.to_pure_dict`), readable by load_pretrained/export
  opt_state  optimizer state of the trained groups
  data       the grain iterator state (resume reproduces the next batches)
  meta       step, the PRNG key data, skip counts
  files      config.json, tokenizer, generation.json, lavida_jax.json (checksums)
A run resumes from the newest complete checkpoint; SIGTERM saves and exits.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lavida_jax import optimizer, sharding, text, train_step
from lavida_jax.checkpoint import checksum, files_item, hf
from lavida_jax.checkpoint import orbax as orbax_lib
from lavida_jax.metrics import MetricWriter, Progress
from lavida_jax.models import lora as lora_lib
from lavida_jax.models.lavida import LaViDa, LaViDaConfig

STAGE_GROUPS = {1: ("projector",), 2: ("vision", "projector", "lm"),
                3: ("vision", "projector", "lm")}


@dataclasses.dataclass
class TrainData:
  tokenizer: text.Tokenizer
  specials: text.SpecialTokens
  tokenizer_path: str | None  # copied beside the checkpoints
  system_prompt: str | None
  make_iterator: Callable[[LaViDaConfig], object]  # -> grain DatasetIterator of host batches


# --- model and state -------------------------------------------------------------------

def model_config(cfg, specials: text.SpecialTokens, vocab: int) -> LaViDaConfig:
  """LaViDaConfig from the config's model block; ids and vocabulary from the tokenizer."""
  m = cfg.model
  mc = LaViDaConfig.create(m.family, m.size, image_size=m.image_size)
  lm = dataclasses.replace(mc.lm, mask_id=specials.mask_id, eos_id=specials.eos_id,
                           **({"vocab_size": vocab} if m.size == "tiny" else {}),
                           remat=cfg.train.remat, **dict(m.get("lm", {})))
  vision = dataclasses.replace(mc.vision, remat=cfg.train.remat, **dict(m.get("vision", {})))
  conn = dataclasses.replace(mc.connector, vision_dim=vision.width, lm_dim=lm.d_model)
  image = dataclasses.replace(mc.image, anyres=m.anyres)
  conn = dataclasses.replace(conn, anyres=m.anyres,
                             pool_mode=conn.pool_mode if m.anyres else None)
  return dataclasses.replace(mc, lm=lm, vision=vision, connector=conn, image=image)


def step_config(cfg, mcfg: LaViDaConfig, tokenizer) -> train_step.StepConfig:
  t = cfg.train
  fim = tuple(i for i in (tokenizer.token_to_id("[FIM]"),) if i is not None) if t.stage == 3 else ()
  return train_step.StepConfig(
      mask_id=mcfg.lm.mask_id, shifted_logits=mcfg.lm.shifted_logits, masking=t.masking,
      eps=t.eps, weighting=t.weighting, normalize=t.normalize, fim_ids=fim,
      vocab_chunk=t.vocab_chunk, capacity=t.capacity or None, grad_accum=t.grad_accum)


def init_model(cfg, mcfg: LaViDaConfig, mesh) -> LaViDa:
  """The model to train: cfg.model.init or a fresh one; with LoRA, adapters added (fp32)
  on that base (bf16/fp32, or int8 with lora.quantize)."""
  dtype = jnp.dtype(cfg.train.param_dtype)
  compute = jnp.dtype(cfg.train.compute_dtype)
  lcfg = lora_config(cfg)
  if cfg.model.init:
    import lavida_jax
    quantize = (cfg.lora.get("quantize") or None) if lcfg else None
    model = lavida_jax.load_pretrained(cfg.model.init, dtype=dtype, mesh=mesh,
                                       quantize=quantize)
  else:
    model = sharding.create_sharded(
        lambda: LaViDa(mcfg, rngs=nnx.Rngs(cfg.train.seed), param_dtype=dtype, dtype=compute),
        mesh)
  if lcfg is None:
    return model
  lora_lib.add_adapters(model, lcfg, cfg.train.seed)
  return sharding.shard_model(model, mesh)  # the adapters placed by their logical axes


def lora_config(cfg) -> lora_lib.LoRAConfig | None:
  """The config's LoRA block (None without one, or with lora.rank = 0)."""
  return lora_lib.LoRAConfig.from_config(cfg.lora) if "lora" in cfg else None


def trained_groups(cfg) -> tuple[tuple[str, ...], dict[str, float]]:
  """(optimizer groups trained, {group: peak lr}): the stage's groups, or with LoRA the
  groups holding adapters, each at lora.lr (the projector's and the tower's at
  lora.lr_projector / lora.lr_vision where those are set, non-zero)."""
  lcfg = lora_config(cfg)
  if lcfg is None:
    groups = STAGE_GROUPS[cfg.train.stage]
    return groups, {g: cfg.train.lr[g] for g in groups}
  groups = tuple(g for g in optimizer.GROUPS if g in lcfg.targets or
                 (g == "lm" and set(lcfg.targets) & {*lora_lib.LM_TARGETS, lora_lib.HEAD_TARGET}))
  return groups, {g: cfg.lora.get(f"lr_{g}") or cfg.lora.lr for g in groups}


def init_state(model: LaViDa, groups, tx, seed: int, mesh, adapters_only: bool = False):
  """-> (graphdef, state, state shardings); the optimizer state is made sharded too.
  adapters_only: state["params"] holds the LoRA adapters alone, the rest is frozen."""
  graphdef, params, frozen = train_step.split_params(model, groups, adapters_only)
  shard = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  rep = NamedSharding(mesh, P())
  # Made by jit with out_shardings, never on one device first (and device_put of a
  # process-local array onto a multi-process mesh is refused).
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings(tx, params, rep))(params)
  step, rng = jax.jit(lambda: (jnp.int32(0), jax.random.key(seed)),
                      out_shardings=(rep, rep))()
  state = dict(step=step, params=params, frozen=frozen, opt_state=opt_state, rng=rng)
  shardings = dict(step=rep, params=shard(params), frozen=shard(frozen),
                   opt_state=shard(opt_state), rng=rep)
  return graphdef, state, shardings


def opt_shardings(tx, params, replicated):
  """Shardings of `tx.init(params)`: a leaf whose key path ends with a parameter's path
  (Adam's mu/nu) follows that parameter; the rest (step counts) is replicated."""
  by_path = {tuple(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}

  def one(path, leaf):
    for n in range(len(path)):
      x = by_path.get(tuple(path[n:]))
      if x is not None and x.shape == leaf.shape:
        return x.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, params))


def merge_params(state) -> dict:
  """The whole model's params (trained + frozen groups) as one pure dict."""
  return {**state["frozen"], **state["params"]}


# --- checkpoints -----------------------------------------------------------------------

class Checkpoints:
  """Orbax CheckpointManager over WORKDIR/checkpoints (async, keep-N, atomic).

  Each step folder is self-contained: beside the array items, its `files` item holds
  config.json, the tokenizer file, generation.json and lavida_jax.json with the CRC-32
  of every array saved (checkpoint/files_item.py); restore verifies them.
  """

  def __init__(self, workdir: str, keep: int, hf_config: dict | None, tokenizer_path=None,
               generation: dict | None = None, lora_record: dict | None = None):
    root = os.path.join(workdir, "checkpoints")
    self.root = root if "://" in root else os.path.abspath(root)  # gs://... stays a URL
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(
        self.root, item_names=("params", "opt_state", "data", "meta", "files"),
        options=options)
    self.family = (hf_config or {}).get("model_type", "")
    self.side: dict[str, bytes] = {}  # the same in every step
    if hf_config is not None:
      self.side[orbax_lib.CONFIG_FILE] = json.dumps(hf_config, indent=1).encode()
    if tokenizer_path and os.path.isfile(tokenizer_path):
      self.side[os.path.basename(tokenizer_path)] = epath.Path(tokenizer_path).read_bytes()
    self.side[orbax_lib.GENERATION_FILE] = json.dumps(generation or {}).encode()
    # A LoRA run saves the adapters alone and lora.json naming the base (adapters.py).
    self.adapters_only = lora_record is not None
    if self.adapters_only:
      from lavida_jax.checkpoint import adapters  # pylint: disable=g-import-not-at-top
      self.side[adapters.LORA_FILE] = json.dumps(lora_record, indent=1).encode()

  def saved_params(self, state) -> dict:
    """The params item: the whole model, or a LoRA run's adapters alone."""
    return state["params"] if self.adapters_only else merge_params(state)

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.root, str(step))

  def files(self, state) -> dict[str, bytes]:
    """The step's `files` item: the side files and lavida_jax.json with the checksums
    of the params and optimizer state (arrays whole on this process; see
    orbax.verify_arrays)."""
    sums = {"algorithm": checksum.ALGORITHM,
            "files": {n: checksum.of_bytes(b) for n, b in self.side.items()},
            "params": tree_checksums(self.saved_params(state), orbax_lib.flatten),
            "opt_state": tree_checksums(state["opt_state"], _keyed)}
    meta = {"format": orbax_lib.FORMAT, "version": 1, "family": self.family,
            "items": ["params", "opt_state", "data", "meta", "files"], "checksums": sums}
    return {**self.side, orbax_lib.META_FILE: json.dumps(meta, indent=1).encode()}

  def save(self, state, data_state, extra: dict, force: bool = False) -> None:
    step = int(state["step"])
    meta = dict(step=step, rng=np.asarray(jax.random.key_data(state["rng"])).tolist(), **extra)
    self.manager.save(step, force=force, args=ocp.args.Composite(
        params=ocp.args.StandardSave(self.saved_params(state)),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        data=ocp.args.JsonSave(all_processes(data_state)), meta=ocp.args.JsonSave(meta),
        files=files_item.FilesSave(self.files(state))))

  def restore(self, step: int, state, shardings):
    """Restores onto the shardings of the freshly built `state` (any mesh), verifying
    the recorded checksums; a corrupt or truncated step is refused in one line."""
    abstract = lambda tree, sh: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    params_sh = (shardings["params"] if self.adapters_only else
                 {**shardings["frozen"], **shardings["params"]})
    folder = self.step_dir(step)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract(self.saved_params(state), params_sh)),
          opt_state=ocp.args.StandardRestore(abstract(state["opt_state"],
                                                      shardings["opt_state"])),
          data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise orbax_lib.diagnose(folder, e, ("params", "opt_state")) from None
    orbax_lib.verify_arrays(orbax_lib.flatten(out["params"]), orbax_lib.checksums(folder),
                            "parameter", os.path.join(folder, "params"))
    orbax_lib.verify_arrays(_keyed(out["opt_state"]), orbax_lib.checksums(folder, "opt_state"),
                            "optimizer state", os.path.join(folder, "opt_state"))
    params = out["params"]
    key_data = np.asarray(out["meta"]["rng"], np.uint32)
    step, rng = jax.jit(  # (device_put of a local array onto a multi-process mesh is refused)
        lambda: (jnp.int32(out["meta"]["step"]), jax.random.wrap_key_data(key_data)),
        out_shardings=(shardings["step"], shardings["rng"]))()
    new = dict(step=step, params={k: params[k] for k in state["params"]},
               frozen=(state["frozen"] if self.adapters_only else
                       {k: params[k] for k in state["frozen"]}),
               opt_state=out["opt_state"], rng=rng)
    return new, out["data"], out["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _keyed(tree) -> dict:
  """{key path: leaf} of any pytree (optax states: tuples and named tuples)."""
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def tree_checksums(tree, flatten_fn) -> dict[str, str]:
  """{path: crc32} of the leaves whole on this process (a leaf sharded over processes
  has no single holder of its bytes and gets none)."""
  return {k: checksum.of_array(jax.device_get(x)) for k, x in flatten_fn(tree).items()
          if getattr(x, "is_fully_addressable", True)}


def gather_json(obj) -> list:
  """Every process's JSON-serialisable `obj`, in process order (a collective: every
  process calls it)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(data.size)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def all_processes(data_state: dict) -> dict:
  """The data item of a checkpoint: every process's iterator state (Orbax's JSON
  items are written by process 0 alone), for `pipeline.process_state`."""
  states = gather_json(data_state)
  return {"process_count": len(states), "states": states}


class Preemption:
  """SIGTERM (TPU maintenance, preemption) -> save at a step boundary and stop.

  One process: a Python SIGTERM handler; the next step boundary. Several processes:
  every process must save the same step, and a signal may reach only some of them,
  or each at another step; jax.distributed's preemption sync manager (its own
  SIGTERM handler, so none is installed here) spreads the notice and names a step
  all processes reach (`multihost_utils.reached_preemption_sync_point`).
  """

  def __init__(self):
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    self.requested = False
    self._sync = jax.process_count() > 1 and distributed.global_state.client is not None
    self._old = None if self._sync else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def reached(self, step: int) -> bool:
    """Call once per step on every process: True when this step is the one to save."""
    if self._sync:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# --- the loop ----------------------------------------------------------------------------

def make_step(graphdef, tx, sc, schedules, shardings, batch_sharding):
  step = functools.partial(train_step.train_step, graphdef=graphdef, tx=tx, sc=sc,
                           schedules=schedules)
  return jax.jit(step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, None), donate_argnums=0)


def make_mesh(cfg):
  """cfg.mesh within each slice x cfg.dcn_mesh across slices; refuses a micro-batch
  (train.batch_size) that does not split over the data-parallel devices, before the
  minutes of model init rather than at the first step."""
  mesh = sharding.make_mesh(tuple(cfg.mesh), dcn_shape=tuple(cfg.dcn_mesh))
  shards = math.prod(mesh.shape[a] for a in dict(sharding.DEFAULT_RULES)["batch"])
  b, accum = cfg.train.batch_size, cfg.train.grad_accum
  if b % shards:
    k = shards // math.gcd(b, shards)
    hint = (f"; e.g. --config.train.grad_accum={accum // k} --config.train.batch_size={b * k}"
            if accum % k == 0 else "")
    raise ValueError(
        f"train.batch_size {b} (one micro-batch; grad_accum {accum}) does not split over the "
        f"{shards} data-parallel devices of mesh {dict(mesh.shape)} (config.mesh "
        f"{tuple(cfg.mesh)} per slice x config.dcn_mesh {tuple(cfg.dcn_mesh)}): make it a "
        f"multiple of {shards}{hint}")
  return mesh


def train_and_evaluate(cfg, workdir: str, data, evaluate_fn=None) -> dict:
  """Trains as `cfg` says; resumes from WORKDIR's newest checkpoint.

  data: a `TrainData` (tokenizer, its special ids and file, and the batch iterator).
  evaluate_fn: optional (model, step) -> metrics dict, run every cfg.eval.every steps
    and at the end.
  Returns the final summary (step, last loss, eval metrics, wall time).
  """
  t_start = time.perf_counter()
  mesh = make_mesh(cfg)
  mcfg = model_config(cfg, data.specials, len(data.tokenizer))
  sc = step_config(cfg, mcfg, data.tokenizer)
  groups, lrs = trained_groups(cfg)
  lcfg = lora_config(cfg)
  tx, schedules = optimizer.make_optimizer(
      lrs, cfg.train.steps, warmup_ratio=cfg.train.warmup_ratio,
      final_ratio=cfg.train.final_ratio, weight_decay=cfg.train.weight_decay,
      clip_norm=cfg.train.clip_norm)
  model = init_model(cfg, mcfg, mesh)  # (eval_shape must not run under set_mesh)
  graphdef, state, shardings = init_state(model, groups, tx, cfg.train.seed, mesh,
                                          adapters_only=lcfg is not None)
  del model
  record = None
  if lcfg is not None:
    from lavida_jax.checkpoint import adapters  # pylint: disable=g-import-not-at-top
    record = adapters.lora_record(lcfg, cfg.model.init, cfg.lora.get("quantize", ""))
  ckpts = Checkpoints(workdir, cfg.checkpoint.keep, hf.config_to_hf(mcfg), data.tokenizer_path,
                      {"system_prompt": data.system_prompt}, record)
  from lavida_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = data.make_iterator(mcfg)
  start = ckpts.latest()
  if start is not None:
    state, data_state, meta = ckpts.restore(start, state, shardings)
    it.set_state(pipeline.process_state(data_state, cfg.train.batch_size * cfg.train.grad_accum,
                                        jax.process_index(), jax.process_count()))
    print(f"resumed from {ckpts.root}/{start}")
  batch_spec = P(dict(sharding.DEFAULT_RULES)["batch"])
  batch_sharding = NamedSharding(mesh, batch_spec)
  run = make_step(graphdef, tx, sc, schedules, shardings, batch_sharding)
  writer = MetricWriter(workdir)
  first = logged = int(state["step"])
  progress = Progress(cfg.train.steps, first)
  preempt = Preemption()
  summary, metrics, evals = {}, None, {}
  try:
    with jax.set_mesh(mesh):
      for step in range(first, cfg.train.steps):
        batch = pipeline.global_batch(next(it), mesh, batch_spec)
        state, metrics = run(state, batch)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.train.steps:
          host = jax.device_get(metrics)
          tokens = (done - logged) * int(np.prod(batch["input_ids"].shape))
          tok_s = progress.update(done - logged, float(host["loss"]), tokens)
          logged = done
          writer.write(done, {**host, "tokens_per_s": tok_s,
                              **{f"skipped/{k}": v for k, v in it.skipped.items()}})
        if evaluate_fn and cfg.eval.every and done % cfg.eval.every == 0 \
            and done != cfg.train.steps:
          evals = evaluate_fn(_model(graphdef, state), done)
          writer.write(done, evals, prefix="eval/")
        stop = preempt.reached(done)
        if done % cfg.checkpoint.every == 0 or stop:
          ckpts.save(state, it.get_state(), {"skipped": it.skipped}, force=stop)
        if stop:
          ckpts.wait()
          print(f"SIGTERM: saved step {done} to {ckpts.root}; exiting")
          summary["preempted_at"] = done
          break
      else:
        if ckpts.latest() != int(state["step"]):
          ckpts.save(state, it.get_state(), {"skipped": it.skipped}, force=True)
        if evaluate_fn:
          evals = evaluate_fn(_model(graphdef, state), int(state["step"]))
          writer.write(int(state["step"]), evals, prefix="eval/")
    ckpts.wait()
  finally:
    preempt.restore()
    progress.close()
    writer.close()
    ckpts.close()
    if hasattr(it, "close"):
      it.close()
  summary.update(step=int(state["step"]), checkpoint=os.path.join(ckpts.root, str(int(state["step"]))),
                 loss=float(metrics["loss"]) if metrics is not None else None,
                 skipped=it.skipped, wall_s=round(time.perf_counter() - t_start, 1), **evals)
  return summary


def _model(graphdef, state) -> LaViDa:
  return nnx.merge(graphdef, nnx.State(state["params"]), nnx.State(state["frozen"]))
