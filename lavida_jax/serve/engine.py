"""Dynamic batching of generation requests onto compiled programs (issue 13).

One worker thread owns the device. Requests wait in a bounded queue; the worker
takes the oldest with every waiting request of the same sampler settings and
prompt bucket and, while other requests are still being read and prepared
(`arriving`), waits up to `batch_window_ms` for them; it runs them as one batch
padded to a power of two
(one compiled program per settings x bucket x batch size, the default settings'
warmed at start-up). Rows of a batch never influence each other (left padding,
per-row masks, per-row PRNG keys), so a request's answer does not depend on who
it shares the batch with.

Batching is per request, not per step: the sampler is one compiled program per
call (a scan or while loop on the device, no host round trip between steps), so a
row finished early cannot hand its slot to a waiting request mid-call. Step-level
refill would need the host to drive every block (a dispatch and a canvas transfer
per block, and per-row prompt caches of mixed buckets), which costs the
single-request latency this library is built for; with adaptive decoders a
batch's rows finish within a few steps of each other on short answers anyway.

Streaming requests run the same program with a host callback after every step
(`Generator(on_step=...)`, a second program): each streaming row's canvas goes to
its request's queue as it is committed.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

import numpy as np

from lavida_jax import generate
from lavida_jax.diffusion import sampler as sampler_lib

log = logging.getLogger(__name__)


class QueueFull(Exception):
  """The bounded queue holds `max_queue` requests: answer 429."""


class Timeout(Exception):
  """A request waited or ran past its deadline."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a compiled program depends on besides shapes: a batch shares these."""
  sampler: sampler_lib.SamplerConfig
  cache: str


@dataclasses.dataclass(eq=False)
class Job:
  """One request: its prompt, canvas [L] and settings; `future` gets (ids [L], NFE,
  seconds) or an exception; `on_step(canvas [L], step)` streams (None: no)."""
  settings: Settings
  prompt: tuple  # (ids, [(pixel_values, image_size)]) from generate.chat_ids
  length: int  # the prompt bucket
  canvas: np.ndarray
  deadline: float  # time.monotonic()
  on_step: Callable | None = None
  future: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)
  cancelled: bool = False  # the client went away: drop it if still queued


def batch_sizes(max_batch: int) -> list[int]:
  """Compiled batch sizes: powers of two up to max_batch (and max_batch itself)."""
  sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch]
  return sorted(set(sizes + [max_batch]))


class Engine:
  """The request queue, the batching worker and one Generator per settings."""

  def __init__(self, model, tokenizer, system_prompt, *, max_batch: int = 16,
               batch_window_ms: float = 5.0, max_queue: int = 256,
               on_batch: Callable | None = None):
    self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
    self.max_batch, self.window = max_batch, batch_window_ms / 1000
    self.sizes = batch_sizes(max_batch)
    self.views = model.cfg.image.max_views  # one compiled pixel shape
    self.on_batch = on_batch  # on_batch(size, padded_size, seconds): metrics
    self._queue: collections.deque[Job] = collections.deque()
    self._max_queue = max_queue
    self._cv = threading.Condition()
    self._generators: dict[tuple[Settings, bool], generate.Generator] = {}
    self._rows: list[Job | None] = []  # the running streaming batch's rows
    self._stop = False
    self._open = True  # False while `paused`
    self._arriving = 0  # requests received but not yet submitted
    self._thread = threading.Thread(target=self._work, name="lavida-engine", daemon=True)
    self._thread.start()

  # --- programs ---------------------------------------------------------------

  def generator(self, settings: Settings, streaming: bool = False) -> generate.Generator:
    key = (settings, streaming)
    if key not in self._generators:
      if len(self._generators) >= 16:  # settings users tried once: drop the oldest
        self._generators.pop(next(iter(self._generators)))
      self._generators[key] = generate.Generator(
          self.model, self.tokenizer, settings.sampler, settings.cache,
          system_prompt=self.system_prompt, on_step=self._on_step if streaming else None)
    return self._generators[key]

  def warmup(self, settings: Settings, buckets, streaming_batch: int = 1) -> float:
    """Compiles (by running) every batch size for each prompt bucket, and the
    streaming program at `streaming_batch`; returns seconds."""
    t0 = time.perf_counter()
    ids, _ = generate.chat_ids(self.model, self.tokenizer, [{"role": "user", "content": "hi"}],
                               [], self.system_prompt)
    canvas = np.full((settings.sampler.gen_length,), settings.sampler.mask_id, np.int32)
    for length in buckets:
      for streaming, sizes in ((False, self.sizes), (True, [streaming_batch])):
        for b in sizes:
          self._run(settings, [(ids, [])] * b, np.stack([canvas] * b), length, streaming)
    return time.perf_counter() - t0

  # --- requests ---------------------------------------------------------------

  @contextlib.contextmanager
  def arriving(self):
    """Around a request's host work before `submit`: the worker waits for it (up to
    the batch window) instead of starting a batch without it. A lone request is
    not kept waiting."""
    with self._cv:
      self._arriving += 1
    try:
      yield
    finally:
      with self._cv:
        self._arriving -= 1
        self._cv.notify()

  def submit(self, job: Job) -> concurrent.futures.Future:
    with self._cv:
      if len(self._queue) >= self._max_queue:
        raise QueueFull(f"the server's queue is full ({self._max_queue} requests waiting); "
                        "retry later")
      self._queue.append(job)
      self._cv.notify()
    return job.future

  @contextlib.contextmanager
  def paused(self):
    """No new batch starts inside this (requests wait in the queue): maintenance."""
    with self._cv:
      self._open = False
    try:
      yield
    finally:
      with self._cv:
        self._open = True
        self._cv.notify()

  def queue_depth(self) -> int:
    return len(self._queue)

  def close(self) -> None:
    with self._cv:
      self._stop = True
      self._cv.notify()
    self._thread.join(timeout=60)

  # --- the worker ---------------------------------------------------------------

  def _take(self) -> list[Job] | None:
    """The oldest job and, within the batch window, those that can share its batch."""
    with self._cv:
      while not (self._queue and self._open) and not self._stop:
        self._cv.wait()
      if self._stop:
        return None
      first = self._queue.popleft()
      batch, until = [first], time.monotonic() + self.window
      while len(batch) < self.max_batch:
        for job in list(self._queue):
          if len(batch) == self.max_batch:
            break
          if job.settings == first.settings and job.length == first.length:
            self._queue.remove(job)
            batch.append(job)
        left = until - time.monotonic()
        if len(batch) == self.max_batch or left <= 0 or not self._arriving:
          break
        self._cv.wait(left)
      return batch

  def _work(self) -> None:
    while True:
      batch = self._take()
      if batch is None:
        return
      now = time.monotonic()
      live = []
      for job in batch:
        if job.cancelled:
          job.future.cancel()
        if not job.future.set_running_or_notify_cancel():
          continue  # its client went away or timed out while it waited
        if now > job.deadline:
          job.future.set_exception(Timeout("the request timed out waiting in the queue"))
        else:
          live.append(job)
      if not live:
        continue
      try:
        self._run_jobs(live)
      except Exception as e:  # pylint: disable=broad-except
        log.exception("batch of %d failed", len(live))  # the server goes on
        for job in live:
          if not job.future.done():
            job.future.set_exception(e)

  def _run_jobs(self, jobs: list[Job]) -> None:
    size = next(s for s in self.sizes if s >= len(jobs))
    pad = size - len(jobs)  # copies of the first row: rows are independent
    prompts = [j.prompt for j in jobs] + [jobs[0].prompt] * pad
    canvas = np.stack([j.canvas for j in jobs] + [jobs[0].canvas] * pad)
    streaming = any(j.on_step for j in jobs)
    self._rows = jobs if streaming else []
    t0 = time.perf_counter()
    ids, nfe = self._run(jobs[0].settings, prompts, canvas, jobs[0].length, streaming)
    seconds = time.perf_counter() - t0
    self._rows = []
    if self.on_batch:
      self.on_batch(len(jobs), size, seconds)
    for b, job in enumerate(jobs):
      job.future.set_result((ids[b], int(nfe[b]), seconds))

  def _run(self, settings, prompts, canvas, length, streaming):
    gen = self.generator(settings, streaming)
    return gen.run(prompts, canvas, length=length, views=self.views)

  def _on_step(self, canvas, steps) -> None:
    """The sampler's host callback (streaming programs only): rows to their jobs."""
    for b, job in enumerate(self._rows):
      if job is not None and job.on_step is not None and not job.cancelled:
        job.on_step(np.asarray(canvas[b]), int(steps[b]))

