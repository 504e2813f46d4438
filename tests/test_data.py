"""Tests for the data path: demo set, tokenizer, tfds builder, grain pipeline, feeding."""

import dataclasses
import filecmp
import json
import os
import pickle
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from lavida_jax import image as image_lib
from lavida_jax import text
from lavida_jax.data import demo, pipeline, shapes
from lavida_jax.data import tfds_builder as tb
from lavida_jax.models.lavida import IMAGE_TOKEN_ID, LaViDaConfig, image_layout

IMAGE = 64  # demo image side (px)
LENGTH = 192


def small_config(family: str = "lavida-llada") -> LaViDaConfig:
  """The tiny config at 56 px views (4x4 patches), anyres over 56-px pinpoints, no pooling."""
  cfg = LaViDaConfig.create(family, "tiny")
  s = 56
  pins = tuple((w * s, h * s) for w, h in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)))
  return dataclasses.replace(
      cfg, vision=dataclasses.replace(cfg.vision, image_size=s),
      image=image_lib.ImageConfig(size=s, pinpoints=pins),
      connector=dataclasses.replace(cfg.connector, pool_mode=None))


@pytest.fixture(scope="module", autouse=True)
def _quiet_tfds():
  tb.tfds.display_progress_bar(False)


@pytest.fixture(scope="module")
def demo_prepared(tmp_path_factory):
  """(DemoFiles, tfds data_dir) of 16 train and 4 held-out scenes, 2 questions each."""
  return demo.prepare(str(tmp_path_factory.mktemp("demo")), seed=0, num_train=16,
                      num_heldout=4, image_size=IMAGE, questions_per_image=2)


@pytest.fixture(scope="module")
def demo_files(demo_prepared):
  return demo_prepared[0]


@pytest.fixture(scope="module")
def demo_tfds(demo_prepared):
  return demo_prepared[1]


@pytest.fixture(scope="module")
def tok():
  return demo.demo_tokenizer()


def make(source, cfg=None, batch=4, **kw):
  cfg = cfg or small_config()
  specials = demo.demo_special_tokens(pipeline.template_for(cfg.family))
  kw = {"length": LENGTH, "global_batch_size": batch, "seed": 3, "process_index": 0,
        "process_count": 1, **kw}
  return pipeline.make_dataset(source, cfg, demo.demo_tokenizer(), specials, **kw)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------ demo set --


def test_demo_is_deterministic(demo_files, tmp_path):
  again = demo.generate(str(tmp_path / "again"), seed=0, num_train=16, num_heldout=4,
                        image_size=IMAGE, questions_per_image=2)
  other = demo.generate(str(tmp_path / "other"), seed=1, num_train=16, num_heldout=4,
                        image_size=IMAGE, questions_per_image=2)
  for split in demo.SPLITS:
    for a, b, c in ((demo_files.qa[split], again.qa[split], other.qa[split]),
                    (demo_files.captions[split], again.captions[split], other.captions[split])):
      assert filecmp.cmp(a, b, shallow=False)
      assert not filecmp.cmp(a, c, shallow=False)
    names = sorted(os.listdir(os.path.join(demo_files.image_folder, split)))
    assert len(names) == (16 if split == "train" else 4)
    match, mismatch, errors = filecmp.cmpfiles(
        os.path.join(demo_files.image_folder, split), os.path.join(again.image_folder, split),
        names, shallow=False)
    assert match == names, (mismatch, errors)
  train, heldout = (demo.read_jsonl(demo_files.qa[s]) for s in demo.SPLITS)
  assert not {r["image"] for r in train} & {r["image"] for r in heldout}
  answers = set(shapes.COLOURS) | set(shapes.SHAPES) | set(demo.NUMBERS)
  describe = "<image>\n" + demo.QUESTION_KINDS["describe"]
  captions = {r["image"]: r["conversations"][1]["value"]
              for r in demo.read_jsonl(demo_files.captions["train"])}
  for r in train + heldout:
    human, gpt = r["conversations"]
    assert human["value"].startswith("<image>\n") and human["from"] == "human"
    if human["value"] == describe:  # training scenes only, answered by their caption
      assert r in train and gpt["value"] == captions[r["image"]]
    else:
      assert gpt["value"] in answers
    assert os.path.isfile(os.path.join(demo_files.image_folder, r["image"]))
  # Every training scene is described once; held-out questions are one word.
  assert sum(r["conversations"][0]["value"] == describe for r in train) == 16
  # The first records of a split do not depend on how many are asked for.
  fewer = demo.generate(str(tmp_path / "fewer"), seed=0, num_train=5, num_heldout=1,
                        image_size=IMAGE, questions_per_image=2)
  assert demo.read_jsonl(fewer.qa["train"]) == [r for r in train if int(r["id"][6:12]) < 5]


def test_demo_images_are_one_row_on_black_and_extra_kinds_fit_their_scene(tmp_path):
  files = demo.generate(str(tmp_path), seed=3, num_train=12, num_heldout=1, image_size=56,
                        train_extra_kinds=("describe", "colour_of_shape"))
  records = demo.read_jsonl(files.qa["train"])
  for i in range(12):
    pixels = np.asarray(Image.open(os.path.join(files.image_folder, f"train/{i:06d}.png")))
    shape_rows = {y // 14 for y in np.flatnonzero((pixels != demo.BACKGROUND).any((1, 2)))}
    assert len(shape_rows) == 1, shape_rows  # one row of 14-px cells, the rest black
    caption = next(r for r in records if r["image"] == f"train/{i:06d}.png"
                   and r["kind"] == "describe")["conversations"][1]["value"]
    kinds = [w for w in caption.split() if w in shapes.SHAPES]
    has_unique = any(kinds.count(k) == 1 for k in kinds)
    asked = [r for r in records if r["image"] == f"train/{i:06d}.png"
             and r["kind"] == "colour_of_shape"]
    assert len(asked) == (1 if has_unique else 0), (caption, asked)


def _read_scene(path: str) -> list[tuple[str, str]]:
  """(colour, kind) of each shape in a demo image, left to right, from its pixels:
  the colour by its RGB, the kind by how much of its bounding box it fills (square
  ~1, circle ~pi/4, triangle ~1/2)."""
  pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
  out = []
  for name, rgb in shapes.COLOURS.items():
    ys, xs = np.nonzero((pixels == rgb).all(-1))
    if len(xs):
      fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
      kind = "square" if fill > 0.92 else "circle" if fill > 0.66 else "triangle"
      out.append((xs.min(), name, kind))
  return [(c, k) for _, c, k in sorted(out)]


def test_heldout_captions_ask_the_training_describe_question(tmp_path):
  files = demo.generate(str(tmp_path), seed=2, num_train=6, num_heldout=40, image_size=56)
  train = demo.read_jsonl(files.qa["train"])
  asked = {r["conversations"][0]["value"] for r in train if r["kind"] == "describe"}
  assert asked == {"<image>\nWhat shapes are there?"}
  heldout = demo.read_jsonl(files.captions["heldout"])
  assert [r["image"] for r in heldout] == [f"heldout/{i:06d}.png" for i in range(40)]
  counts = set()
  for r in heldout:
    human, gpt = r["conversations"]
    assert human == {"from": "human", "value": "<image>\nWhat shapes are there?"}
    assert r["kind"] == "describe" and gpt["from"] == "gpt"
    # The answer names the rendered shapes left to right.
    scene = _read_scene(os.path.join(files.image_folder, r["image"]))
    assert gpt["value"] == " and ".join(f"a {c} {k}" for c, k in scene), r["image"]
    counts.add(len(scene))
  assert counts == {1, 2, 3}
  # Training's describe answers are the same function of the scene.
  for r in train:
    if r["kind"] == "describe":
      scene = _read_scene(os.path.join(files.image_folder, r["image"]))
      assert r["conversations"][1]["value"] == " and ".join(f"a {c} {k}" for c, k in scene)


@pytest.mark.parametrize("one_row", [False, True])
def test_grid_scenes_put_each_shape_inside_one_cell_of_its_own_column(one_row):
  # At the demo's 56 px, a cell of the 4x4 grid is one 14-px vision patch.
  rows = set()
  for seed in range(50):
    scene = shapes.sample_scene(np.random.default_rng(seed), (56, 56),
                                side_fraction=demo.SIDE_FRACTION, grid=demo.GRID,
                                one_row=one_row)
    assert 1 <= len(scene) <= 3 and len({s.colour for s in scene}) == len(scene)
    cells = []
    for s in scene:
      x0, y0, x1, y1 = s.box  # PIL draws x1, y1 inclusive
      assert x0 // 14 == x1 // 14 and y0 // 14 == y1 // 14, s
      assert 8 <= x1 - x0 < 14 and x1 - x0 == y1 - y0, s
      cells.append((x0 // 14, y0 // 14))
    assert len({c for c, _ in cells}) == len(cells)  # one shape per column
    assert [c for c, _ in cells] == sorted(c for c, _ in cells)  # left to right
    if one_row:
      assert len({r for _, r in cells}) == 1, cells
    rows.update(r for _, r in cells)
    pixels = np.asarray(shapes.render(scene, (56, 56), demo.BACKGROUND))
    for cx, cy in {(i, j) for i in range(4) for j in range(4)} - set(cells):
      assert (pixels[cy * 14:(cy + 1) * 14, cx * 14:(cx + 1) * 14] == demo.BACKGROUND).all()
  assert rows == {0, 1, 2, 3}  # every row is used (one_row: a random row per scene)
  with pytest.raises(ValueError, match="fewer columns"):
    shapes.sample_scene(np.random.default_rng(0), (56, 56), grid=2)


def test_scene_questions_have_the_one_right_answer():
  red_circle = shapes.Shape("circle", "red", (2, 10, 20, 28))
  blue_square = shapes.Shape("square", "blue", (30, 5, 50, 25))
  green_circle = shapes.Shape("circle", "green", (45, 30, 60, 45))
  rng = np.random.default_rng(0)
  qa = demo.scene_questions([red_circle, blue_square], rng, tuple(demo.QUESTION_KINDS))
  assert qa["count"] == ("How many shapes are there?", "two")
  assert qa["describe"][1] == "a red circle and a blue square"
  assert qa["leftmost_colour"][1] == "red" and qa["rightmost_colour"][1] == "blue"
  assert qa["colour_of_shape"] in {("What colour is the circle?", "red"),
                                   ("What colour is the square?", "blue")}
  assert qa["shape_of_colour"] in {("What shape is the red object?", "circle"),
                                   ("What shape is the blue object?", "square")}
  question, answer = qa["exists"]
  present = question in ("Is there a red circle?", "Is there a blue square?")
  assert answer == ("yes" if present else "no")
  # Two circles: the circle's colour is ambiguous, so only the square is asked about.
  for seed in range(10):
    qa = demo.scene_questions([red_circle, blue_square, green_circle],
                              np.random.default_rng(seed))
    assert qa["colour_of_shape"] == ("What colour is the square?", "blue")
    assert qa["count"][1] == "three" and qa["rightmost_colour"][1] == "green"
  single = demo.scene_questions([blue_square], rng)
  assert "leftmost_colour" not in single and single["count"][1] == "one"


def test_demo_tokenizer_is_shipped_and_regenerable(tmp_path, tok):
  assert os.path.getsize(demo.TOKENIZER_PATH) < 300_000
  for s in demo.SPECIAL_STRINGS:
    i = tok.token_to_id(s)
    assert i is not None and tok.encode(s) == [i], s
  sp = demo.demo_special_tokens()
  assert (sp.mask_id, sp.eos_id, sp.pad_id, sp.bos_id, sp.end_of_turn) == (
      tok.token_to_id("<|mdm_mask|>"), tok.token_to_id("<|endoftext|>"),
      tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|startoftext|>"), "<|eot_id|>")
  assert demo.demo_special_tokens("dream").end_of_turn == "<|im_end|>"
  again = demo.train_demo_tokenizer(str(tmp_path / "t.model"))
  assert again.vocab_size == tok.vocab_size
  assert [again.id_to_token(i) for i in range(again.vocab_size)] == [
      tok.id_to_token(i) for i in range(tok.vocab_size)]
  prompt = text.format_llada([{"role": "user", "content": "What colour is the leftmost shape?"},
                              {"role": "assistant", "content": "purple"}])
  ids = tok.encode(prompt)
  assert tok.decode(ids) == prompt
  assert len(ids) < 70  # Whole words: the system prompt is about 40 pieces.
  assert all(tok.id_to_token(i) != "<unk>" for i in ids)


# ------------------------------------------------------------------- builder --


def test_builder_round_trips_records(demo_files, demo_tfds):
  for split in demo.SPLITS:
    source = tb.data_source(demo_tfds, split)
    records = demo.read_jsonl(demo_files.qa[split])
    assert len(source) == len(records)
    for i, r in enumerate(records):
      got = source[i]
      assert got["id"].decode() == r["id"]
      assert got["image_path"].decode() == r["image"]
      assert json.loads(got["conversations"]) == r["conversations"]
      with open(os.path.join(demo_files.image_folder, r["image"]), "rb") as f:
        assert got["image"] == f.read()
  json_source = tb.LlavaJsonSource(demo_files.qa["train"], demo_files.image_folder)
  assert json_source[3]["image"] == tb.data_source(demo_tfds, "train")[3]["image"]


def test_prepare_rebuilds_only_when_the_set_changes(tmp_path):
  kw = dict(num_train=3, num_heldout=1, image_size=IMAGE, questions_per_image=1)
  files, data_dir = demo.prepare(str(tmp_path), **kw)
  stamp = os.path.getmtime(os.path.join(data_dir, "manifest.json"))
  assert demo.prepare(str(tmp_path), **kw) == (files, data_dir)
  assert os.path.getmtime(os.path.join(data_dir, "manifest.json")) == stamp
  assert len(tb.data_source(data_dir, "heldout")) == 1
  demo.prepare(str(tmp_path), **{**kw, "num_heldout": 2})
  assert len(tb.data_source(data_dir, "heldout")) == 2


def test_prepare_from_two_processes_at_once(tmp_path):
  """Two runs sharing a demo root (both rebuilding it) take turns instead of racing."""
  import subprocess
  code = ("import sys; from lavida_jax.data import demo; "
          f"demo.prepare(sys.argv[1], num_train=40, num_heldout=2, image_size={IMAGE})")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  errs = [p.communicate(timeout=240)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs
  assert len(tb.data_source(os.path.join(tmp_path, "tfds"), "train")) > 40


# ------------------------------------------------------------------ pipeline --


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
def test_batches_shapes_image_tokens_and_labels(demo_files, demo_tfds, tok, family):
  cfg = small_config(family)
  records = demo.read_jsonl(demo_files.qa["train"])
  it = iter(make(tb.data_source(demo_tfds, "train"), cfg, batch=4, shuffle=False))
  batches = take(it, 2)
  expected = pipeline.batch_shapes(cfg, LENGTH, 4)
  specials = demo.demo_special_tokens(pipeline.template_for(family))
  end = "<|eot_id|>" if family == "lavida-llada" else "<|im_end|>\n"
  n_image = image_layout(cfg, (IMAGE, IMAGE)).num_tokens
  views = image_lib.num_views((IMAGE, IMAGE), cfg.image)
  assert views == 5 and expected["pixel_values"][0] == (4, 5, 56, 56, 3)
  for b, batch in enumerate(batches):
    assert list(batch) == list(pipeline.KEYS)
    for k, (shape, dtype) in expected.items():
      assert batch[k].shape == shape and batch[k].dtype == dtype, k
    for row in range(4):
      ids, labels = batch["input_ids"][row], batch["labels"][row]
      assert (ids == IMAGE_TOKEN_ID).sum() == n_image
      image_pos = np.flatnonzero(ids == IMAGE_TOKEN_ID)
      assert np.array_equal(image_pos, image_pos[0] + np.arange(n_image))  # one block
      assert (batch["image_weight"][row][ids != IMAGE_TOKEN_ID] == 0).all()
      np.testing.assert_allclose(batch["image_weight"][row][image_pos].sum(-1), 1.0)
      # Labels: IGNORE on the prompt; the answer, its end of turn, then EOS padding.
      target = np.flatnonzero(labels != text.IGNORE_ID)
      assert np.array_equal(target, np.arange(target[0], LENGTH))
      assert np.array_equal(labels[target], ids[target])
      answer = records[4 * b + row]["conversations"][1]["value"]
      answer_ids = tok.encode(answer + end)
      n = len(answer_ids)
      assert list(labels[target[:n]]) == answer_ids
      assert (labels[target[n:]] == specials.eos_id).all()
      assert target[0] > image_pos[-1]
      assert batch["view_mask"][row].sum() == views
      pixels = batch["pixel_values"][row]
      assert pixels.min() >= -1 and pixels.max() <= 1 and np.abs(pixels).max() > 0.5


def test_default_tiny_config_batches(demo_tfds):
  cfg = LaViDaConfig.create("lavida-llada", "tiny")
  it = iter(make(tb.data_source(demo_tfds, "heldout"), cfg, batch=2, length=512))
  batch = next(it)
  assert batch["pixel_values"].shape == (2, cfg.image.max_views, 384, 384, 3)
  n_image = image_layout(cfg, (IMAGE, IMAGE)).num_tokens
  assert ((batch["input_ids"] == IMAGE_TOKEN_ID).sum(1) == n_image).all()
  assert batch["view_mask"].sum(1).tolist() == [image_lib.num_views((IMAGE, IMAGE), cfg.image)] * 2


def _broken_dataset(root, demo_files):
  """Good records (answers good0..good2) mixed with one broken record of each kind."""
  folder = os.path.join(root, "images")
  os.makedirs(folder)
  good_png = os.path.join(demo_files.image_folder, "train", "000000.png")
  with open(good_png, "rb") as f:
    png = f.read()
  with open(os.path.join(folder, "good.png"), "wb") as f:
    f.write(png)
  with open(os.path.join(folder, "corrupt.png"), "wb") as f:
    f.write(png[:len(png) // 2])  # truncated
  with open(os.path.join(folder, "empty.png"), "wb") as f:
    pass

  def rec(rid, image, question, answer):
    r = {"id": rid, "conversations": [{"from": "human", "value": question},
                                      {"from": "gpt", "value": answer}]}
    if image:
      r["image"] = image
    return r

  records = [
      rec("a", "good.png", "<image>\nWhat colour is the circle?", "good0"),
      rec("missing", "nope.png", "<image>\nWhat colour is the circle?", "red"),
      {"id": "empty", "image": "good.png", "conversations": []},
      rec("corrupt", "corrupt.png", "<image>\nWhat shape is it?", "square"),
      rec("b", "good.png", "What shape is the red object?", "good1"),  # <image> added
      rec("long", "good.png", "<image>\n" + "What colour is the circle? " * 30, "red"),
      rec("zero-bytes", "empty.png", "<image>\nHow many?", "one"),
      {"id": "unanswered", "image": "good.png",
       "conversations": [{"from": "human", "value": "<image>\nHi"}]},
      {"id": "no-conversations", "image": "good.png"},
      rec("c", "good.png", "<image>\nHow many shapes are there?", "good2"),
  ]
  path = os.path.join(root, "broken.jsonl")
  demo.write_jsonl(path, records)
  return path, folder


@pytest.mark.parametrize("reader", ["tfds", "json"])
def test_broken_records_are_skipped_and_counted(demo_files, tmp_path, tok, reader):
  path, folder = _broken_dataset(str(tmp_path), demo_files)
  if reader == "tfds":
    source = tb.data_source(tb.build({"train": path}, folder, str(tmp_path / "tfds")), "train")
  else:
    source = tb.LlavaJsonSource(path, folder)
  assert len(source) == 10
  it = iter(make(source, batch=1, shuffle=False, num_epochs=1))
  answers = []
  for batch in it:
    labels = batch["labels"][0]
    answers.append(tok.decode(labels[labels != text.IGNORE_ID], skip_special_tokens=True))
  assert answers == ["good0", "good1", "good2"]
  assert it.skipped == {"missing_image": 2, "bad_image": 1, "bad_conversation": 3,
                        "too_long": 1, "too_many_views": 0}
  assert it.examples == 3


def _answers(batch, tok):
  return [tok.decode(row[row != text.IGNORE_ID], skip_special_tokens=True)
          for row in batch["labels"]]


def test_broken_records_leave_global_batches_identical_across_process_counts(
    demo_files, tmp_path, tok):
  """7 of 10 records broken, repeated forever: 1, 2 and 4 processes assemble the same
  global batches (a skip used to shift that process's rows), and a run resumed on
  another process count continues with exactly the batches of the uninterrupted one."""
  path, folder = _broken_dataset(str(tmp_path), demo_files)
  source = tb.LlavaJsonSource(path, folder)
  G, n = 4, 6
  single_it = iter(make(source, batch=G))
  single = take(single_it, n)
  assert {a for b in single for a in _answers(b, tok)} == {"good0", "good1", "good2"}
  assert sum(single_it.skipped.values()) > n  # records were skipped on the way ...
  for count in (2, 4):
    its = [iter(make(source, batch=G, process_index=p, process_count=count))
           for p in range(count)]
    parts = [take(it, n) for it in its]
    for b in range(n):  # ... and yet every global batch is the single process's
      for k in pipeline.KEYS:
        np.testing.assert_array_equal(np.concatenate([part[b][k] for part in parts]),
                                      single[b][k], err_msg=f"{count} processes, {k}")
    assert sum(sum(it.skipped.values()) for it in its) == sum(single_it.skipped.values())
  # resume: 2 processes stop after 3 global batches; 1 or 4 take over
  its = [iter(make(source, batch=G, process_index=p, process_count=2)) for p in range(2)]
  for it in its:
    take(it, 3)
  saved = json.loads(json.dumps({"process_count": 2, "states": [it.get_state() for it in its]}))
  for count in (1, 4):
    resumed = []
    for p in range(count):
      it = iter(make(source, batch=G, process_index=p, process_count=count))
      it.set_state(pipeline.process_state(saved, G, p, count))
      resumed.append(take(it, n - 3))
    for b in range(n - 3):
      np.testing.assert_array_equal(
          np.concatenate([r[b]["input_ids"] for r in resumed]), single[3 + b]["input_ids"])


def test_resume_gives_the_same_next_batches(demo_tfds):
  # 32 QA records, batch 6: the 9 batches cross two epoch boundaries.
  source = tb.data_source(demo_tfds, "train")
  it = iter(make(source, batch=6))
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 5)
  resumed = iter(make(source, batch=6))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), expected)
  assert resumed.examples == it.examples == 54
  # A state saved with worker processes restores into an in-process pipeline by its
  # element count (the workers' own state format is not needed).
  from_workers = dict(state, num_workers=2, parent={"worker states": "not readable here"})
  resumed = iter(make(source, batch=6))
  resumed.set_state(from_workers)
  assert_batches_equal(take(resumed, 5), expected)
  # Thread counts change nothing; another seed changes the order.
  assert_batches_equal(take(iter(make(source, batch=6, read_threads=1, prefetch=1)), 9)[4:],
                       expected)
  other = next(iter(make(source, batch=6, seed=4)))
  assert not np.array_equal(other["input_ids"], expected[0]["input_ids"])


def test_two_processes_split_each_global_batch(demo_tfds):
  source = tb.data_source(demo_tfds, "train")
  single = take(iter(make(source, batch=8)), 5)
  halves = [take(iter(make(source, batch=8, process_index=p, process_count=2)), 5)
            for p in range(2)]
  for b in range(5):
    for k in pipeline.KEYS:
      assert halves[0][b][k].shape[0] == halves[1][b][k].shape[0] == 4
      np.testing.assert_array_equal(
          np.concatenate([halves[0][b][k], halves[1][b][k]]), single[b][k], err_msg=k)
    # Disjoint: no example (question + image) is in both halves.
    seen = [{h[b]["input_ids"][r].tobytes() + h[b]["pixel_values"][r].tobytes()
             for r in range(4)} for h in halves]
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]
  with pytest.raises(ValueError, match="not divisible"):
    make(source, batch=7, process_index=0, process_count=2)


def test_global_batch_on_eight_devices(demo_tfds):
  mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  local = next(iter(make(tb.data_source(demo_tfds, "train"), batch=8)))
  arrays = pipeline.global_batch(local, mesh, P(("data", "fsdp")))
  for k, x in local.items():
    assert arrays[k].shape == x.shape and arrays[k].dtype == x.dtype
    assert arrays[k].sharding.spec == P(("data", "fsdp"))
    assert len(arrays[k].addressable_shards) == 8
    assert arrays[k].addressable_shards[0].data.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(arrays[k]), x)
  per_key = pipeline.global_batch({"input_ids": local["input_ids"]}, mesh,
                                  {"input_ids": P("data", "fsdp")})
  assert per_key["input_ids"].sharding.spec == P("data", "fsdp")


def test_preprocessor_pickles_for_worker_processes(demo_tfds):
  cfg = small_config()
  prep = pipeline.Preprocessor(cfg, demo.demo_tokenizer(), demo.demo_special_tokens(), LENGTH)
  record = tb.data_source(demo_tfds, "train")[0]
  copy = pickle.loads(pickle.dumps(prep))
  a, b = prep(7, record), copy(7, record)
  for k in pipeline.KEYS:
    np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="image_size"):
    pipeline.Preprocessor(dataclasses.replace(cfg, vision=LaViDaConfig.create(
        "lavida-llada", "tiny").vision), prep.tokenizer, prep.specials, LENGTH)


def test_worker_processes_give_the_same_batches(demo_tfds):
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (SPEC §12)
  source = tb.data_source(demo_tfds, "train")
  expected = take(iter(make(source, batch=4)), 3)
  it = iter(make(source, batch=4, num_workers=2))
  try:
    got = take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    got.append(next(it))
  finally:
    it.close()
  assert_batches_equal(got, expected)
  resumed = iter(make(source, batch=4))  # in-process, from the workers' state
  resumed.set_state(state)
  assert_batches_equal([next(resumed)], expected[2:])


# ------------------------------------------------- held-out sets, as main scores them --


def test_main_scores_heldout_captions_beside_one_word_answers(tmp_path, monkeypatch):
  """main's evaluate fn on the demo: exact match on the first eval.num_examples
  questions, and on the first eval.num_captions captions exact match and CIDEr, each
  set sampled with its own canvas. A stub sampler answers every question and every
  other caption right."""
  import types
  from lavida_jax import generate
  from lavida_jax import main as main_lib
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
  import cpu_demo  # pylint: disable=g-import-not-at-top

  cfg = cpu_demo.get_config()
  cfg.data.demo_train, cfg.data.demo_heldout = 4, 6
  cfg.data.demo_root = str(tmp_path / "demo")
  cfg.eval.num_examples, cfg.eval.num_captions = 5, 4
  data, heldout, system_prompt = main_lib.make_train_data(cfg, str(tmp_path))
  data_root = cfg.data.demo_root
  answers = {(r.prompt, r.image): a for r, a in heldout["qa"][0] + heldout["captions"]}
  canvases, asked = [], []
  describe = "<image>\nWhat shapes are there?"

  class Stub:
    def __init__(self, model, tokenizer, scfg, cache, system_prompt=None):
      canvases.append((scfg.gen_length, scfg.block_length, scfg.steps))

    def __call__(self, reqs, rng=None):
      out = []
      for r in reqs:
        asked.append(r)
        right = r.prompt != describe or int(r.image[-8:-4]) % 2 == 0
        out.append(generate.Result(text=answers[r.prompt, r.image] if right else "a red cat",
                                   ids=[], nfe=3, seconds=0.0))
      return out

  monkeypatch.setattr(generate, "Generator", Stub)
  model = types.SimpleNamespace(cfg=types.SimpleNamespace(lm=types.SimpleNamespace(mask_id=0)))
  run = main_lib.make_evaluate_fn(cfg, data, heldout, system_prompt)
  out = run(model, 0)
  # the grid's examples: the first held-out questions with the stub's (right) answers
  assert [(e.answer, e.correct) for e in run.examples] == [
      (a, True) for _, a in heldout["qa"][0][:5]]
  assert canvases == [(4, 4, 4), (12, 12, 12)]  # one-word, then caption canvases
  assert out["exact_match"] == 1.0 and out["n"] == 5
  assert out["caption/exact_match"] == 0.5 and out["caption/n"] == 4
  assert 0.0 < out["caption/cider"] < 10.0 and out["caption/nfe"] == 3
  assert [r.prompt for r in asked[5:]] == [describe] * 4
  assert describe not in [r.prompt for r in asked[:5]]
  assert [os.path.relpath(r.image, data_root) for r in asked[5:]] == [
      f"images/heldout/{i:06d}.png" for i in range(4)]
  line = main_lib.scores_line(out)
  assert "one-word exact match 1.000 (n=5)" in line
  assert f"captions exact match 0.500, CIDEr {out['caption/cider']:.3f} (n=4)" in line
  cfg.eval.num_examples = 0  # what the multi-process tests pass: no evaluation at all
  assert main_lib.make_evaluate_fn(cfg, data, heldout, system_prompt) is None
