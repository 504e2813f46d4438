"""Reading safetensors checkpoints tensor by tensor (single file or sharded).

The format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then raw bytes. Tensors are read one at
a time with plain positional reads (not a memory map, whose touched pages
would count as resident), so only the tensor in hand is ever in host memory;
bf16 arrives as `ml_dtypes.bfloat16` without a float32 detour.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as asked; the message names the culprit."""


class SafetensorsFile:
  def __init__(self, path: str):
    self.path = path
    try:
      self._file = open(path, "rb")
    except OSError as e:
      raise CheckpointError(f"cannot open checkpoint shard {path}: {e}") from e
    size = os.fstat(self._file.fileno()).st_size
    head = self._file.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise CheckpointError(f"{path} is truncated or not a safetensors file "
                            f"(header of {n} bytes in a {size}-byte file)")
    try:
      header = json.loads(self._file.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    self._start = 8 + n
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if self._start + end > size:
      raise CheckpointError(f"{path} is truncated: its header needs {self._start + end} "
                            f"bytes, the file has {size}")
    self.header = header

  def keys(self):
    return self.header.keys()

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def dtype(self, key: str) -> np.dtype:
    code = self.header[key]["dtype"]
    if code not in DTYPES:
      raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {code}")
    return np.dtype(DTYPES[code])

  def get(self, key: str) -> np.ndarray:
    info = self.header[key]
    begin, end = info["data_offsets"]
    out = np.empty(info["shape"], self.dtype(key))
    if end - begin != out.nbytes:
      raise CheckpointError(f"{self.path}: tensor {key} has {end - begin} bytes, "
                            f"expected shape {info['shape']} of {info['dtype']}")
    buf, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    while done < out.nbytes:
      n = os.preadv(self._file.fileno(), [buf[done:done + (1 << 30)]],
                    self._start + begin + done)
      if n <= 0:
        raise CheckpointError(f"{self.path} is truncated: tensor {key} ends past the file")
      done += n
    return out

  def close(self):
    self._file.close()


class Checkpoint:
  """All tensors of a Hugging Face checkpoint folder: name -> shard, read lazily."""

  def __init__(self, folder: str):
    self.folder = folder
    index = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no 'weight_map'")
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
