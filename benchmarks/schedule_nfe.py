"""Held-out accuracy by transfer schedule x NFE on a trained checkpoint (issue 4, item 7).

For each schedule (shift with alpha 1/3 and 3, none = LLaDA's uniform rule, cosine) and each NFE
(100/50/25% of the canvas length L, one block): exact match on the held-out
questions with the prefix-cache sampler, NFE per sample and seconds per sample.
The goal it checks: shift alpha=1/3 at NFE 50% keeps >= 95% of the NFE-100% accuracy.

  python -m lavida_jax.main                     # trains the CPU demo (its checkpoint)
  python benchmarks/schedule_nfe.py --checkpoint=/tmp/lavida_jax_demo/checkpoints/800 \
      --data=/tmp/lavida_jax_demo/demo_data/heldout.jsonl --gen_length=8
"""
from __future__ import annotations

import argparse
import json
import os

import lavida_jax
from lavida_jax import evaluate, generate
from lavida_jax.diffusion.sampler import SamplerConfig

SCHEDULES = (("shift", 1 / 3), ("shift", 3.0), ("none", 1.0), ("cosine", 1.0))
NFE_FRACTIONS = (1.0, 0.5, 0.25)


def run(checkpoint: str, data: str, gen_length: int, num_examples: int, batch_size: int):
  model = lavida_jax.load_pretrained(checkpoint)
  tokenizer = generate.load_tokenizer_for(checkpoint)
  system_prompt = generate.system_prompt_for(checkpoint)
  records = evaluate.read_records(data)[:num_examples or None]
  pairs = evaluate.qa_pairs(records, os.path.join(os.path.dirname(data), "images"))
  rows = []
  for schedule, alpha in SCHEDULES:
    for frac in NFE_FRACTIONS:
      steps = max(1, round(gen_length * frac))
      cfg = SamplerConfig(gen_length=gen_length, block_length=gen_length, steps=steps,
                          schedule=schedule, alpha=alpha, mask_id=model.cfg.lm.mask_id)
      gen = generate.Generator(model, tokenizer, cfg, True, system_prompt)
      evaluate.evaluate(gen, pairs[:batch_size], "vqa", batch_size)  # compile, untimed
      m = evaluate.evaluate(gen, pairs, "vqa", batch_size)
      rows.append(dict(schedule=schedule, alpha=alpha, steps=steps, nfe_fraction=frac, **m))
      print(json.dumps(rows[-1]), flush=True)
  return rows


def table(rows) -> str:
  """Markdown: one row per schedule, exact match at each NFE, and the 50%/100% ratio."""
  lines = ["| schedule | " + " | ".join(f"NFE {int(f * 100)}%" for f in NFE_FRACTIONS)
           + " | 50% / 100% |", "|---" * (len(NFE_FRACTIONS) + 2) + "|"]
  for schedule, alpha in SCHEDULES:
    acc = {r["nfe_fraction"]: r for r in rows if (r["schedule"], r["alpha"]) == (schedule, alpha)}
    name = f"shift α={alpha:.3g}" if schedule == "shift" else schedule
    cells = [f"{acc[f]['exact_match']:.3f} ({acc[f]['steps']} steps)" for f in NFE_FRACTIONS]
    ratio = acc[0.5]["exact_match"] / max(acc[1.0]["exact_match"], 1e-9)
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.3f} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--data", required=True, help="held-out LLaVA JSONL (images in ./images)")
  p.add_argument("--gen_length", type=int, default=8)
  p.add_argument("--num_examples", type=int, default=0, help="0: all")
  p.add_argument("--batch_size", type=int, default=50)
  args = p.parse_args()
  rows = run(args.checkpoint, args.data, args.gen_length, args.num_examples, args.batch_size)
  print(table(rows))


if __name__ == "__main__":
  main()
