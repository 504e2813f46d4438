"""A CheckpointManager item of plain files, so each training step folder is complete.

`WORKDIR/checkpoints/<step>/files/` holds what generation needs besides the weights
(config.json, the tokenizer file, generation.json with the system prompt) and
lavida_jax.json with the checksums of every array in the step: a step folder copied
anywhere loads and answers the same (`checkpoint/orbax.py` looks here first). Written
by the primary process inside Orbax's atomic save, so a step never has half of them.
"""
from __future__ import annotations

import asyncio
import dataclasses

from etils import epath
from orbax.checkpoint import checkpoint_args
from orbax.checkpoint._src.futures import future  # pylint: disable=protected-access
from orbax.checkpoint._src.handlers import async_checkpoint_handler  # pylint: disable=protected-access
from orbax.checkpoint._src.multihost import multihost  # pylint: disable=protected-access


class FilesHandler(async_checkpoint_handler.AsyncCheckpointHandler):
  """Saves {file name: bytes} as files of the item folder; restores the same map."""

  async def _write(self, files: dict[str, bytes], directory: epath.Path):
    if multihost.is_primary_host(0):
      for name, data in files.items():
        (directory / name).write_bytes(data)

  async def async_save(self, directory: epath.Path, args: "FilesSave"):
    return [future.CommitFutureAwaitingContractedSignals(
        self._write(dict(args.files), directory), name="files_item_save")]

  def save(self, directory: epath.Path, args: "FilesSave"):
    asyncio.run(self._write(dict(args.files), directory))

  def restore(self, directory: epath.Path, args: "FilesRestore | None" = None):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@checkpoint_args.register_with_handler(FilesHandler, for_save=True)
@dataclasses.dataclass
class FilesSave(checkpoint_args.CheckpointArgs):
  files: dict[str, bytes]


@checkpoint_args.register_with_handler(FilesHandler, for_restore=True)
@dataclasses.dataclass
class FilesRestore(checkpoint_args.CheckpointArgs):
  pass
