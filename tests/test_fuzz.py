"""Fuzzing the inputs a user hands us (issue 16, item 6), with hypothesis.

Each target takes arbitrary or hostile input and must either work or raise its one
clear error type (with a message), never crash with another exception, hang or
allocate without bound. Example counts are fixed and derandomized (the same inputs
on every run) so `.ci/run` stays within its budget: ~1,000 examples in ~20 s.
"""
import io
import json
import os
import resource
import struct
import tempfile
import time
import zlib

import numpy as np
import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ml_collections import config_flags
from PIL import Image

from lavida_jax import generate, image
from lavida_jax.checkpoint.shards import DTYPES, CheckpointError, SafetensorsFile
from lavida_jax.data import demo, pipeline
from tests.test_data import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fuzz(n: int):
  return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- images -----------------------------------------------------------------------------

def _encoded(fmt: str, w: int, h: int, seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format=fmt)
  return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
  """A PNG whose IHDR declares w x h (valid CRC) followed by a tiny IDAT."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _load_or_refuse(data: bytes):
  try:
    out = image.load_image(data, max_pixels=4_000_000)
  except image.ImageError as e:
    assert str(e).startswith("<bytes>") or str(e), e
    return None
  assert out.mode == "RGB" and 0 < out.size[0] * out.size[1] <= 4_000_000
  return out


@fuzz(300)
@given(st.binary(max_size=4096))
def test_random_bytes_are_an_image_or_an_image_error(data):
  _load_or_refuse(data)


@fuzz(150)
@given(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP"]), st.integers(1, 48),
       st.integers(1, 48), st.floats(0, 1, exclude_max=True), st.integers(0, 2**16))
def test_truncated_or_flipped_files_are_refused_or_decode(fmt, w, h, cut, seed):
  data = _encoded(fmt, w, h, seed)
  for damaged in (data[:int(cut * len(data))],
                  bytes(b ^ (0x55 if i == int(cut * len(data)) else 0)
                        for i, b in enumerate(data))):
    out = _load_or_refuse(damaged)
    if out is not None:  # a cut after the last byte the decoder needs: same size
      assert out.size == (w, h) or fmt in ("GIF", "BMP", "WEBP", "JPEG")


@fuzz(100)
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))
def test_huge_declared_dimensions_are_refused_before_decoding(w, h):
  before, t0 = _rss_mb(), time.perf_counter()
  out = _load_or_refuse(_png_header(w, h))
  if w * h > 4_000_000:
    assert out is None
  assert time.perf_counter() - t0 < 2 and _rss_mb() - before < 200


# --- JSONL requests (generate's batch mode) ---------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
REQUEST_LIKE = st.fixed_dictionaries({}, optional={"prompt": JSON, "image": JSON,
                                                   "draft": JSON, "id": JSON})


@fuzz(300)
@given(st.one_of(st.text(max_size=200), JSON.map(json.dumps), REQUEST_LIKE.map(json.dumps)))
def test_jsonl_request_lines_parse_or_name_their_line(line):
  row, req = generate.parse_request(line, "in.jsonl line 7")
  assert isinstance(row, dict)
  json.dumps(row)  # written back beside the output
  if isinstance(req, str):
    assert req.startswith("in.jsonl line 7: ") and "\n" not in req
  else:
    assert isinstance(req.prompt, str)
    assert req.image is None or isinstance(req.image, str)


# --- LLaVA records through the training preprocessor -----------------------------------

@pytest.fixture(scope="module")
def preprocessor():
  cfg = small_config()
  return pipeline.Preprocessor(cfg, demo.demo_tokenizer(), demo.demo_special_tokens(), 96)


TURN = st.fixed_dictionaries({}, optional={
    "from": st.sampled_from(["human", "gpt", "system", ""]) | JSON,
    "value": st.text(max_size=60) | st.just("<image>\nWhat colour is it?") | JSON})
VALID = [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
         {"from": "gpt", "value": "red"}]
CONVERSATIONS = st.just(VALID) | st.lists(TURN, max_size=5) | JSON
PNG_56 = _encoded("PNG", 56, 40, 0)


def test_a_valid_record_is_an_example(preprocessor):
  """(So the fuzzed records below are not all skipped for a reason of the fixture's.)"""
  out = preprocessor(3, {"conversations": json.dumps(VALID), "image": PNG_56,
                         "image_path": "a.png", "id": "1"})
  assert "skip" not in out and out["view_mask"].sum() >= 1


@fuzz(200)
@given(CONVERSATIONS, st.sampled_from([b"", PNG_56, PNG_56[:100], b"not an image"]),
       st.text(max_size=20), st.one_of(st.text(max_size=20), st.binary(max_size=20)))
def test_llava_records_become_examples_or_counted_skips(preprocessor, conversations, data,
                                                        path, rid):
  record = {"conversations": json.dumps(conversations), "image": data, "image_path": path,
            "id": rid}
  out = preprocessor(3, record)
  if "skip" in out:
    assert 0 <= int(out["skip"]) < len(pipeline.SKIP_REASONS)
  else:
    assert out["input_ids"].shape == (96,) and out["labels"].shape == (96,)


@fuzz(100)
@given(st.dictionaries(st.sampled_from(["conversations", "image", "image_path", "id", "x"]),
                       JSON | st.binary(max_size=30), max_size=5))
def test_records_missing_or_mistyped_fields_are_skipped(preprocessor, record):
  out = preprocessor(0, record)
  assert "skip" in out or out["input_ids"].shape == (96,)


# --- config overrides -------------------------------------------------------------------

def _config_keys():
  import runpy
  cfg = runpy.run_path(os.path.join(ROOT, "configs", "cpu_demo.py"))["get_config"]()
  return sorted(k for k, _ in _flat(cfg))


def _flat(cfg, prefix=""):
  for k, v in cfg.items():
    if hasattr(v, "items"):
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


KEYS = _config_keys()


@fuzz(150)
@given(st.sampled_from(KEYS) | st.text("abcdefgh._", min_size=1, max_size=20),
       st.text(max_size=20) | st.integers().map(str) | st.floats().map(str))
def test_config_overrides_apply_or_are_refused_by_name(key, value):
  """What `--config.KEY=VALUE` meets in main: a value of the field's type, or a flag
  error / unknown-key error that main reports in one line."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "cpu_demo.py"),
                                  flag_values=fv, lock_config=True)
  try:
    fv(["main", f"--config.{key}={value}"])
    fv["config"].value  # noqa: B018 (resolved lazily)
  except (flags.Error, KeyError, AttributeError):  # what main.parse_flags turns into one line
    return


@fuzz(100)
@given(st.text(max_size=40))
def test_config_arguments_parse_or_are_refused(arg):
  import runpy
  get_config = runpy.run_path(os.path.join(ROOT, "configs", "cpu_demo.py"))["get_config"]
  try:
    get_config(arg)
  except ValueError as e:
    assert str(e)


# --- safetensors headers ----------------------------------------------------------------

ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(sorted(DTYPES)) | JSON,
    "shape": st.lists(st.integers(-2, 2**40), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-10, 2**62), min_size=2, max_size=2) | JSON})
HEADER = st.dictionaries(st.text(max_size=10), ENTRY | JSON, max_size=4)


def _safetensors(header_bytes: bytes, declared: int | None, body: bytes) -> str:
  fd, path = tempfile.mkstemp(suffix=".safetensors")
  with os.fdopen(fd, "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes) if declared is None else declared))
    f.write(header_bytes + body)
  return path


def _open_and_read(path):
  try:
    f = SafetensorsFile(path)
  except CheckpointError as e:
    assert path in str(e) and "\n" not in str(e)
    return
  try:
    for key in f.keys():
      out = f.get(key)
      assert out.shape == f.shape(key)
  except CheckpointError as e:
    assert path in str(e)
  finally:
    f.close()


@fuzz(250)
@given(HEADER, st.none() | st.integers(0, 2**64 - 1), st.binary(max_size=256))
def test_hostile_safetensors_headers_are_refused_by_name(header, declared, body):
  path = _safetensors(json.dumps(header).encode(), declared, body)
  try:
    t0 = time.perf_counter()
    _open_and_read(path)
    assert time.perf_counter() - t0 < 2
  finally:
    os.remove(path)


@fuzz(100)
@given(st.binary(max_size=64), st.binary(max_size=128))
def test_random_safetensors_bytes_are_refused(head, body):
  path = _safetensors(head, None, body)
  try:
    _open_and_read(path)
  finally:
    os.remove(path)
