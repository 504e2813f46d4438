"""What a training run shows at its end: a short table of its results and a PNG grid
of held-out images with the model's answers, right ones framed green, wrong red."""
from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@dataclasses.dataclass
class Example:
  """One held-out answer: the image (a path or PIL image), question, answer, reference."""
  image: object
  question: str
  answer: str
  reference: str
  correct: bool


def _pct(x) -> str:
  return f"{100 * float(x):5.1f}%"


def summary_table(summary: dict) -> str:
  """The run's summary (train.train_and_evaluate's dict + eval metrics) as lines:
  step, loss, wall time and skipped records, then exact match overall and per kind
  (and captions with CIDEr / BLEU-4 once they exist), then decoding speed."""
  wall = float(summary.get("wall_s", 0))
  skipped = {k: v for k, v in (summary.get("skipped") or {}).items() if v}
  loss = summary.get("loss")
  lines = [f"step {summary.get('step')}"
           + (f" | loss {loss:.4f}" if loss is not None else "")
           + f" | {int(wall // 60)} min {wall % 60:.0f} s"
           + " | skipped records: "
           + (", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else "none")]
  rows = []
  if "exact_match" in summary:
    rows.append(("one-word answers", summary.get("n", ""), _pct(summary["exact_match"]), ""))
    for key in sorted(k for k in summary if k.startswith("exact_match/")):
      rows.append(("  " + key.split("/", 1)[1].replace("_", " "), "", _pct(summary[key]), ""))
  if "caption/exact_match" in summary:
    extra = " ".join(f"{name} {summary[k]:.3f}" for name, k in
                     (("CIDEr", "caption/cider"), ("BLEU-4", "caption/bleu4")) if k in summary)
    rows.append(("captions", summary.get("caption/n", ""),
                 _pct(summary["caption/exact_match"]), extra))
  if rows:
    width = max(len(r[0]) for r in rows) + 2
    lines.append(f"{'held-out':<{width}}{'n':>5}  exact match")
    lines += [f"{name:<{width}}{n!s:>5}  {pct:>11}  {extra}".rstrip()
              for name, n, pct, extra in rows]
  if "nfe" in summary:
    seconds = summary.get("seconds_per_sample", 0)  # batched: often a few ms
    per = f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1e3:.1f} ms"
    lines.append(f"decoding: {summary['nfe']:.1f} forward passes and {per} per answer")
  return "\n".join(lines)


def answer_grid(examples: list[Example], path: str, columns: int = 4, cell: int = 160) -> str:
  """Saves a grid PNG: each held-out image scaled to `cell` px, under it the question,
  the model's answer and (when wrong) the reference; a green frame when right, red
  when wrong. Returns `path`."""
  font = ImageFont.load_default()
  text_h, pad = 58, 6
  rows = max(1, -(-len(examples) // columns))
  grid = Image.new("RGB", (columns * (cell + 2 * pad), rows * (cell + text_h + 2 * pad)),
                   "white")
  draw = ImageDraw.Draw(grid)
  for i, ex in enumerate(examples):
    x = (i % columns) * (cell + 2 * pad) + pad
    y = (i // columns) * (cell + text_h + 2 * pad) + pad
    image = ex.image if isinstance(ex.image, Image.Image) else Image.open(ex.image)
    grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
    colour = (0, 160, 0) if ex.correct else (210, 0, 0)
    draw.rectangle([x - 3, y - 3, x + cell + 2, y + cell + 2], outline=colour, width=3)
    mark = "right" if ex.correct else f"wrong (ref: {ex.reference})"
    lines = (textwrap.wrap(f"Q: {ex.question}", 28)[:2]
             + textwrap.wrap(f"A: {ex.answer or '(empty)'}", 28)[:1]
             + textwrap.wrap(mark, 28)[:1])
    for k, line in enumerate(lines):
      draw.text((x, y + cell + 4 + 13 * k), line, fill=colour if k >= len(lines) - 2
                else (0, 0, 0), font=font)
  grid.save(path)
  return path


def heldout_examples(pairs, results, normalize) -> list[Example]:
  """(Request, reference) pairs and their results -> Examples (failed requests left out)."""
  out = []
  for (req, ref), res in zip(pairs, results):
    if res is None or res.error is not None or req.image is None:
      continue
    ref = ref if isinstance(ref, str) else str(np.asarray(ref).tolist())
    out.append(Example(req.image, req.prompt.replace("<image>", "").strip(), res.text, ref,
                       normalize(res.text) == normalize(ref)))
  return out
