"""Writing an Orbax params item block by block (`convert hf-to-orbax`).

A parameter is a `Streamed` leaf that produces its data block by block (one layer of
a stacked parameter at a time) only when Orbax serialises it, so converting an 8B
model holds one tensor in host memory, never the model. Each block also feeds the
parameter's CRC-32 (`checkpoint/checksum.py`), recorded by `orbax.write_meta`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from lavida_jax.checkpoint import checksum
from lavida_jax.checkpoint.errors import CheckpointError

# Zarr chunks of at most this many bytes (split along the largest axes), so a
# device restoring an FSDP/tensor shard reads little beyond its own shard.
CHUNK_BYTES = 8 << 20
# Bytes being written at once (tensorstore copies each slab while writing it).
INFLIGHT_BYTES = 256 << 20
SLAB_BYTES = 64 << 20


@dataclasses.dataclass
class Streamed:
  """An array leaf whose data is produced only while it is written.

  blocks() yields (index, array) pairs that tile the array; with stacked=True each
  block is one slice along axis 0 (index = layer number), else one block with
  index ().
  """
  shape: tuple[int, ...]
  dtype: np.dtype
  blocks: Callable[[], Iterator[tuple[int | tuple, np.ndarray]]]
  stacked: bool = False

  def __post_init__(self):
    self.shape, self.dtype = tuple(self.shape), np.dtype(self.dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))


async def write_block(store, index, block):
  """One block (owned by the write) into an open tensorstore array (a test seam)."""
  await store[index].write(block, can_reference_source_data_indefinitely=True)


class _StreamedHandler(ocp.type_handlers.NumpyHandler):
  """Writes Streamed leaves block by block, recorded as plain numpy arrays.

  The chunk shape divides one layer, so each block covers whole chunks (no
  read-modify-write). Writes overlap up to `inflight_bytes` of blocks; beyond
  that the oldest is awaited (and released) before the next block is produced.
  """

  def __init__(self, inflight_bytes: int):
    super().__init__()
    self._inflight_bytes = inflight_bytes

  def typestr(self) -> str:
    return "np.ndarray"  # restored by Orbax's own numpy / jax.Array handlers

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    pending: list[tuple[asyncio.Task, int]] = []

    async def open_store(value, info, arg):
      await info.await_path_creation()
      use_ocdbt = bool(info.is_ocdbt_checkpoint)
      local = (1, *value.shape[1:]) if value.stacked else value.shape
      spec = ocp.type_handlers.get_json_tspec_write(
          info, use_ocdbt=use_ocdbt, global_shape=value.shape, local_shape=local,
          dtype=value.dtype, process_index=jax.process_index() if use_ocdbt else None,
          arg=arg)
      return await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)

    # Opening writes only metadata: all at once (each open is a commit).
    stores = await asyncio.gather(*map(open_store, values, infos, args))
    try:
      for value, info, store in zip(values, infos, stores):
        want = value.shape[1:] if value.stacked else value.shape
        for index, block in value.blocks():
          block = np.asarray(block)
          if block.shape != want or block.dtype != value.dtype:
            raise CheckpointError(f"parameter {info.name}: block {index} is {block.shape} "
                                  f"{block.dtype}, expected {want} {value.dtype}")
          for where, slab in _slabs(block, index, store, value.stacked):
            pending.append((asyncio.ensure_future(write_block(store, where, slab)),
                            slab.nbytes))
            while sum(n for _, n in pending) > self._inflight_bytes:
              await pending.pop(0)[0]
          del block
      while pending:
        await pending.pop(0)[0]
    finally:
      for task, _ in pending:
        task.cancel()
    return []


def _slabs(block: np.ndarray, index, store, stacked: bool):
  """Splits a block along its first axis into slabs of whole chunks, ~SLAB_BYTES each.

  Slabs are copies: a write in flight never keeps the whole source tensor alive, and
  a 1 GB tensor never needs a second 1 GB buffer.
  """
  lead = (index,) if stacked else ()
  if block.ndim == 0:
    yield lead or (), block.copy()
    return
  chunk_rows = store.chunk_layout.write_chunk.shape[len(lead)]
  row_bytes = max(1, block.nbytes // max(1, block.shape[0]))
  rows = max(chunk_rows, (SLAB_BYTES // row_bytes) // chunk_rows * chunk_rows)
  for r in range(0, block.shape[0], rows):
    yield (*lead, slice(r, min(r + rows, block.shape[0]))), block[r:r + rows].copy()


def _summed(leaf: Streamed, crc: checksum.Running) -> Streamed:
  """`leaf` whose blocks also feed `crc` (in order: layer 0, 1, ... is C order)."""
  def blocks():
    for n, (index, block) in enumerate(leaf.blocks()):
      if leaf.stacked and index != n:
        raise CheckpointError(f"stacked parameter block {index} came as block {n}")
      crc.update(block)
      yield index, block
  return dataclasses.replace(leaf, blocks=blocks)


def write_params(directory: str, leaves: dict[str, Streamed], chunk_bytes: int = CHUNK_BYTES,
                 inflight_bytes: int = INFLIGHT_BYTES) -> dict[str, str]:
  """Saves {'a/b/c': Streamed} as the Orbax PyTree item `directory` (must not exist).

  Returns {'a/b/c': crc32} of every parameter's bytes as written.
  """
  crcs = {path: checksum.Running() for path in leaves}
  tree = unflatten({path: _summed(leaf, crcs[path]) for path, leaf in leaves.items()})
  registry = ocp.type_handlers.create_type_handler_registry(
      (Streamed, _StreamedHandler(inflight_bytes)),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (jax.Array, ocp.type_handlers.ArrayHandler()))
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), tree)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree, save_args=save_args))
  return {path: crc.hexdigest() for path, crc in crcs.items()}


def unflatten(flat: dict[str, object]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, path + "/"))
    else:
      out[path] = v
  return out
