"""grain input pipeline: LLaVA records -> fixed-shape training batches (SPEC §10).

  source (tfds ArrayRecord or JSON) -> shuffle(seed) -> repeat -> preprocess
  -> this process's rows of every global batch, broken records replaced (counted)
  -> read threads (or worker processes) -> batch

Preprocess, per record at global position i with rng `default_rng([seed, i])`: the
chat template and LaViDa labels (`text.build_training_example`, one QA pair drawn),
the image's anyres views padded to `max_views`, and `packing.pack_example` to a fixed
`length`. Every batch is

  input_ids    [B, T] int32    -200 at each image-token position, EOS padding
  labels       [B, T] int32    IGNORE_ID except the answer, its end of turn, the padding
  image_index  [B, T, 4] int32 rows of the example's feature table per image token
  image_weight [B, T, 4] float32
  pixel_values [B, V, S, S, 3] float32 in [-1, 1] (S = cfg.vision.image_size)
  view_mask    [B, V] bool     which views are real

Broken records (no image bytes: the file is missing or empty; an undecodable
image; an empty or malformed conversation; longer than `length` after the image is
expanded; more views than `max_views`) are skipped and counted in the iterator's
`skipped` (and its state); the row is filled by a record from the same slot of a
later epoch (`_Rows`), so a skip never shifts the rows after it.

Deterministic and resumable: the output depends only on the source, the seed and
the arguments (not on thread or worker counts), and the iterator's
`get_state()`/`set_state()` (grain's `DatasetIterator`, JSON-serialisable) reproduce
the exact next batches. Multi-host: with P processes and global batch G, process p
gets positions [kG + pL, kG + (p+1)L) of global batch k (L = G/P), so
`global_batch` reassembles exactly the single-process batch, skipped records or not:
1, 2 and 4 processes train on the same global batches.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import grain
import numpy as np
import sentencepiece as spm
import tokenizers

from lavida_jax import image as image_lib
from lavida_jax import text
from lavida_jax.data import packing
from lavida_jax.models.lavida import LaViDaConfig, image_layout

SKIP_REASONS = ("missing_image", "bad_image", "bad_conversation", "too_long",
                "too_many_views")
KEYS = ("input_ids", "labels", "image_index", "image_weight", "pixel_values", "view_mask")


def template_for(family: str) -> str:
  """Chat template of a model family: ChatML for lavida-dream, else LLaDA's."""
  return "dream" if family == "lavida-dream" else "llada"


def batch_shapes(cfg: LaViDaConfig, length: int, batch_size: int,
                 max_views: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """key -> (shape, dtype) of a batch (e.g. for ahead-of-time compilation)."""
  v, s = max_views or cfg.image.max_views, cfg.vision.image_size
  return {"input_ids": ((batch_size, length), np.dtype(np.int32)),
          "labels": ((batch_size, length), np.dtype(np.int32)),
          "image_index": ((batch_size, length, 4), np.dtype(np.int32)),
          "image_weight": ((batch_size, length, 4), np.dtype(np.float32)),
          "pixel_values": ((batch_size, v, s, s, 3), np.dtype(np.float32)),
          "view_mask": ((batch_size, v), np.dtype(bool))}


def _str(x) -> str:
  return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def _skip(reason: str) -> dict:
  return {"skip": np.int32(SKIP_REASONS.index(reason))}


class Preprocessor:
  """`(index, record) -> example dict` (KEYS, unbatched) or a skip marker `{"skip": code}`.

  Records are `tfds_builder` records (id, image bytes, image_path, conversations as
  JSON), with strings as `str` or `bytes`. Picklable (for grain worker processes).
  """

  def __init__(self, cfg: LaViDaConfig, tokenizer: text.Tokenizer, specials: text.SpecialTokens,
               length: int, *, seed: int = 0, max_views: int | None = None,
               template: str | None = None, system_prompt: str | None = text.SYSTEM_PROMPT,
               fim: tuple[str, str] | None = None):
    if cfg.image.size != cfg.vision.image_size:
      raise ValueError(f"cfg.image.size {cfg.image.size} differs from the vision tower's "
                       f"image_size {cfg.vision.image_size}; views must be the tower's size")
    self.cfg, self.tokenizer, self.specials, self.length = cfg, tokenizer, specials, length
    self.seed = seed
    self.max_views = max_views or cfg.image.max_views
    self.template = template or template_for(cfg.family)
    self.system_prompt, self.fim = system_prompt, fim
    if self.template not in text.TEMPLATES:
      raise ValueError(f"unknown template {self.template!r}; expected one of "
                       f"{sorted(text.TEMPLATES)}")

  # Tokenizers are rebuilt from their serialised form in worker processes.
  def __getstate__(self):
    state = dict(self.__dict__)
    tok = self.tokenizer
    if tok._sp is not None:  # pylint: disable=protected-access
      state["tokenizer"] = ("sp", tok._sp.serialized_model_proto(), tok.name)
    else:
      state["tokenizer"] = ("hf", tok._hf.to_str(), tok.name)  # pylint: disable=protected-access
    return state

  def __setstate__(self, state):
    kind, blob, name = state["tokenizer"]
    backend = (spm.SentencePieceProcessor(model_proto=blob) if kind == "sp"
               else tokenizers.Tokenizer.from_str(blob))
    state["tokenizer"] = text.Tokenizer(backend, name=name)
    self.__dict__.update(state)

  def __call__(self, index: int, record: Mapping) -> dict:
    rng = np.random.default_rng([self.seed, index])
    try:
      conversations = json.loads(_str(record["conversations"]))
      image_path = _str(record.get("image_path", ""))
      data = bytes(record.get("image") or b"")
      rid = _str(record.get("id", index))
    except (KeyError, ValueError, TypeError):
      return _skip("bad_conversation")
    has_image = bool(image_path or data)
    if has_image and not data:
      return _skip("missing_image")
    try:
      ids, labels = text.build_training_example(
          {"id": rid, "conversations": conversations}, self.tokenizer, self.template, rng,
          self.specials, has_image=has_image, system_prompt=self.system_prompt, fim=self.fim)
    except (ValueError, TypeError, KeyError):
      return _skip("bad_conversation")

    size, v, s = None, self.max_views, self.cfg.vision.image_size
    pixels, view_mask = np.zeros((v, s, s, 3), np.float32), np.zeros(v, bool)
    if has_image:
      try:
        pil = image_lib.load_image(data, max_pixels=self.cfg.image.max_pixels)
      except image_lib.ImageError:
        return _skip("bad_image")
      size = pil.size
      if len(ids) - 1 + image_layout(self.cfg, size).num_tokens > self.length:
        return _skip("too_long")
      views, size = image_lib.process_anyres(pil, self.cfg.image)
      if len(views) > v:
        return _skip("too_many_views")
      pixels, view_mask = image_lib.pad_views(views, v)
    elif len(ids) > self.length:
      return _skip("too_long")
    try:
      packed = packing.pack_example(ids, labels, size, self.cfg, self.length,
                                    self.specials.pad_id, v)
    except ValueError:  # e.g. two <image> markers in one question
      return _skip("bad_conversation")
    packed.update(pixel_values=pixels, view_mask=view_mask)
    return packed


# Tries per row before a row is given up (and skipped, shifting the rows after it): with
# even half the records broken, 2^-64.
MAX_REPLACEMENTS = 64


class _Rows(grain.MapDataset):
  """Process p's rows of each global batch, each a good example, the same for any
  process count.

  Row j of global batch k is stream position q = kG + j (this process: rows
  [pL, (p+1)L)). A broken record there is replaced by the first good one at
  q + N, q + 2N, ... (N = records per epoch): the same slot in later epochs, another
  record of the reshuffled source. Which record fills a row is thus fixed before any
  filtering and depends only on (seed, k, j), so 1, 2 or 4 processes assemble the same
  global batches even when records are skipped. Every element carries `skips`
  [len(SKIP_REASONS)], the broken records met filling it; a row that cannot be filled
  (a finite stream's end, or MAX_REPLACEMENTS broken tries) is only `skips` and is
  dropped by the batcher.
  """

  def __init__(self, parent: grain.MapDataset, index: int, count: int, local_batch: int,
               period: int):
    super().__init__(parent)
    self._p, self._local, self._global = index, local_batch, count * local_batch
    self._period = period
    self._length = (len(parent) if count == 1
                    else (len(parent) // self._global) * local_batch)

  def __len__(self) -> int:
    return self._length

  def _position(self, index: int) -> int:
    k, j = divmod(index, self._local)
    return k * self._global + self._p * self._local + j

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    q = self._position(index)
    skips = np.zeros(len(SKIP_REASONS), np.int64)
    for t in range(MAX_REPLACEMENTS):
      position = q + t * self._period
      if position >= len(self._parent):
        break
      x = self._parent[position]
      if "skip" not in x:
        return {**x, "skips": skips}
      skips[int(x["skip"])] += 1
    return {"skips": skips}

  def __str__(self) -> str:
    return (f"Rows(index={self._p}, local_batch={self._local}, global={self._global}, "
            "broken records replaced from later epochs)")


class BatchIterator(grain.DatasetIterator):
  """Stacks `batch_size` good examples per batch, skipping and counting broken ones.

  `skipped`: reason -> count since the start (kept in the state, so it survives a
  resume); `last_skipped`: the same for the latest batch; `examples`: examples
  batched so far.
  """

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool,
               num_workers: int = 0):
    super().__init__(parent)
    self._batch_size, self._drop_remainder = batch_size, drop_remainder
    self._workers = num_workers
    self._consumed = 0  # elements taken from the parent, skipped ones included
    self._skipped = np.zeros(len(SKIP_REASONS), np.int64)
    self._last = np.zeros(len(SKIP_REASONS), np.int64)
    self._examples = 0

  def __next__(self) -> dict[str, np.ndarray]:
    values, skipped = [], np.zeros(len(SKIP_REASONS), np.int64)
    while len(values) < self._batch_size:
      try:
        x = next(self._parent)
      except StopIteration:
        self._skipped += skipped
        if self._drop_remainder or not values:
          raise
        break
      self._consumed += 1
      skipped += x["skips"]
      if "input_ids" in x:  # (else a row that could not be filled)
        values.append(x)
    self._skipped += skipped
    self._last = skipped
    self._examples += len(values)
    return {k: np.stack([x[k] for x in values]) for k in KEYS}

  @property
  def skipped(self) -> dict[str, int]:
    return dict(zip(SKIP_REASONS, map(int, self._skipped)))

  @property
  def last_skipped(self) -> dict[str, int]:
    return dict(zip(SKIP_REASONS, map(int, self._last)))

  @property
  def examples(self) -> int:
    return self._examples

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "consumed": self._consumed,
            "num_workers": self._workers, "skipped": self.skipped,
            "examples": self._examples}

  def set_state(self, state: dict) -> None:
    """Restores a `get_state()`; a state saved with worker processes also restores
    into an in-process pipeline (not the other way, nor across worker counts)."""
    if state["num_workers"] == self._workers:
      self._parent.set_state(state["parent"])
    elif self._workers == 0:  # The in-process reader's state is the element count.
      self._parent.set_state({"next_index": state["consumed"]})
    else:
      raise ValueError(f"iterator state saved with num_workers={state['num_workers']} "
                       f"cannot be restored with num_workers={self._workers}; use the "
                       "same count, or 0")
    self._consumed = int(state["consumed"])
    self._skipped = np.array([state["skipped"].get(r, 0) for r in SKIP_REASONS], np.int64)
    self._last = np.zeros(len(SKIP_REASONS), np.int64)
    self._examples = int(state["examples"])

  def close(self) -> None:
    if hasattr(self._parent, "close"):
      self._parent.close()

  def __str__(self) -> str:
    return f"BatchIterator(batch_size={self._batch_size})"


class _Batch(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool,
               num_workers: int):
    super().__init__(parent)
    self._batch_size, self._drop_remainder = batch_size, drop_remainder
    self._workers = num_workers

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self._parent.__iter__(), self._batch_size, self._drop_remainder,
                         self._workers)

  def __str__(self) -> str:
    return f"Batch(batch_size={self._batch_size}, skipping broken records)"


def make_dataset(source, cfg: LaViDaConfig, tokenizer: text.Tokenizer,
                 specials: text.SpecialTokens, *, length: int, global_batch_size: int,
                 seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 max_views: int | None = None, template: str | None = None,
                 system_prompt: str | None = text.SYSTEM_PROMPT,
                 fim: tuple[str, str] | None = None, drop_remainder: bool = True,
                 read_threads: int = 2, prefetch: int | None = None,
                 num_workers: int = 0) -> grain.IterDataset:
  """The pipeline as a grain IterDataset; `iter()` gives a `BatchIterator`.

  source: a random-access record source (`tfds_builder.data_source(...)`,
    `LlavaJsonSource`, or anything with `len` and `[i]` giving such records).
  global_batch_size: examples per step over all processes; this process yields
    batches of global_batch_size / process_count.
  process_index / process_count: default `jax.process_index()` / `process_count()`.
  num_epochs: None repeats forever (each epoch reshuffled).
  read_threads / prefetch: threads preprocessing ahead and how many examples they
    keep ready (default 2 batches); num_workers > 0 preprocesses in that many worker
    processes instead (grain `mp_prefetch`; needs a `__main__` guard and parsed absl
    flags). None of these change the batches.
  With several processes only whole global batches are read: a finite dataset's
  last partial global batch is dropped.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                     f"process_count {process_count}")
  if len(source) == 0:
    raise ValueError(f"source {source!r} has no records")
  local = global_batch_size // process_count
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map_with_index(Preprocessor(cfg, tokenizer, specials, length, seed=seed,
                                      max_views=max_views, template=template,
                                      system_prompt=system_prompt, fim=fim))
  ds = _Rows(ds, process_index, process_count, local, period=len(source))
  prefetch = 2 * local if prefetch is None else prefetch
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=prefetch))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(1, prefetch // num_workers)))
  return _Batch(it, local, drop_remainder, num_workers)


def process_state(saved: Mapping, global_batch_size: int, process_index: int,
                  process_count: int) -> dict:
  """This process's `BatchIterator` state from a checkpoint's data item.

  saved: `{"process_count": n, "states": [the state of process 0, ..., n - 1]}` (a
    single state, as older checkpoints hold, is every process's).
  Same process count: the process's own state. Another count (a job resumed on
  another slice): process p had consumed c_p rows of its own slots, L = G / n per
  global batch, so global batches [0, k) with k = max_p ceil(c_p / L) were started;
  every new process starts at global batch k. Rows are filled the same way for any
  process count (`_Rows`: broken records are replaced, not skipped over), so at a
  step boundary c_p = kL on every process and the resumed run sees exactly the
  batches the old one would have. Skip counts carry over (their sum, on process 0).
  """
  if "states" not in saved:
    return dict(saved)
  states = list(saved["states"])
  if len(states) == process_count:
    return dict(states[process_index])
  old_local = global_batch_size // len(states)
  k = max(-(-int(st["consumed"]) // old_local) for st in states)
  local = global_batch_size // process_count
  skipped = {r: sum(int(st["skipped"].get(r, 0)) for st in states) if process_index == 0
             else 0 for r in SKIP_REASONS}
  return {"parent": {"next_index": k * local}, "consumed": k * local, "num_workers": 0,
          "skipped": skipped, "examples": k * local}


def open_source(path: str, split: str = "train", image_folder: str | None = None):
  """A tfds data_dir (built by `tfds_builder.build`) or a LLaVA JSON/JSONL file."""
  from lavida_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    return tfds_builder.data_source(path, split)
  if os.path.isfile(path):
    return tfds_builder.LlavaJsonSource(path, image_folder)
  raise FileNotFoundError(f"data source {path} is neither a tfds data_dir nor a JSON file")


def global_batch(local_batch: Mapping[str, np.ndarray], mesh, batch_spec) -> dict:
  """This process's batch -> global `jax.Array`s sharded by `batch_spec`.

  batch_spec: a `PartitionSpec` for every array (its leading entries shard the
  batch axis, e.g. `P(("data", "fsdp"))`), or a mapping key -> `PartitionSpec`.
  Rows are placed in process order, so process p's rows are [pL, (p+1)L).
  """
  import jax  # pylint: disable=g-import-not-at-top

  out = {}
  for key, x in local_batch.items():
    spec = batch_spec[key] if isinstance(batch_spec, Mapping) else batch_spec
    out[key] = jax.make_array_from_process_local_data(
        jax.sharding.NamedSharding(mesh, spec), np.asarray(x))
  return out
