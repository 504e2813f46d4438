"""Orbax checkpoints of LaViDa models: the folder layout, streaming writes, sharded restore.

Folder layout (one "step folder"; `lavida_jax.convert hf-to-orbax` writes one)::

  DIR/
    params/            Orbax PyTree item (OCDBT + zarr): the model's nnx.Param state
                       as a nested dict, `nnx.to_pure_dict(nnx.state(model, nnx.Param))`,
                       e.g. params['lm']['blocks']['attn']['q']['kernel'] [L, D, N, H].
                       Stacked layers keep the leading 'layers' axis.
    config.json        the model config in LaViDa's own (Hugging Face) format: the
                       original file verbatim after hf-to-orbax, else
                       `hf.config_to_hf(cfg)`; the model is rebuilt from it.
    lavida_jax.json    {"format": "lavida-jax-orbax", "version": 1, "family", "items",
                       "checksums": {"algorithm": "crc32", "params": {path: crc},
                       "files": {name: crc}}}: every array's and side file's CRC-32
    tokenizer files    tokenizer.json, tokenizer_config.json, ... when known.

Training checkpoints use the same item name: a CheckpointManager step folder
`WORKDIR/checkpoints/<step>/` holds `params/` beside other items (`opt_state/`, the
data iterator, ...) and `files/` (config.json, tokenizer, generation.json,
lavida_jax.json; train.py). Readers here open only `params/`, so export and
`load_pretrained` work on training checkpoints and ignore optimizer state. Side files
are looked up in `files/`, the step folder, then its parent (runs from before steps
were self-contained). Given a CheckpointManager root, the newest step is used.

Every read verifies the recorded checksums (none recorded: nothing to verify) and
refuses a mismatch, a truncated file or unreadable metadata in one line naming the
parameter and the folder. Writes stream (streamed.py). Restores go straight onto a
mesh: each device reads only its shard's chunks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx
from jax.sharding import SingleDeviceSharding

from lavida_jax import sharding as sharding_lib
from lavida_jax.checkpoint import checksum
from lavida_jax.checkpoint.errors import CheckpointError
# Writing block by block lives in streamed.py; these names are part of this module's API.
from lavida_jax.checkpoint.streamed import (CHUNK_BYTES, Streamed, flatten, unflatten,
                                            write_params)

__all__ = ["CHUNK_BYTES", "Streamed", "write_params", "save_model", "write_meta", "flatten",
           "unflatten", "is_orbax", "find_step", "side_folders", "find_beside", "read_meta",
           "checksums", "verify_side_files", "read_config", "params_metadata", "ParamReader",
           "restore_params", "verify_arrays", "diagnose", "load_orbax", "check_params"]

PARAMS_ITEM = "params"
CONFIG_FILE = "config.json"
META_FILE = "lavida_jax.json"
FORMAT = "lavida-jax-orbax"
GENERATION_FILE = "generation.json"  # how prompts were built (system prompt), for generate
# A training step's side files (config.json, tokenizer, generation.json, lavida_jax.json
# with checksums) live in this item of the step folder: a step copied alone is complete.
FILES_ITEM = "files"


def save_model(model: nnx.Module, directory: str, hf_config: dict | None):
  """An in-memory model -> DIR/params + config.json + lavida_jax.json (DIR must not exist).

  hf_config: config.json contents (e.g. hf.config_to_hf(cfg)); None writes none (a
  training workdir keeps one config.json beside its step folders). For small models
  and tests; `lavida_jax.convert` streams instead.
  """
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  os.makedirs(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(directory, PARAMS_ITEM)), params)
  crcs = {path: checksum.of_array(v) for path, v in flatten(params).items()}
  write_meta(directory, hf_config, model.cfg.family, crcs)


def write_meta(directory: str, hf_config: dict | None, family: str,
               params_crcs: dict[str, str] | None = None, extra_crcs: dict | None = None):
  """config.json (unless None) and lavida_jax.json, which records the checksums of the
  params (`params_crcs`, {path: crc}), of the side files now in `directory`
  (config.json, tokenizer, generation.json) and any `extra_crcs` ({item: {key: crc}})."""
  if hf_config is not None:
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
      json.dump(hf_config, f, indent=2)
  side = [n for n in sorted(os.listdir(directory)) if n != META_FILE
          and os.path.isfile(os.path.join(directory, n))]
  sums = {"algorithm": checksum.ALGORITHM, "files": checksum.of_files(directory, side)}
  if params_crcs is not None:
    sums[PARAMS_ITEM] = params_crcs
  sums.update(extra_crcs or {})
  with open(os.path.join(directory, META_FILE), "w") as f:
    json.dump({"format": FORMAT, "version": 1, "family": family, "items": [PARAMS_ITEM],
               "checksums": sums}, f, indent=1)


# --- finding and reading --------------------------------------------------------------

def is_orbax(path: str) -> bool:
  """A step folder (holds params/) or a CheckpointManager root of step folders."""
  try:
    find_step(path)
    return True
  except CheckpointError:
    return False


def find_step(path: str) -> str:
  """The step folder holding `params/`: `path` itself, or its newest numbered step."""
  if os.path.isdir(os.path.join(path, PARAMS_ITEM)):
    return path
  steps = []
  if os.path.isdir(path):
    for name in os.listdir(path):
      m = re.fullmatch(r"(?:\w+_)?(\d+)", name)
      if m and os.path.isdir(os.path.join(path, name, PARAMS_ITEM)):
        steps.append((int(m.group(1)), name))
  if not steps:
    raise CheckpointError(f"{path} is not an Orbax checkpoint: no {PARAMS_ITEM}/ item and no "
                          f"numbered step folder holding one")
  return os.path.join(path, max(steps)[1])


def side_folders(step: str) -> list[str]:
  """Where a step's side files are looked up, first match wins: its `files/` item (a
  training step), the step folder (a converted folder), and, for checkpoints written
  before steps were self-contained, the parent (the CheckpointManager root)."""
  return [os.path.join(step, FILES_ITEM), step, os.path.dirname(os.path.abspath(step))]


def find_beside(step: str, name: str) -> str | None:
  """`name` among the step's side folders (see `side_folders`)."""
  for folder in side_folders(step):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def read_meta(step: str) -> dict:
  """lavida_jax.json of a step ({} when there is none: an older checkpoint)."""
  path = find_beside(step, META_FILE)
  if path is None:
    return {}
  try:
    with open(path) as f:
      meta = json.load(f)
    if not isinstance(meta, dict) or not isinstance(meta.get("checksums", {}), dict):
      raise ValueError("not an object with a 'checksums' object")
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is corrupt: {str(e)[:100]}") from None
  return meta


def checksums(step: str, item: str = PARAMS_ITEM) -> dict[str, str]:
  """{key: crc} recorded for an item of the step ({} when none were: older checkpoints)."""
  sums = read_meta(step).get("checksums", {})
  if sums and sums.get("algorithm") != checksum.ALGORITHM:
    raise CheckpointError(f"{find_beside(step, META_FILE)}: unknown checksum algorithm "
                          f"{sums.get('algorithm')!r}")
  found = sums.get(item, {})
  if not isinstance(found, dict):
    raise CheckpointError(f"{find_beside(step, META_FILE)} is corrupt: checksums of {item}")
  return found


def verify_side_files(step: str) -> None:
  """Every side file lavida_jax.json records (config, tokenizer, generation settings) has
  its recorded checksum; refuses a changed or missing one, naming it."""
  meta_path = find_beside(step, META_FILE)
  for name, crc in checksums(step, "files").items():
    path = os.path.join(os.path.dirname(meta_path), name)
    if not os.path.isfile(path):
      raise CheckpointError(f"Orbax checkpoint {step} is missing {name} (recorded in "
                            f"{meta_path})")
    checksum.check(f"file {name}", os.path.dirname(path), crc, checksum.of_file(path))


def read_config(step: str) -> dict:
  path = find_beside(step, CONFIG_FILE)
  if path is None:
    raise CheckpointError(f"Orbax checkpoint {step} has no {CONFIG_FILE} (looked in "
                          f"{', '.join(side_folders(step))})")
  try:
    with open(path) as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is corrupt: {str(e)[:100]}") from None


def params_metadata(step: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{'lm/embed': (shape, dtype), ...} from the params item's metadata (no data read)."""
  directory = os.path.abspath(os.path.join(step, PARAMS_ITEM))
  try:
    meta = ocp.PyTreeCheckpointer().metadata(directory)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return {path: (tuple(m.shape), np.dtype(m.dtype)) for path, m in flatten(tree).items()}
  except Exception as e:  # pylint: disable=broad-except
    # A corrupt _METADATA surfaces as KeyError, AttributeError, JSON errors, ...
    raise CheckpointError(f"cannot read the Orbax metadata of {directory}: a file there is "
                          f"truncated or corrupt ({_short(e)})") from None


def _short(e: BaseException) -> str:
  """An exception as one short line (tensorstore's messages run to pages): the
  innermost cause's first sentence."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  first = (str(e).strip().splitlines() or [""])[0].split(". See full TensorStore")[0]
  first = first.split(" [tensorstore_spec=")[0]
  status = re.match(r"([A-Z_]+): ", first)  # tensorstore: 'STATUS: where: where: what'
  if status:
    first = f"{status.group(1)}: {first.rsplit(': ', 1)[-1]}"
  return f"{type(e).__name__}: {first[:160]}"


class ParamReader:
  """Reads one parameter, or one layer of a stacked one, straight from tensorstore."""

  def __init__(self, step: str):
    self.directory = epath.Path(os.path.abspath(os.path.join(step, PARAMS_ITEM)))
    self.meta = params_metadata(step)
    self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self.directory)
    self._zarr3 = _uses_zarr3(self.directory)
    self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._ocdbt)
    self._open: dict[str, object] = {}
    self.step = step
    self.crcs = checksums(step)
    verify_arrays({}, {k: v for k, v in self.crcs.items() if k not in self.meta}, "parameter",
                  str(self.directory))
    self._running: dict[str, tuple[int, checksum.Running]] = {}

  def _store(self, path: str):
    if path not in self._open:
      info = ocp.type_handlers.ParamInfo(
          name=".".join(path.split("/")), parent_dir=self.directory,
          is_ocdbt_checkpoint=self._ocdbt, use_zarr3=self._zarr3, ts_context=self._context)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
      # Keep only the store in hand open: reading layer by layer, nothing accumulates.
      self._open = {path: ts.open(spec, open=True, context=self._context).result()}
    return self._open[path]

  def read(self, path: str, index=()) -> np.ndarray:
    """One parameter (index ()) or one layer of a stacked one (index i). Read whole, or
    layer by layer from 0 up, its checksum is verified when its last byte is read."""
    try:
      out = np.asarray(self._store(path)[index].read().result())
    except Exception as e:  # pylint: disable=broad-except
      raise unreadable(self.step, path, e) from None
    if path in self.crcs:
      shape = self.meta[path][0]
      if index == ():
        checksum.check(f"parameter {path}", self.directory, self.crcs[path],
                       checksum.of_array(out))
      elif isinstance(index, int):
        n, crc = self._running.get(path, (0, checksum.Running()))
        if index == n:  # in order: layer n follows layers 0..n-1 in C order
          crc.update(out)
          self._running[path] = (n + 1, crc)
          if n + 1 == shape[0]:
            checksum.check(f"parameter {path}", self.directory, self.crcs[path],
                           crc.hexdigest())
    return out


def unreadable(step: str, path: str, e: BaseException, item: str = PARAMS_ITEM):
  what = "parameter" if item == PARAMS_ITEM else f"{item} array"
  return CheckpointError(f"Orbax {what} {path} cannot be read from "
                         f"{os.path.join(step, item)}, a truncated or corrupt file "
                         f"({_short(e)})")


def _uses_zarr3(directory: epath.Path) -> bool:
  try:
    meta = json.loads((directory / "_METADATA").read_text())
    return bool(meta.get("use_zarr3", False))
  except (OSError, ValueError):
    return False


def restore_params(step: str, target: dict) -> dict:
  """Restores the params item onto the shardings of `target` (jax.ShapeDtypeStruct
  leaves in the stored dtypes), verifying every recorded checksum; an unreadable or
  corrupt parameter is refused in one line naming it."""
  directory = os.path.abspath(os.path.join(step, PARAMS_ITEM))
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=False))
  except Exception as e:  # pylint: disable=broad-except
    raise diagnose(step, e) from None
  verify_arrays(flatten(out), checksums(step), "parameter", directory)
  return out


def verify_arrays(arrays: dict, crcs: dict[str, str], what: str, where: str) -> int:
  """Checks each array that has a recorded checksum and is whole on this process;
  returns how many were checked. (An array sharded over processes is skipped: no
  process holds its bytes.) A recorded key that names no array means the record
  itself is damaged: refused."""
  unknown = sorted(set(crcs) - set(arrays))
  if unknown:
    raise CheckpointError(f"the checksums of {where} name {what} {unknown[0]}, which it does "
                          "not hold (a corrupt lavida_jax.json)")
  n = 0
  for path, x in arrays.items():
    if path in crcs and getattr(x, "is_fully_addressable", True):
      checksum.check(f"{what} {path}", where, crcs[path], checksum.of_array(jax.device_get(x)))
      n += 1
  return n


def array_names(step: str, item: str) -> list[str]:
  """Tensorstore names ('0.mu.lm.embed') of every array of an item, from its metadata
  ([] when that is unreadable too)."""
  try:
    tree = ocp.PyTreeCheckpointer().metadata(os.path.abspath(os.path.join(step, item)))
    tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "name") and hasattr(x, "shape"))
    return [str(x.name) for x in leaves if hasattr(x, "name")]
  except Exception:  # pylint: disable=broad-except
    return []


def diagnose(step: str, e: BaseException, items=(PARAMS_ITEM,)) -> CheckpointError:
  """A failed restore -> one line naming the array: the one the message names (in
  tensorstore's spelling, 'a.b' for 'a/b'), else the first parameter that fails to
  read alone."""
  message = str(e)
  for item in items:
    for name in sorted(array_names(step, item), key=len, reverse=True):
      if re.search(r"(?<![\w.])" + re.escape(name) + r"\b", message):
        path = name.replace(".", "/") if item == PARAMS_ITEM else name
        return unreadable(step, path, e, item)
  meta = params_metadata(step)
  reader = ParamReader(step)
  for path in meta:
    try:
      reader.read(path)
    except CheckpointError as found:
      return found
  return CheckpointError(f"Orbax checkpoint {step} cannot be restored: {_short(e)}")


def load_orbax(path: str, dtype="float32", mesh=None, rules=sharding_lib.DEFAULT_RULES,
               **config_overrides):
  """A LaViDa model from an Orbax folder (see the module docstring), placed on `mesh`.

  Every parameter is checked against the model's shapes (named when missing,
  unexpected or mis-shaped) before anything is read; each device then reads
  only its own shard. mesh=None: the first device.
  """
  import jax.numpy as jnp

  from lavida_jax.checkpoint import hf
  from lavida_jax.models.lavida import LaViDa

  dtype = jnp.dtype(dtype)
  step = find_step(path)
  verify_side_files(step)
  raw = read_config(step)
  meta = params_metadata(step)
  cfg = hf.config_from_hf(raw, where=step, **config_overrides)
  if "lm/embed" in meta and meta["lm/embed"][0][0] != cfg.lm.vocab_size:
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(
        cfg.lm, embed_vocab_size=meta["lm/embed"][0][0]))
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: LaViDa(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)))
  if mesh is not None:
    shardings = sharding_lib.state_shardings(abstract, mesh, rules)
    named = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(shardings)}
  flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(abstract)}
  check_params(meta, {k: v.shape for k, v in flat.items()}, step)
  device = SingleDeviceSharding(jax.devices()[0])
  # Restored in the stored dtypes (the checksums are of those bytes), then cast.
  target = unflatten({
      k: jax.ShapeDtypeStruct(v.shape, meta[k][1],
                              sharding=named[k] if mesh is not None else device)
      for k, v in flat.items()})
  values = flatten(restore_params(step, target))
  for k in list(values):  # one leaf at a time in both dtypes, not the whole model
    values[k] = values.pop(k).astype(dtype)
  if cfg.reference_compat:  # the reference keeps the newline in bf16 (SPEC §13)
    values["image_newline"] = values["image_newline"].astype(jnp.bfloat16).astype(dtype)
  state = nnx.map_state(lambda p, v: v.replace(values["/".join(map(str, p))]), abstract)
  return nnx.merge(graphdef, state)


def check_params(meta: dict, expected: dict[str, tuple[int, ...]], where: str):
  """Refuses a missing, unexpected or mis-shaped parameter, naming it."""
  for path, shape in expected.items():
    if path not in meta:
      raise CheckpointError(f"Orbax checkpoint {where} is missing parameter {path}")
    if tuple(meta[path][0]) != tuple(shape):
      raise CheckpointError(f"Orbax checkpoint parameter {path} has shape {meta[path][0]}, "
                            f"expected {tuple(shape)}")
  extra = sorted(set(meta) - set(expected))
  if extra:
    raise CheckpointError(f"Orbax checkpoint {where} has unexpected parameter(s): "
                          f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")

