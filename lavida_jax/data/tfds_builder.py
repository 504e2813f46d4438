"""LLaVA-format JSON/JSONL + an image folder -> ArrayRecord shards (tfds, no TensorFlow).

Input records are `{"id", "image": path relative to the image folder (optional),
"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`, as a JSON list or one
per line (JSONL). Each becomes a stored record of four features:

  id             Text
  image          the image file's bytes as stored on disk (PNG/JPEG/..., not
                 re-encoded), b"" when the record has no image or the file is missing
  image_path     Text, the record's `image` field ("" for text-only records)
  conversations  Text, the `conversations` list as a JSON string

The builder does not judge records: a missing image or a malformed conversation is
written as found, and the grain pipeline (`pipeline.py`) skips and counts it. Only the
`file_format="array_record"` path of tensorflow-datasets works without TensorFlow
(SPEC §12), so that is the only one used; `_info` passes `builder=self`. Records keep
their input order (`disable_shuffling`).

Read back with `data_source(data_dir, split)` (`tfds.data_source`), or skip the build
and read the JSON directly with `LlavaJsonSource` (same record format).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

NAME = "llava_json"
VERSION = "1.0.0"


def read_llava(path: str) -> list[dict]:
  """Records of a LLaVA JSON list (`.json`) or JSONL file; errors name file and line."""
  with open(path) as f:
    content = f.read()
  if path.endswith(".json") or content.lstrip().startswith("["):
    try:
      records = json.loads(content)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(records, list):
      raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
  else:
    records = []
    for line_no, line in enumerate(content.splitlines(), 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
  for i, record in enumerate(records):
    if not isinstance(record, dict):
      raise ValueError(f"{path}: record {i} is a {type(record).__name__}, expected an object")
  return records


def to_record(record: Mapping, image_folder: str | None, index: int = 0) -> dict:
  """A LLaVA record -> the stored features (strings, image bytes read from disk)."""
  image_path = record.get("image") or ""
  if not isinstance(image_path, str):  # e.g. a list of images: not supported, kept visible.
    image_path = json.dumps(image_path)
  data = b""
  if image_path:
    full = os.path.join(image_folder or "", image_path)
    if os.path.isfile(full):
      with open(full, "rb") as f:
        data = f.read()
  return {"id": str(record.get("id", index)), "image": data, "image_path": image_path,
          "conversations": json.dumps(record.get("conversations"))}


class LlavaJsonSource(Sequence):
  """Random access to a LLaVA JSON/JSONL file + image folder, records as `to_record`.

  The same records the tfds builder stores (strings as `str`, not `bytes`), read
  lazily: images are loaded when a record is accessed. For small sets and tests.
  """

  def __init__(self, paths: str | Sequence[str], image_folder: str | None):
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    self._records = [r for p in paths for r in read_llava(os.fspath(p))]
    self._image_folder = image_folder

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records")
    return to_record(self._records[index], self._image_folder, index % len(self))

  def __repr__(self) -> str:
    return f"LlavaJsonSource({len(self)} records, images in {self._image_folder!r})"


class LlavaJson(tfds.core.GeneratorBasedBuilder):
  """tfds builder: `splits` maps a split name to one or more JSON/JSONL files."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, splits: Mapping[str, str | Sequence[str]] | None = None,
               image_folder: str | None = None, **kwargs):
    self._splits = {k: [v] if isinstance(v, str) else list(v)
                    for k, v in (splits or {}).items()}
    self._image_folder = image_folder
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="LLaVA-format conversations with their images as encoded bytes.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "image_path": tfds.features.Text(),
            "conversations": tfds.features.Text(),
        }),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    if not self._splits:
      raise ValueError("LlavaJson: no splits given; pass splits={'train': 'train.jsonl', ...}")
    return {split: self._generate_examples(paths) for split, paths in self._splits.items()}

  def _generate_examples(self, paths):
    index = 0
    for path in paths:
      for record in read_llava(path):
        yield index, to_record(record, self._image_folder, index)
        index += 1


def build(splits: Mapping[str, str | Sequence[str]], image_folder: str | None,
          data_dir: str, overwrite: bool = False) -> str:
  """Writes the ArrayRecord shards of every split under `data_dir`; returns data_dir.

  A dataset already prepared there is kept as it is (tfds' behaviour) unless
  `overwrite`, which deletes it first.
  """
  if overwrite:
    shutil.rmtree(os.path.join(data_dir, NAME), ignore_errors=True)
  builder = LlavaJson(splits=splits, image_folder=image_folder, data_dir=data_dir)
  # tfds prints its progress bars and "Downloading and preparing ..." to the console:
  # into the log instead (the console is for our own progress and results).
  out = io.StringIO()
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
      builder.download_and_prepare()
  finally:
    tfds.display_progress_bar(True)
  if out.getvalue().strip():
    logging.info("tfds build of %s: %s", data_dir, out.getvalue().strip())
  return data_dir


def data_source(data_dir: str, split: str):
  """Random-access source of a built split (`tfds.data_source`; strings come back as bytes)."""
  return tfds.data_source(NAME, split=split, data_dir=data_dir)
