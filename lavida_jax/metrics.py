"""Metrics to JSONL and TensorBoard event files, and a progress line (main process only)."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


class MetricWriter:
  """Appends {"step", **scalars} lines to WORKDIR/metrics.jsonl and TensorBoard events."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # optional: JSONL is always written
      self._tb = None

  def write(self, step: int, scalars: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
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
