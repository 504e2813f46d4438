"""Writing Hugging Face safetensors checkpoints, one tensor at a time.

A shard is an 8-byte little-endian header length, a JSON header {name: {dtype,
shape, data_offsets}} padded with spaces to 8 bytes, then the raw bytes. All
names, shapes and dtypes are known before any data is produced, so each shard's
header is written first and tensors are appended as they arrive: only the
tensor in hand is in host memory. bf16 is written from `ml_dtypes.bfloat16`
bytes as they are (bit-exact). Each tensor's CRC-32 goes into the header's
`__metadata__` (`crc32:<name>`): the header is written with placeholders of the
same width first and rewritten in place when the shard's data is complete.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Callable, Sequence

import numpy as np

from lavida_jax.checkpoint import checksum
from lavida_jax.checkpoint.shards import DTYPES, INDEX_NAME, CheckpointError

CODES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_SHARD_BYTES = 5 * 10**9  # 5 GB, as Hugging Face's save_pretrained


def dtype_code(dtype) -> str:
  try:
    return CODES[np.dtype(dtype)]
  except KeyError:
    raise CheckpointError(f"dtype {np.dtype(dtype)} has no safetensors code") from None


def natural_key(name: str):
  """'layers.10.x' after 'layers.9.x': numbers compare as numbers."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plan_shards(entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[tuple]]:
  """Greedy, in order: a shard closes before it would pass max_shard_bytes.

  A tensor larger than the limit gets a shard of its own (as transformers does).
  """
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  shards, current, size = [], [], 0
  for name, shape, dtype in entries:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, tuple(shape), np.dtype(dtype)))
    size += nbytes
  if current:
    shards.append(current)
  return shards


def _header(entries, crcs: dict[str, str] | None = None) -> bytes:
  """The shard's header; `crcs` None writes fixed-width placeholders for the
  checksums, so the header can be rewritten in place, same length, once they are known."""
  meta = {"format": "pt"}
  for name, _, _ in entries:
    meta[checksum.PREFIX + name] = crcs[name] if crcs is not None else "0" * checksum.WIDTH
  header, offset = {"__metadata__": meta}, 0
  for name, shape, dtype in entries:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    header[name] = {"dtype": dtype_code(dtype), "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw


SLAB_BYTES = 64 << 20


def write_tensor(f, array: np.ndarray) -> str:
  """Appends one tensor's bytes in C order (a seam for tests: disk full); returns the
  checksum of exactly the bytes written.

  A non-contiguous view (a transposed kernel) is copied ~SLAB_BYTES rows at a time,
  never whole.
  """
  crc = checksum.Running()
  if array.ndim == 0 or array.flags.c_contiguous:
    slabs = [np.ascontiguousarray(array)]
  else:
    rows = max(1, SLAB_BYTES // max(1, array.nbytes // array.shape[0]))
    slabs = (np.ascontiguousarray(array[r:r + rows]) for r in range(0, array.shape[0], rows))
  for slab in slabs:
    crc.update(slab)
    f.write(slab.reshape(-1).view(np.uint8).data)
  return crc.hexdigest()


def write_safetensors(folder: str, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray],
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
  """Writes model-0000k-of-0000n.safetensors shards and model.safetensors.index.json.

  entries: (name, shape, dtype) of every tensor, in file order. produce(name) returns
  that tensor (checked against its entry); it is written and dropped before the next.
  Returns the index.
  """
  # Within a shard, wider dtypes first (as the safetensors library), so every
  # tensor starts at an offset aligned to its item size.
  shards = [sorted(s, key=lambda e: -e[2].itemsize)
            for s in plan_shards(entries, max_shard_bytes)]
  weight_map, total = {}, 0
  for k, shard in enumerate(shards):
    fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    with open(os.path.join(folder, fname), "wb") as f:
      head, crcs = _header(shard), {}
      f.write(head)
      for name, shape, dtype in shard:
        array = np.asarray(produce(name))
        if array.shape != shape or array.dtype != dtype:
          raise CheckpointError(f"tensor {name} came as {array.shape} {array.dtype}, "
                                f"expected {shape} {dtype}")
        crcs[name] = write_tensor(f, array)
        total += array.nbytes
        weight_map[name] = fname
        del array
      final = _header(shard, crcs)
      assert len(final) == len(head)  # fixed-width checksums: same offsets
      f.seek(0)
      f.write(final)
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  with open(os.path.join(folder, INDEX_NAME), "w") as f:
    json.dump(index, f, indent=2)
  return index


def record_side_files(folder: str, names) -> None:
  """Adds the CRC-32 of side files (config.json, tokenizer files) to the index's
  `metadata` ({"crc32": {name: crc}}), which `shards.Checkpoint` verifies on open."""
  path = os.path.join(folder, INDEX_NAME)
  with open(path) as f:
    index = json.load(f)
  index["metadata"][checksum.ALGORITHM] = checksum.of_files(folder, names)
  with open(path, "w") as f:
    json.dump(index, f, indent=2)
