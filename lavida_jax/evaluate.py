"""Evaluation: short-answer VQA, multiple choice, captioning, constraints (SPEC §11).

Every figure comes with the number of forward passes (NFE) and seconds per
sample. Records are LLaVA-format (`{"image", "conversations": [human, gpt]}`),
scored against the first gpt turn.

CLI: python -m lavida_jax.evaluate --checkpoint=DIR --task=vqa --data=heldout.jsonl
"""
from __future__ import annotations

import json
import os
import re
import string
import time
from typing import Sequence

import numpy as np

from lavida_jax import generate

TASKS = ("vqa", "multiple_choice", "caption", "constraints")


def normalize_answer(s: str) -> str:
  """Lower case, no punctuation, no articles, single spaces (VQA-style)."""
  s = s.lower().strip()
  s = "".join(ch for ch in s if ch not in set(string.punctuation))
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def choice_letter(s: str) -> str | None:
  """The first standalone option letter A-Z in an answer ('B', '(b)', 'B. cat')."""
  m = re.search(r"\b([A-Za-z])\b", s.strip())
  return m.group(1).upper() if m else None


def qa_pairs(records, image_folder: str | None = None):
  """Records -> (Request, reference) pairs.

  LLaVA records (`conversations`: the first human turn is the question, the first
  gpt turn the reference) or flat ones (`prompt`, `answer` or `references`, and
  for constraints a `draft`, which is then the reference).
  """
  out = []
  for r in records:
    if "conversations" in r:
      conv = r["conversations"]
      question, answer = conv[0]["value"], conv[1]["value"]
    else:
      question = r["prompt"]
      answer = r.get("draft") or r.get("references") or r.get("answer")
    image = r.get("image")
    if image is not None and image_folder and not os.path.isabs(image):
      image = os.path.join(image_folder, image)
    out.append((generate.Request(question, image, r.get("draft")), answer))
  return out


# Batches of requests, a bad one isolated with its error (it lives with the Generator,
# which imports nothing from here: generate -> evaluate only).
run_generation = generate.run_generation


def constraint_segments(draft: str, mask_token: str = "<|mdm_mask|>",
                        fim_token: str = "[FIM]") -> list[str]:
  """The fixed text pieces of an infilling draft, in order (its constraints)."""
  pieces = re.split(f"(?:{re.escape(mask_token)}|{re.escape(fim_token)})+", draft)
  return [p.strip() for p in pieces if p.strip()]


def constraint_scores(outputs: Sequence[str], drafts: Sequence[str]) -> dict:
  """Sentence level: the fraction of a draft's fixed pieces found in order in the
  output; sample level: the fraction of outputs meeting every constraint."""
  per_piece, per_sample = [], []
  for out, draft in zip(outputs, drafts):
    pos, ok = 0, []
    norm_out = " ".join(out.split())
    for piece in constraint_segments(draft):
      at = norm_out.find(" ".join(piece.split()), pos)
      ok.append(at >= 0)
      if at >= 0:
        pos = at + len(piece)
    per_piece += ok
    per_sample.append(all(ok))
  return {"constraint_sentence": float(np.mean(per_piece)) if per_piece else 0.0,
          "constraint_sample": float(np.mean(per_sample)) if per_sample else 0.0}


def score(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict:
  if task == "vqa":
    hits = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
    return {"exact_match": float(np.mean(hits)) if hits else 0.0}
  if task == "multiple_choice":
    hits = [choice_letter(p) == choice_letter(r) for p, r in zip(predictions, references)]
    return {"accuracy": float(np.mean(hits)) if hits else 0.0}
  if task == "caption":
    return caption_scores(predictions, references)
  if task == "constraints":  # references are the drafts
    return constraint_scores(predictions, references)
  raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def caption_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
  """CIDEr and BLEU-4 with pycocoevalcap (whitespace/punctuation tokenizer, no Java)."""
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  tok = lambda s: " ".join(normalize_answer(s).split()) or "empty"
  res = {i: [tok(p)] for i, p in enumerate(predictions)}
  gts = {i: [tok(r)] if isinstance(r, str) else [tok(x) for x in r]
         for i, r in enumerate(references)}
  cider, _ = Cider().compute_score(gts, res)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  return {"cider": float(cider), "bleu4": float(bleu[3])}


def evaluate(generator: generate.Generator, pairs, task: str = "vqa",
             batch_size: int = 8, groups: Sequence[str] | None = None) -> dict:
  """-> {metric..., n, errors, nfe, tokens_per_forward, seconds_per_sample, answers_per_s}.

  groups: a label per pair (e.g. the question kind); adds "metric/label" for each.
  """
  t0 = time.perf_counter()
  results = run_generation(generator, [r for r, _ in pairs], batch_size)
  keep = [i for i, res in enumerate(results) if res.error is None]
  ok = [(results[i], pairs[i][1]) for i in keep]
  metrics = score(task, [r.text for r, _ in ok], [ref for _, ref in ok])
  for g in sorted(set(groups or ())):
    mine = [i for i in keep if groups[i] == g]
    if not mine:  # every request of the group failed: counted in `errors`
      continue
    sub = score(task, [results[i].text for i in mine], [pairs[i][1] for i in mine])
    metrics.update({f"{k}/{g}": v for k, v in sub.items()})
  metrics.update(n=len(ok), errors=len(results) - len(ok),
                 **speed([r for r, _ in ok], time.perf_counter() - t0, len(pairs),
                         getattr(getattr(generator, "cfg", None), "gen_length", 0),
                         int(getattr(generator, "prefix_cache", False))))
  return metrics


def speed(results: Sequence[generate.Result], wall: float, n: int, gen_length: int,
          prefill: int) -> dict:
  """Speed beside quality (SPEC §11, §14): NFE per answer (the prefill counted),
  tokens per forward (canvas positions per denoising pass, as benchmarks report
  it), wall seconds per answer and answers per second over `n` requests."""
  nfe = float(np.mean([r.nfe for r in results])) if results else 0.0
  passes = nfe - prefill
  return {"nfe": nfe, "tokens_per_forward": gen_length / passes if passes > 0 else 0.0,
          "seconds_per_sample": wall / max(n, 1), "answers_per_s": n / wall if wall > 0 else 0.0}


def read_records(path: str) -> list[dict]:
  with open(path) as f:
    if path.endswith(".jsonl"):
      return [json.loads(line) for line in f if line.strip()]
    return json.load(f)


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  import lavida_jax

  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  checkpoint = generate.resolve_checkpoint(FLAGS.checkpoint)
  model = lavida_jax.load_pretrained(checkpoint, dtype=FLAGS.dtype, quantize=FLAGS.quantize)
  tokenizer = generate.load_tokenizer_for(checkpoint, FLAGS.tokenizer)
  system_prompt = generate.system_prompt_for(checkpoint)
  pairs = qa_pairs(read_records(FLAGS.data), FLAGS.image_folder)[:FLAGS.num_examples or None]
  report = {}
  fixed = FLAGS.decoder == "fixed"  # an NFE sweep; the adaptive decoders pick their steps
  for steps in map(int, FLAGS.steps) if fixed else [FLAGS.gen_length]:
    try:
      cfg, cache = generate.decoding_from_flags(FLAGS, model.cfg.lm.mask_id, steps)
    except ValueError as e:
      raise SystemExit(str(e)) from None
    gen = generate.Generator(model, tokenizer, cfg, cache, system_prompt)
    name = f"steps={steps}" if fixed else f"{cfg.decoder}"
    report[f"{name},cache={cache}"] = evaluate(gen, pairs, FLAGS.task, FLAGS.batch_size)
  print(json.dumps(report, indent=1))


def _flags():
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "Hugging Face or Orbax checkpoint, or a hub id "
                      "(org/name).", required=True)
  flags.DEFINE_enum("task", "vqa", list(TASKS), "What to score.")
  flags.DEFINE_string("data", None, "Records (JSON/JSONL).", required=True)
  flags.DEFINE_string("image_folder", None, "Root of relative image paths.")
  flags.DEFINE_string("tokenizer", None, "Tokenizer (default: beside the checkpoint).")
  flags.DEFINE_integer("num_examples", 0, "0: all.")
  flags.DEFINE_integer("batch_size", 8, "Requests per batch.")
  generate.define_decoding_flags(steps_list=True)
  flags.DEFINE_string("dtype", "float32", "Parameter dtype.")
  generate.define_quantize_flag()


if __name__ == "__main__":
  from lavida_jax import cli
  _flags()
  cli.run(main)
