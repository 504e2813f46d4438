"""Reading safetensors checkpoints tensor by tensor (single file or sharded).

The format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then raw bytes. Tensors are read one at
a time with plain positional reads (not a memory map, whose touched pages
would count as resident), so only the tensor in hand is ever in host memory;
bf16 arrives as `ml_dtypes.bfloat16` without a float32 detour. The header is
checked whole on open (hostile lengths, offsets outside the file, dtype/shape
mismatches are refused by name); a tensor whose checksum the header's
`__metadata__` records (our exports, `checkpoint/checksum.py`) is verified as read.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from lavida_jax.checkpoint import checksum
from lavida_jax.checkpoint.errors import CheckpointError  # noqa: F401 (re-exported)

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX_NAME = "model.safetensors.index.json"


MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def _shown(name) -> str:
  """A tensor name as one printable line (a hostile header may hold anything)."""
  return name if isinstance(name, str) and name.isprintable() else repr(name)[:80]


def _bad(path: str, why: str) -> CheckpointError:
  return CheckpointError(f"{path} is not a valid safetensors file: {why}")


def parse_header(raw: bytes, path: str) -> tuple[dict, dict[str, str]]:
  """The header's JSON -> ({name: entry}, {name: crc32 from __metadata__}).

  Every entry is checked here, before any data is read: a known dtype, a shape of
  non-negative ints, offsets [begin, end] that hold exactly shape x itemsize bytes.
  """
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise _bad(path, f"corrupt JSON header ({type(e).__name__}: {str(e)[:80]})") from None
  if not isinstance(header, dict):
    raise _bad(path, f"the header is a JSON {type(header).__name__}, expected an object")
  meta = header.pop("__metadata__", None) or {}
  if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
    raise _bad(path, "__metadata__ is not a map of strings")
  for raw_name, info in header.items():
    name = _shown(raw_name)
    if not isinstance(info, dict):
      raise _bad(path, f"tensor {name}: entry is not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:
      raise _bad(path, f"tensor {name} has unsupported dtype {repr(code)[:80]}")
    if (not isinstance(shape, list) or len(shape) > 16
        or not all(type(d) is int and 0 <= d < 2**48 for d in shape)):
      raise _bad(path, f"tensor {name} has shape {repr(shape)[:80]}, expected a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
      raise _bad(path, f"tensor {name} has data_offsets {repr(offsets)[:80]}, expected [begin, end]")
    nbytes = int(np.prod(shape, dtype=object)) * np.dtype(DTYPES[code]).itemsize
    if offsets[1] - offsets[0] != nbytes:
      raise _bad(path, f"tensor {name} spans {offsets[1] - offsets[0]} bytes, its shape "
                       f"{repr(shape)[:80]} of {code} needs {nbytes}")
  crcs = {k[len(checksum.PREFIX):]: v for k, v in meta.items()
          if k.startswith(checksum.PREFIX)}
  return header, crcs


class SafetensorsFile:
  """One safetensors file: header checked on open; tensors read (and their checksums,
  when the header's __metadata__ holds them, verified) one at a time."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._file = open(path, "rb")
    except OSError as e:
      raise CheckpointError(f"cannot open checkpoint shard {path}: {e.strerror}") from e
    try:
      self._read_header()
    except BaseException:
      self._file.close()
      raise

  def _read_header(self):
    path = self.path
    size = os.fstat(self._file.fileno()).st_size
    head = self._file.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise CheckpointError(f"{path} is truncated or not a safetensors file "
                            f"(header of {n} bytes in a {size}-byte file)")
    if n > MAX_HEADER_BYTES:
      raise _bad(path, f"header of {n} bytes (at most {MAX_HEADER_BYTES})")
    header, self.checksums = parse_header(self._file.read(n), path)
    self._start = 8 + n
    for name, info in header.items():
      end = self._start + info["data_offsets"][1]
      if end > size:
        raise CheckpointError(f"{path} is truncated: tensor {_shown(name)} ends at byte {end}, the "
                              f"file has {size}")
    self.header = header

  def keys(self):
    return self.header.keys()

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def dtype(self, key: str) -> np.dtype:
    return np.dtype(DTYPES[self.header[key]["dtype"]])

  def get(self, key: str) -> np.ndarray:
    info = self.header[key]
    begin, end = info["data_offsets"]
    out = np.empty(info["shape"], self.dtype(key))
    buf, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    while done < out.nbytes:
      n = os.preadv(self._file.fileno(), [buf[done:done + (1 << 30)]],
                    self._start + begin + done)
      if n <= 0:
        raise CheckpointError(f"{self.path} is truncated: tensor {_shown(key)} ends past the file")
      done += n
    if key in self.checksums:
      checksum.check(f"tensor {_shown(key)}", self.path, self.checksums[key], checksum.of_array(out))
    return out

  def close(self):
    self._file.close()


def verify_side_files(folder: str, index: str) -> None:
  """The side files whose CRC-32 our exports record in the index's metadata
  (config.json, tokenizer) must match; an index without them (released checkpoints)
  passes."""
  with open(index) as f:
    meta = json.load(f).get("metadata") or {}
  crcs = meta.get(checksum.ALGORITHM, {}) if isinstance(meta, dict) else {}
  if not isinstance(crcs, dict):
    raise CheckpointError(f"{index} is corrupt: metadata.{checksum.ALGORITHM} is not a map")
  for name, crc in crcs.items():
    path = os.path.join(folder, os.path.basename(str(name)))
    if not os.path.isfile(path):
      raise CheckpointError(f"checkpoint {folder} is missing {name} (recorded in {index})")
    checksum.check(f"file {name}", folder, crc, checksum.of_file(path))


class Checkpoint:
  """All tensors of a Hugging Face checkpoint folder: name -> shard, read lazily."""

  def __init__(self, folder: str):
    self.folder = folder
    index = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f).get("weight_map")
      except (ValueError, AttributeError) as e:  # corrupt JSON, or not an object
        raise CheckpointError(f"{index} is not a valid index: {str(e)[:80]}") from None
      if (not isinstance(weight_map, dict)
          or not all(isinstance(v, str) and os.path.basename(v) == v
                     for v in weight_map.values())):
        raise CheckpointError(f"{index} has no 'weight_map' of tensor -> file name")
      verify_side_files(folder, index)
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
      if not files:
        raise CheckpointError(f"{folder} holds no *.safetensors file and no {INDEX_NAME}")
    self._files = {f: SafetensorsFile(os.path.join(folder, f)) for f in files}
    self._where: dict[str, SafetensorsFile] = {}
    for f in files:
      for k in self._files[f].keys():
        if k in self._where:
          raise CheckpointError(f"tensor {k} appears in both {self._where[k].path} and {f}")
        self._where[k] = self._files[f]
    if os.path.exists(index):
      for k, f in weight_map.items():
        if self._where.get(k) is not self._files[f]:
          raise CheckpointError(f"{INDEX_NAME} places {k} in {f}, which does not hold it")

  def keys(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return self._where[key].shape(key)

  def get(self, key: str) -> np.ndarray:
    return self._where[key].get(key)

  def dtype(self, key: str) -> np.dtype:
    return self._where[key].dtype(key)

  def close(self):
    for f in self._files.values():
      f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
