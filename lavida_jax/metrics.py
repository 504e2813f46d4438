"""Metrics to JSONL and TensorBoard event files, and a progress line (main process only)."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from etils import epath


class MetricWriter:
  """Appends {"step", **scalars} lines to WORKDIR/metrics.jsonl and TensorBoard events."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._tb = self._jsonl = self._remote = None
    if not self.enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    if "://" in workdir:  # a bucket (gs:// needs gcsfs): no appends there, so the
      # file is rewritten whole at each write; TensorBoard events stay local-only.
      self._remote = epath.Path(path)
      self._lines = self._remote.read_text().splitlines(True) if self._remote.exists() else []
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(path, "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # optional: JSONL is always written
      self._tb = None

  def write(self, step: int, scalars: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in scalars.items()}
    line = json.dumps({"step": int(step), **values}) + "\n"
    if self._remote is not None:
      self._lines.append(line)
      self._remote.write_text("".join(self._lines))
      return
    self._jsonl.write(line)
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


class Progress:
  """A one-line progress bar: step, loss, tokens/s and ETA."""

  def __init__(self, total: int, start: int = 0):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self._bar = tqdm(total=total, initial=start, disable=jax.process_index() != 0,
                     dynamic_ncols=True, desc="train")
    self._last = time.perf_counter()

  def update(self, steps: int, loss: float, tokens: int) -> float:
    now = time.perf_counter()
    tok_s = tokens / max(now - self._last, 1e-9)
    self._last = now
    self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
    self._bar.update(steps)
    return tok_s

  def close(self) -> None:
    self._bar.close()
