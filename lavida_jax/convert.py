"""Checkpoint conversion both ways: Hugging Face (PyTorch safetensors) <-> Orbax (SPEC §8).

  python -m lavida_jax.convert hf-to-orbax --src=HF_DIR --dst=ORBAX_DIR [--dtype=bfloat16]
  python -m lavida_jax.convert orbax-to-hf --src=ORBAX_DIR --dst=HF_DIR [--max_shard_bytes=N]
  python -m lavida_jax.convert lora-to-peft --src=ADAPTER_STEP --dst=PEFT_DIR

The family (LaViDa-L, LaViDa-D, LLaDA-V) comes from config.json; names and
layouts from the family's key table in `checkpoint/hf.py`, read in one
direction and inverted (TO_HF) in the other. Both directions stream one tensor
(one layer of a stacked parameter) at a time, so memory stays near the size of
the largest tensor. Every source tensor is checked before anything is written
(missing, unexpected and mis-shaped tensors are refused by name). Output goes to
a temporary folder beside the destination and is renamed into place only when
complete, so a failure (a bad shard, a full disk) leaves no half-written folder
that looks finished. The Orbax folder layout is described in `checkpoint/orbax.py`;
orbax-to-hf reads only its `params` item, so training checkpoints export too.
lora-to-peft writes a LoRA training step's adapters as a PEFT folder
(`checkpoint/peft.py`), its base recorded as base_model_name_or_path.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fnmatch
import functools
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from lavida_jax import cli
from lavida_jax.checkpoint import export
from lavida_jax.checkpoint import hf
from lavida_jax.checkpoint import hub
from lavida_jax.checkpoint import orbax as orbax_lib
from lavida_jax.checkpoint.shards import Checkpoint, CheckpointError

# Files copied alongside the weights, both ways.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "*.model", "generation_config.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
DTYPE_NAMES = ("bfloat16", "float32")


# --- destination handling -----------------------------------------------------------

def _disk_full(e: BaseException | None) -> bool:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    e = e.__cause__ or e.__context__
  return False


@contextlib.contextmanager
def staged_output(dst: str, overwrite: bool = False, sources: tuple[str, ...] = ()):
  """Yields a temporary folder beside `dst`; renamed to `dst` only on success.

  Refuses a non-empty `dst` unless overwrite, and a `dst` that overlaps a source.
  On any error the temporary folder is removed and `dst` is left as it was.
  """
  dst = os.path.abspath(dst)
  for src in sources:
    src = os.path.abspath(src)
    if dst == src or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
      raise CheckpointError(f"destination {dst} overlaps the source {src}")
  if os.path.lexists(dst):
    empty_dir = os.path.isdir(dst) and not os.listdir(dst)
    if not empty_dir and not overwrite:
      raise CheckpointError(f"destination {dst} exists and is not empty; pass --overwrite "
                            "to replace it")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
  try:
    yield tmp
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if _disk_full(e):
      raise CheckpointError(f"no space left on the device while writing {dst}; the partial "
                            "output was removed and the destination left untouched") from e
    raise
  if os.path.lexists(dst):
    old = tmp + ".old"
    os.rename(dst, old)
    os.rename(tmp, dst)
    if os.path.isdir(old) and not os.path.islink(old):
      shutil.rmtree(old)
    else:
      os.remove(old)
  else:
    os.rename(tmp, dst)


def _check_space(folder: str, nbytes: int):
  free = shutil.disk_usage(folder).free
  if free < nbytes:
    raise CheckpointError(f"not enough disk space for the conversion: {nbytes / 1e9:.2f} GB "
                          f"needed in {folder}, {free / 1e9:.2f} GB free")


def copy_side_files(src_folders, dst: str, config_path: str | None, dtype=None) -> list[str]:
  """config.json (verbatim unless the dtype changed) and tokenizer files -> dst."""
  copied = []
  if config_path is not None:
    target = os.path.join(dst, orbax_lib.CONFIG_FILE)
    with open(config_path) as f:
      raw = json.load(f)
    new_name = None if dtype is None else np.dtype(dtype).name
    if new_name is not None and raw.get("torch_dtype") not in (None, new_name):
      raw["torch_dtype"] = new_name
      with open(target, "w") as f:
        json.dump(raw, f, indent=2)
    else:
      shutil.copyfile(config_path, target)
    copied.append(orbax_lib.CONFIG_FILE)
  for folder in src_folders:
    if folder is None or not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      if any(fnmatch.fnmatch(name, p) for p in TOKENIZER_FILES) and name not in copied:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
          shutil.copyfile(path, os.path.join(dst, name))
          copied.append(name)
  return copied


# --- HF -> Orbax ------------------------------------------------------------------------

def _source_dtype(ckpt: Checkpoint, names) -> np.dtype:
  return np.result_type(*[ckpt.dtype(n) for n in names])


def _hf_blocks(ckpt, names, transform, layer_shape, dtype, stacked):
  for i, name in enumerate(names):
    x = hf.TO_OURS[transform](ckpt.get(name), layer_shape).astype(dtype, copy=False)
    yield (i if stacked else ()), x
    del x


def hf_to_orbax(src: str, dst: str, dtype: str | None = None, overwrite: bool = False,
                chunk_bytes: int = orbax_lib.CHUNK_BYTES) -> dict:
  """HF folder -> Orbax folder (params item + config.json + tokenizer files).

  dtype: cast every parameter ('bfloat16' / 'float32'); None keeps each tensor's own
  dtype, so orbax-to-hf reproduces the source bit for bit.
  """
  from flax import nnx

  from lavida_jax.models.lavida import LaViDa

  if dtype is not None and dtype not in DTYPE_NAMES:
    raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {DTYPE_NAMES}")
  raw = hf.read_config(src)
  hf.detect_family(raw)
  with Checkpoint(src) as ckpt:
    cfg = hf.config_from_hf(raw, ckpt, where=src)
    abstract = nnx.state(nnx.eval_shape(lambda: LaViDa(cfg, rngs=nnx.Rngs(0))))
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(abstract)}
    rows = list(hf.expand_rows(cfg))
    hf.check_tensors(ckpt, rows, flat, src, cfg.family)  # headers only: fail before writing
    leaves, nbytes = {}, 0
    for path, names, transform, stacked in rows:
      out = np.dtype(dtype) if dtype is not None else _source_dtype(ckpt, names)
      shape = flat[path].shape
      layer_shape = shape[1:] if stacked else shape
      leaves[path] = orbax_lib.Streamed(shape, out, functools.partial(
          _hf_blocks, ckpt, names, transform, layer_shape, out, stacked), stacked=stacked)
      nbytes += int(np.prod(shape)) * out.itemsize
    with staged_output(dst, overwrite, sources=(src,)) as tmp:
      _check_space(tmp, nbytes)
      crcs = orbax_lib.write_params(os.path.join(tmp, orbax_lib.PARAMS_ITEM), leaves,
                                    chunk_bytes)
      copy_side_files([src], tmp, os.path.join(src, "config.json"), dtype)
      orbax_lib.write_meta(tmp, None, cfg.family, crcs)
  return {"family": cfg.family, "parameters": len(leaves), "bytes": nbytes}


# --- Orbax -> HF ------------------------------------------------------------------------

def orbax_to_hf(src: str, dst: str, dtype: str | None = None, overwrite: bool = False,
                max_shard_bytes: int = export.MAX_SHARD_BYTES) -> dict:
  """Orbax folder (or training checkpoint: only `params` is read) -> HF folder."""
  from flax import nnx

  from lavida_jax.models.lavida import LaViDa

  if dtype is not None and dtype not in DTYPE_NAMES:
    raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {DTYPE_NAMES}")
  step = orbax_lib.find_step(src)
  orbax_lib.verify_side_files(step)
  config_path = orbax_lib.find_beside(step, orbax_lib.CONFIG_FILE)
  raw = orbax_lib.read_config(step)
  meta = orbax_lib.params_metadata(step)
  cfg = hf.config_from_hf(raw, where=step)
  if "lm/embed" in meta and meta["lm/embed"][0][0] != cfg.lm.vocab_size:
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(
        cfg.lm, embed_vocab_size=meta["lm/embed"][0][0]))
  abstract = nnx.state(nnx.eval_shape(lambda: LaViDa(cfg, rngs=nnx.Rngs(0))))
  expected = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(abstract)}
  orbax_lib.check_params(meta, expected, step)

  entries, where = [], {}
  for path, names, transform, stacked in hf.expand_rows(cfg):
    shape, stored = meta[path]
    out = np.dtype(dtype) if dtype is not None else stored
    hf_shape = hf.HF_SHAPE[transform](shape[1:] if stacked else shape)
    for i, name in enumerate(names):
      entries.append((name, hf_shape, out))
      where[name] = (path, i if stacked else (), transform, out)
  entries.sort(key=lambda e: export.natural_key(e[0]))
  reader = orbax_lib.ParamReader(step)

  def produce(name):
    path, index, transform, out = where[name]
    return hf.TO_HF[transform](reader.read(path, index)).astype(out, copy=False)

  nbytes = sum(int(np.prod(s)) * d.itemsize for _, s, d in entries)
  with staged_output(dst, overwrite, sources=(src,)) as tmp:
    _check_space(tmp, nbytes)
    index = export.write_safetensors(tmp, entries, produce, max_shard_bytes)
    copied = copy_side_files(orbax_lib.side_folders(step), tmp, config_path, dtype)
    export.record_side_files(tmp, copied)
  return {"family": cfg.family, "tensors": len(entries), "bytes": nbytes,
          "shards": len(set(index["weight_map"].values()))}


def lora_to_peft(src: str, dst: str, overwrite: bool = False) -> dict:
  """A LoRA training step (adapters + lora.json) -> PEFT folder (adapter_config.json +
  adapter_model.safetensors). The base is loaded (bfloat16) for its module layout."""
  from lavida_jax.checkpoint import adapters, peft  # pylint: disable=g-import-not-at-top
  if not (orbax_lib.is_orbax(src) and adapters.is_adapter_step(src)):
    raise CheckpointError(f"{src} is not a LoRA training step (no {adapters.LORA_FILE} beside "
                          "its adapters)")
  model = adapters.load_adapter_step(src, dtype="bfloat16", merge=False)
  base = adapters.read_record(orbax_lib.find_step(src))["base"]
  with staged_output(dst, overwrite, sources=(src,)) as tmp:
    peft.export_peft(model, tmp, base=base)
    nbytes = os.path.getsize(os.path.join(tmp, peft.WEIGHTS_FILE))
  return {"family": model.cfg.family, "bytes": nbytes}


# --- command line -----------------------------------------------------------------------

class _OneLineParser(argparse.ArgumentParser):
  """A usage error is one line and exit status 2 (as every lavida_jax command)."""

  def error(self, message):
    self.exit(cli.EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
  p = _OneLineParser(
      prog="python -m lavida_jax.convert",
      description="Convert LaViDa-L / LaViDa-D / LLaDA-V checkpoints between Hugging Face "
                  "safetensors and Orbax, streaming one tensor at a time.")
  sub = p.add_subparsers(dest="command", required=True,
                         metavar="{hf-to-orbax,orbax-to-hf,lora-to-peft}",
                         parser_class=_OneLineParser)
  a = sub.add_parser("hf-to-orbax", help="Hugging Face folder -> Orbax folder",
                     description="Hugging Face folder (config.json + safetensors) -> Orbax "
                                 "folder (params item + config.json + tokenizer files).")
  b = sub.add_parser("orbax-to-hf", help="Orbax folder -> Hugging Face folder",
                     description="Orbax folder or training checkpoint (only its params item "
                                 "is read) -> Hugging Face folder (safetensors shards, "
                                 "index, config.json, tokenizer files).")
  c = sub.add_parser("lora-to-peft", help="LoRA training step -> PEFT adapter folder",
                     description="A LoRA training step (adapters + lora.json naming the base) "
                                 "-> PEFT folder (adapter_config.json + "
                                 "adapter_model.safetensors on the PyTorch module names).")
  a.add_argument("--src", required=True,
                 help="source folder, or a hub id (org/name, through the HF cache)")
  b.add_argument("--src", required=True, help="source folder")
  c.add_argument("--src", required=True, help="a LoRA step folder, or its checkpoints root")
  for s in (a, b):
    s.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="cast every parameter (default: keep each tensor's dtype)")
  for s in (a, b, c):
    s.add_argument("--dst", required=True, help="destination folder (created)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty destination")
    s.add_argument("--traceback", action="store_true",
                   help="on an error, show the full traceback (default: one line)")
  b.add_argument("--max_shard_bytes", type=int, default=export.MAX_SHARD_BYTES,
                 help="largest safetensors shard in bytes (default 5e9)")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  cli.quiet_logging(None)
  start = time.time()
  try:
    if args.command == "hf-to-orbax":
      info = hf_to_orbax(hub.resolve(args.src), args.dst, args.dtype, args.overwrite)
    elif args.command == "orbax-to-hf":
      info = orbax_to_hf(args.src, args.dst, args.dtype, args.overwrite, args.max_shard_bytes)
    else:
      info = lora_to_peft(args.src, args.dst, args.overwrite)
  except Exception as e:  # pylint: disable=broad-except
    if args.traceback:
      raise
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return cli.EXIT_USAGE
  print(f"{args.command}: {info['family']}, {info['bytes'] / 1e9:.3f} GB -> {args.dst} "
        f"in {time.time() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
