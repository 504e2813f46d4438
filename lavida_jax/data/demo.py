"""The demo set: seeded scenes of coloured shapes as LLaVA records, and its tokenizer.

`generate(root, seed=0)` writes, deterministically from the seed:

  root/images/{train,heldout}/NNNNNN.png   1-3 shapes on black, in one row of a 4x4 grid
  root/train.jsonl, root/heldout.jsonl     short-answer questions, one QA per record
  root/captions_{train,heldout}.jsonl      every scene described, one record each:
                                           "<image>\nWhat shapes are there?" -> caption
  root/manifest.json                       the arguments (a matching set is reused)

`prepare(root, ...)` also writes the QA splits as tfds ArrayRecord under root/tfds.

Records are LLaVA format, `{"id", "image": "train/000012.png", "kind":
"colour_of_shape", "conversations": [{"from": "human", "value": "<image>\\nWhat
colour is the circle?"}, {"from": "gpt", "value": "red"}]}`, with image paths relative
to `root/images` (`kind`, one of `QUESTION_KINDS`, is ours: LLaVA readers ignore it).
Every held-out question has exactly one one-word answer; training scenes are also
described left to right (`TRAIN_EXTRA_KINDS`); the caption files ask every scene of
a split that same question (`CAPTION_PROMPT`), so `captions_heldout.jsonl` is the
held-out describe split, scored by exact match and CIDEr. Scene i of a
split is drawn from `default_rng([seed, split, i])`, so a split's first records do
not change when more are asked for, and train and held-out scenes never share a seed.

The demo tokenizer (`assets/demo_tokenizer.model`, from `train_demo_tokenizer`) is a
small sentencepiece model trained on every string the demo can produce, rendered in
both chat templates, with the templates' special strings as single pieces.
"""
from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import os

import numpy as np

from lavida_jax import text
from lavida_jax.data import shapes

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
TOKENIZER_PATH = os.path.join(ASSETS, "demo_tokenizer.model")
TOKENIZER_VOCAB_SIZE = 512
# The special strings of both chat templates, FIM and the mask (one piece each).
SPECIAL_STRINGS = ("<|startoftext|>", "<|endoftext|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|mdm_mask|>", "[FIM]", "[S]",
                   "<|im_start|>", "<|im_end|>")
SPLITS = ("train", "heldout")
NUMBERS = ("zero", "one", "two", "three")
# Shapes sit in the cells of a 4 x 4 grid, one per column, and fill 80-100% of their
# cell: at the demo's 56 px a cell is one 14-px vision patch, so each patch sees one
# whole shape (or background), which a small model learns in minutes.
GRID = 4
SIDE_FRACTION = (0.8, 1.0)
# All in one random row: left to right is then also the order of the shapes' image
# tokens in the row-major sequence.
ONE_ROW = True
# Black: every colour stands out from it in every channel, so a shape's outline is
# the same pattern whatever its colour. On mid-grey a linear read-out of the trained
# vision features told green shapes apart 55% of the time (white: 100%), and the
# demo's left/right and colour<->shape questions stayed near chance.
BACKGROUND = (0, 0, 0)

# kind -> question template; {kind}/{colour} are filled from the scene.
QUESTION_KINDS = {
    "colour_of_shape": "What colour is the {kind}?",        # kinds present once
    "shape_of_colour": "What shape is the {colour} object?",
    "count": "How many shapes are there?",
    "leftmost_colour": "What colour is the leftmost shape?",  # 2+ shapes
    "rightmost_colour": "What colour is the rightmost shape?",  # 2+ shapes
    "exists": "Is there a {colour} {kind}?",                # yes / no
    "describe": "What shapes are there?",  # the caption (left to right; a short
                                           # question keeps the demo's rows at 44 tokens)
}
# The caption files ask what training's describe records ask (a prompt training never
# saw, e.g. a bare "<image>", is answered with whatever one-word habit it has).
CAPTION_PROMPT = f"{text.IMAGE_TOKEN}\n{QUESTION_KINDS['describe']}"
DEFAULT_KINDS = ("colour_of_shape", "shape_of_colour", "count", "leftmost_colour",
                 "rightmost_colour")
# Every training scene is also described left to right: a dozen answer tokens that
# name each shape's colour and kind in order, the binding the one-word answers need
# (one answer token per record teaches it slowly; the 2-core demo has minutes).
TRAIN_EXTRA_KINDS = ("describe",)


@dataclasses.dataclass(frozen=True)
class DemoFiles:
  """Where `generate` put things; `qa[split]`, `captions[split]` are JSONL paths."""
  root: str
  image_folder: str
  qa: dict
  captions: dict


def scene_questions(scene: list[shapes.Shape], rng: np.random.Generator,
                    kinds=DEFAULT_KINDS) -> dict[str, tuple[str, str]]:
  """kind -> (question, one-word answer), for each kind that fits the scene."""
  left_to_right = sorted(scene, key=lambda s: s.box[0])
  count = {k: sum(s.kind == k for s in scene) for k in shapes.SHAPES}
  out = {}
  for kind in kinds:
    template = QUESTION_KINDS[kind]
    if kind == "colour_of_shape":
      unique = [s for s in scene if count[s.kind] == 1]
      if unique:
        s = unique[rng.integers(len(unique))]
        out[kind] = template.format(kind=s.kind), s.colour
    elif kind == "shape_of_colour":
      s = scene[rng.integers(len(scene))]
      out[kind] = template.format(colour=s.colour), s.kind
    elif kind == "count":
      out[kind] = template, NUMBERS[len(scene)]
    elif kind in ("leftmost_colour", "rightmost_colour") and len(scene) >= 2:
      s = left_to_right[0 if kind == "leftmost_colour" else -1]
      out[kind] = template, s.colour
    elif kind == "describe":
      out[kind] = template, shapes.caption(scene)
    elif kind == "exists":
      colour = str(rng.choice(list(shapes.COLOURS)))
      shape = str(rng.choice(shapes.SHAPES))
      if rng.random() < 0.5:  # Half the questions ask about a shape that is there.
        s = scene[rng.integers(len(scene))]
        colour, shape = s.colour, s.kind
      present = any(s.colour == colour and s.kind == shape for s in scene)
      out[kind] = template.format(colour=colour, kind=shape), ("yes" if present else "no")
    elif kind not in QUESTION_KINDS:
      raise ValueError(f"unknown question kind {kind!r}; expected one of {list(QUESTION_KINDS)}")
  return out


def _record(rid: str, image: str, question: str, answer: str, kind: str) -> dict:
  return {"id": rid, "image": image, "kind": kind, "conversations": [
      {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _split_records(root: str, split: str, n: int, seed: int, image_size: int,
                   questions_per_image: int, kinds,
                   extra_kinds=()) -> tuple[list[dict], list[dict]]:
  """Draws and saves the split's images; returns (qa records, caption records)."""
  folder = os.path.join(root, "images", split)
  os.makedirs(folder, exist_ok=True)
  qa, captions = [], []
  for i in range(n):
    rng = np.random.default_rng([seed, SPLITS.index(split), i])
    scene = shapes.sample_scene(rng, (image_size, image_size), side_fraction=SIDE_FRACTION,
                                grid=GRID, one_row=ONE_ROW)
    relpath = f"{split}/{i:06d}.png"
    shapes.render(scene, (image_size, image_size), BACKGROUND).save(
        os.path.join(root, "images", relpath), format="PNG", compress_level=1)
    questions = scene_questions(scene, rng, kinds)
    picked = list(rng.permutation(sorted(questions))[:questions_per_image])
    extra = scene_questions(scene, rng, extra_kinds)  # (those that fit the scene)
    picked += [k for k in extra_kinds if k not in picked and k in extra]
    questions.update(extra)
    for j, kind in enumerate(picked):
      question, answer = questions[kind]
      qa.append(_record(f"{split}-{i:06d}-{j}", relpath,
                        f"{text.IMAGE_TOKEN}\n{question}", answer, str(kind)))
    captions.append(_record(f"{split}-{i:06d}-c", relpath, CAPTION_PROMPT,
                            shapes.caption(scene), "describe"))
  return qa, captions


def write_jsonl(path: str, records) -> None:
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r, sort_keys=True) + "\n")


def generate(root: str, *, seed: int = 0, num_train: int = 2000, num_heldout: int = 200,
             image_size: int = 224, questions_per_image: int = 2,
             kinds=DEFAULT_KINDS, train_extra_kinds=TRAIN_EXTRA_KINDS,
             overwrite: bool = False) -> DemoFiles:
  """Writes the demo set under `root` (see the module docstring); returns its paths.

  num_train / num_heldout count images (scenes); each gets `questions_per_image`
  questions of distinct kinds (fewer when fewer kinds fit the scene) and a caption.
  A training scene also gets one record of each `train_extra_kinds` kind that fits it
  (e.g. colour_of_shape needs a kind that occurs once); held-out
  scenes do not (they are scored by exact match on one-word answers).
  A set already in `root` with the same arguments is reused unless `overwrite`.
  """
  kinds, train_extra_kinds = tuple(kinds), tuple(train_extra_kinds)
  for kind in kinds + train_extra_kinds:
    if kind not in QUESTION_KINDS:
      raise ValueError(f"unknown question kind {kind!r}; expected one of {list(QUESTION_KINDS)}")
  if image_size < 8 * GRID:
    raise ValueError(f"image_size {image_size} is too small for a {GRID}x{GRID} grid of "
                     f"shapes; use >= {8 * GRID}")
  args = dict(seed=seed, num_train=num_train, num_heldout=num_heldout,
              image_size=image_size, questions_per_image=questions_per_image,
              kinds=list(kinds), train_extra_kinds=list(train_extra_kinds), version=6)
  files = DemoFiles(root, os.path.join(root, "images"),
                    {s: os.path.join(root, f"{s}.jsonl") for s in SPLITS},
                    {s: os.path.join(root, f"captions_{s}.jsonl") for s in SPLITS})
  manifest = os.path.join(root, "manifest.json")
  if not overwrite and os.path.exists(manifest):
    with open(manifest) as f:
      if json.load(f) == args:
        return files
  os.makedirs(root, exist_ok=True)
  if os.path.exists(manifest):
    os.remove(manifest)  # Written last: its presence means the set is complete.
  for split, n in zip(SPLITS, (num_train, num_heldout)):
    extra = train_extra_kinds if split == "train" else ()
    qa, captions = _split_records(root, split, n, seed, image_size, questions_per_image,
                                  kinds, extra)
    write_jsonl(files.qa[split], qa)
    write_jsonl(files.captions[split], captions)
  with open(manifest, "w") as f:
    json.dump(args, f, indent=1)
  return files


def prepare(root: str, **kwargs) -> tuple[DemoFiles, str]:
  """`generate(root, **kwargs)`, then the QA splits as tfds ArrayRecord under root/tfds.

  Returns (files, data_dir) for `tfds_builder.data_source(data_dir, split)`. The
  ArrayRecord copy is rebuilt whenever the generated set changed.
  """
  os.makedirs(root, exist_ok=True)
  # Runs sharing a root (two jobs, or one job's processes on a shared disk) take turns:
  # the first writes, the others then find a matching set and reuse it.
  with open(os.path.join(root, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return _prepare(root, **kwargs)


def _prepare(root: str, **kwargs) -> tuple[DemoFiles, str]:
  from lavida_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top

  files = generate(root, **kwargs)
  data_dir = os.path.join(root, "tfds")
  stamp = os.path.join(data_dir, "manifest.json")
  with open(os.path.join(root, "manifest.json")) as f:
    manifest = f.read()
  built = ""
  if os.path.exists(stamp):
    with open(stamp) as f:
      built = f.read()
  if built != manifest:
    tfds_builder.build(files.qa, files.image_folder, data_dir, overwrite=True)
    with open(stamp, "w") as f:
      f.write(manifest)
  return files, data_dir


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- tokenizer --


def tokenizer_corpus() -> list[str]:
  """Every question, answer and caption the demo can produce, in both chat templates.

  Enumerated, not sampled, so the tokenizer does not depend on a seed.
  """
  colours, kinds = list(shapes.COLOURS), list(shapes.SHAPES)
  questions = [QUESTION_KINDS["count"], QUESTION_KINDS["leftmost_colour"],
               QUESTION_KINDS["rightmost_colour"], QUESTION_KINDS["describe"]]
  questions += [QUESTION_KINDS["colour_of_shape"].format(kind=k) for k in kinds]
  questions += [QUESTION_KINDS["shape_of_colour"].format(colour=c) for c in colours]
  questions += [QUESTION_KINDS["exists"].format(colour=c, kind=k)
                for c, k in itertools.product(colours, kinds)]
  answers = colours + kinds + list(NUMBERS) + ["yes", "no"]
  captions = []
  for n in (1, 2, 3):
    for combo in itertools.product(itertools.product(colours, kinds), repeat=n):
      if len({c for c, _ in combo}) == n:
        captions.append(" and ".join(f"a {c} {k}" for c, k in combo))
  captions = captions[::7]  # A spread of every word pair; all of them is ~5k strings.
  corpus = []
  for fmt in (text.format_llada, text.format_dream):
    for q, a in zip(itertools.cycle(questions), answers + captions):
      corpus.append(fmt([{"role": "user", "content": f"{text.IMAGE_TOKEN}\n{q}"},
                         {"role": "assistant", "content": a}], add_generation_prompt=False))
    corpus += [fmt([{"role": "user", "content": f"{text.IMAGE_TOKEN}\n{q}"}])
               for q in questions]
  corpus += ["[FIM][S][S]<|mdm_mask|><|endoftext|>" + " ".join(answers)]
  return corpus


def train_demo_tokenizer(path: str = TOKENIZER_PATH,
                         vocab_size: int = TOKENIZER_VOCAB_SIZE) -> text.Tokenizer:
  """(Re)trains the shipped demo tokenizer (deterministic) and writes it to `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return text.train_sentencepiece(tokenizer_corpus(), path, vocab_size,
                                  user_defined_symbols=SPECIAL_STRINGS)


def demo_tokenizer(path: str = TOKENIZER_PATH) -> text.Tokenizer:
  """The shipped demo tokenizer (sentencepiece)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"demo tokenizer {path} is missing; regenerate it with "
                            "lavida_jax.data.demo.train_demo_tokenizer()")
  return text.Tokenizer.from_sentencepiece(path)


def demo_special_tokens(template: str = "llada",
                        tokenizer: text.Tokenizer | None = None) -> text.SpecialTokens:
  """The demo tokenizer's ids for the mask, EOS (= pad) and BOS; `template` picks the
  end-of-turn string ("llada": `<|eot_id|>`, "dream": `<|im_end|>`)."""
  tokenizer = tokenizer or demo_tokenizer()
  ids = {s: tokenizer.token_to_id(s) for s in SPECIAL_STRINGS}
  missing = [s for s, i in ids.items() if i is None]
  if missing:
    raise ValueError(f"tokenizer {tokenizer.name} has no piece for {missing}")
  if template == "llada":
    return text.SpecialTokens(ids["<|mdm_mask|>"], ids["<|endoftext|>"],
                              ids["<|endoftext|>"], ids["<|startoftext|>"], "<|eot_id|>")
  if template == "dream":
    return text.SpecialTokens(ids["<|mdm_mask|>"], ids["<|endoftext|>"],
                              ids["<|endoftext|>"], None, "<|im_end|>")
  raise ValueError(f"unknown template {template!r}; expected 'llada' or 'dream'")


if __name__ == "__main__":
  tok = train_demo_tokenizer()
  print(f"wrote {TOKENIZER_PATH}: {tok}")
