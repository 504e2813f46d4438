"""Speed/quality frontier of the decoders x caches on a trained checkpoint (issue 12).

For each decoder (fixed at 3 step counts, threshold at 4 thresholds, factor) and each
cache (prefix, dual), and for the fixed decoder with each --lookahead over the prefix
cache: held-out caption exact match and CIDEr, one-word exact match, NFE per answer
(the prefill included), tokens per forward (canvas positions decided per denoising
pass), latency per answer at batch 1 (the whole call, and its denoising program alone)
and answers/s at batch 16.

Quality is measured once, at batch 16: a row's tokens never depend on its batch-mates
(tests/test_decoders.py, tests/test_generate.py), so batch 1 gives the same answers.
Latency is the median seconds per request at batch 1 (prompt, vision, prefill and
sampling) over --latency_n captions after a warm-up; throughput is answers/s over
the whole caption set at batch 16. A JSON, a markdown table and a PNG plot (caption
exact match and CIDEr against latency) are written to --out.

  python -m lavida_jax.main                      # the demo checkpoint (README)
  python benchmarks/decode_frontier.py --workdir=/tmp/lavida_jax_demo --out=benchmarks/results
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import numpy as np

import lavida_jax
from lavida_jax import evaluate, generate
from lavida_jax.diffusion import sampler as sampler_lib
from lavida_jax.diffusion.sampler import SamplerConfig

CACHES = ("prefix", "dual")


def decoders(gen_length: int):
  """(label, SamplerConfig fields) of every decoder point."""
  out = [(f"fixed {s}", dict(decoder="fixed", steps=s))
         for s in (gen_length, gen_length // 2, gen_length // 4)]
  out += [(f"threshold {t}", dict(decoder="threshold", threshold=t))
          for t in (0.95, 0.9, 0.8, 0.7)]
  out += [(f"factor {f}", dict(decoder="factor", factor=f)) for f in (1.0, 2.0)]
  return out


def run_batched(gen, pairs, batch_size: int):
  """-> (results, wall seconds) over all pairs in batches (first batch compiled apart)."""
  gen([r for r, _ in pairs[:batch_size]])  # compile this batch shape
  t0 = time.perf_counter()
  results = evaluate.run_generation(gen, [r for r, _ in pairs], batch_size)
  return results, time.perf_counter() - t0


def latency(gen, pairs, n: int) -> tuple[float, float]:
  """Median seconds per request at batch 1: the whole call, and its denoising alone
  (the sampler program; the rest is the prompt: tokens, image, vision, prefill)."""
  gen([pairs[0][0]])  # compile
  calls, denoising = [], []
  for req, _ in pairs[:n]:
    t0 = time.perf_counter()
    jax.block_until_ready(gen([req]))
    calls.append(time.perf_counter() - t0)
    prompts = [generate.prompt_ids(gen.model, gen.tokenizer, req, gen.system_prompt)]
    length = generate.bucket(generate.prompt_length(gen.model, *prompts[0]))
    ops = gen._prepare(gen.state, **generate.pack_prompts(gen.model, prompts, length))
    canvas0 = gen.canvas([req])
    counts = sampler_lib.transfer_schedule(canvas0, gen.cfg)
    jax.block_until_ready(ops)
    t0 = time.perf_counter()
    jax.block_until_ready(gen._sample(canvas0, counts, jax.random.key(0), gen.lm_state, *ops))
    denoising.append(time.perf_counter() - t0)
  return statistics.median(calls), statistics.median(denoising)


def point(model, tokenizer, system_prompt, base: SamplerConfig, cache: str, fields: dict,
          captions, questions, args) -> dict:
  cfg = dataclasses.replace(base, **fields)
  fields = dict(fields, lookahead=cfg.lookahead)
  gen = generate.Generator(model, tokenizer, cfg, cache, system_prompt)
  res, wall = run_batched(gen, captions, args.batch_size)
  preds, refs = [r.text for r in res], [ref for _, ref in captions]
  cap = evaluate.score("caption", preds, refs)
  exact = evaluate.score("vqa", preds, refs)["exact_match"]
  qcfg = dataclasses.replace(cfg, gen_length=args.question_length,
                             block_length=args.question_length,
                             steps=min(cfg.steps, args.question_length))
  qgen = generate.Generator(model, tokenizer, qcfg, cache, system_prompt)
  qres, _ = run_batched(qgen, questions, args.batch_size)
  one_word = evaluate.score("vqa", [r.text for r in qres], [ref for _, ref in questions])
  nfe = float(np.mean([r.nfe for r in res]))
  passes = nfe - 1  # the prefill is not a denoising pass
  return dict(cache=cache, caption_exact=exact, cider=cap["cider"], bleu4=cap["bleu4"],
              one_word_exact=one_word["exact_match"], nfe=nfe,
              tokens_per_forward=cfg.gen_length / passes,
              **dict(zip(("latency_s", "denoise_s"), latency(gen, captions, args.latency_n))),
              answers_per_s=len(captions) / wall, n_captions=len(captions),
              n_questions=len(questions), **fields)


def table(rows) -> str:
  head = ("| decoder | cache | caption exact | CIDEr | one-word exact | NFE | tokens/forward "
          "| latency (batch 1) | speedup | denoising (batch 1) | speedup | answers/s (batch 16) |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|---|")
  base = next(r for r in rows if r["label"] == rows[0]["label"] and r["cache"] == "prefix")
  lines = [head]
  for r in rows:
    la = f", lookahead {r['lookahead']}" if r.get("lookahead") else ""
    lines.append(f"| {r['label']}{la} | {r['cache']} | {r['caption_exact']:.3f} | {r['cider']:.3f} "
                 f"| {r['one_word_exact']:.3f} | {r['nfe']:.1f} | {r['tokens_per_forward']:.2f} "
                 f"| {r['latency_s'] * 1e3:.1f} ms | {base['latency_s'] / r['latency_s']:.2f}x "
                 f"| {r['denoise_s'] * 1e3:.2f} ms | {base['denoise_s'] / r['denoise_s']:.2f}x "
                 f"| {r['answers_per_s']:.1f} |")
  return "\n".join(lines)


def _short(r) -> str:
  kind, value = r["label"].split()
  la = f"+{r['lookahead']}" if r.get("lookahead") else ""
  return {"fixed": f"K={value}{la}", "threshold": f"τ={value}", "factor": f"f={value}"}[kind]


def plot(rows, path: str, title: str):
  """Caption exact match against the latency of a whole call and of its denoising."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
  colours = {"fixed": "tab:blue", "threshold": "tab:orange", "factor": "tab:green"}
  exact = [r["caption_exact"] for r in rows]
  for ax, key, name in zip(axes, ("latency_s", "denoise_s"),
                           ("whole call", "denoising program alone")):
    for i, r in enumerate(rows):
      kind = r["label"].split()[0]
      marker = "s" if r.get("lookahead") else "o" if r["cache"] == "prefix" else "^"
      ax.scatter(r[key] * 1e3, r["caption_exact"], c=colours[kind], s=55, alpha=0.85,
                 marker=marker)
      ax.annotate(_short(r), (r[key] * 1e3, r["caption_exact"]), fontsize=7,
                  rotation=60, xytext=(2, 4 + 7 * (i % 2)), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per answer at batch 1, {name} (log)")
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel("held-out caption exact match")
  axes[0].set_ylim(min(exact) - 0.02, max(exact) + 0.02)
  handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=k) for k, c in colours.items()]
  handles += [plt.Line2D([], [], color="grey", marker=m, ls="", label=f"{c} cache")
              for c, m in (("prefix", "o"), ("dual", "^"))]
  handles.append(plt.Line2D([], [], color="grey", marker="s", ls="",
                            label="prefix cache + lookahead (K=..+J)"))
  axes[1].legend(handles=handles, loc="lower right", fontsize=8)
  fig.suptitle(title + " (K steps, threshold τ, factor f, lookahead J)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="/tmp/lavida_jax_demo",
                  help="a demo run: checkpoints/ and demo_data/")
  ap.add_argument("--checkpoint", default=None, help="default: WORKDIR/checkpoints")
  ap.add_argument("--captions", default=None,
                  help="held-out caption records (default: WORKDIR/demo_data/captions_heldout.jsonl)")
  ap.add_argument("--questions", default=None,
                  help="held-out one-word questions (default: WORKDIR/demo_data/heldout.jsonl)")
  ap.add_argument("--gen_length", type=int, default=32)
  ap.add_argument("--block_length", type=int, default=8)
  ap.add_argument("--question_length", type=int, default=4)
  ap.add_argument("--num_captions", type=int, default=500)
  ap.add_argument("--num_questions", type=int, default=200)
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--latency_n", type=int, default=50)
  ap.add_argument("--lookahead", default="1,2",
                  help="the fixed decoder's lookaheads (> 0: prefix cache only)")
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--replot", action="store_true", help="only redraw OUT's plot from its JSON")
  args = ap.parse_args()
  if args.replot:
    with open(os.path.join(args.out, "decode_frontier.json")) as f:
      saved = json.load(f)
    a = saved["args"]
    plot(saved["rows"], os.path.join(args.out, "decode_frontier.png"),
         f"{saved['rows'][0]['n_captions']} held-out captions, L={a['gen_length']}, "
         f"block {a['block_length']}, cpu")
    return

  data = os.path.join(args.workdir, "demo_data")
  checkpoint = args.checkpoint or os.path.join(args.workdir, "checkpoints")
  model = lavida_jax.load_pretrained(checkpoint)
  tokenizer = generate.load_tokenizer_for(checkpoint)
  system_prompt = generate.system_prompt_for(checkpoint)
  images = os.path.join(data, "images")
  captions = evaluate.qa_pairs(evaluate.read_records(
      args.captions or os.path.join(data, "captions_heldout.jsonl")), images)[:args.num_captions]
  questions = evaluate.qa_pairs(evaluate.read_records(
      args.questions or os.path.join(data, "heldout.jsonl")), images)[:args.num_questions]
  base = SamplerConfig(gen_length=args.gen_length, block_length=args.block_length,
                       steps=args.gen_length, mask_id=model.cfg.lm.mask_id)
  print(f"backend={jax.default_backend()} checkpoint={checkpoint} captions={len(captions)} "
        f"questions={len(questions)} L={args.gen_length} block={args.block_length}", flush=True)
  rows = []
  points = [(label, fields, cache) for label, fields in decoders(args.gen_length)
            for cache in CACHES]
  points += [(label, dict(fields, lookahead=j), "prefix")
             for label, fields in decoders(args.gen_length) if fields["decoder"] == "fixed"
             for j in (int(v) for v in args.lookahead.split(",")) if j]
  for label, fields, cache in points:
    r = dict(label=label, **point(model, tokenizer, system_prompt, base, cache, fields,
                                  captions, questions, args))
    rows.append(r)
    print(json.dumps(r), flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "decode_frontier.json"), "w") as f:
    json.dump(dict(args=vars(args), rows=rows), f, indent=1)
  md = table(rows)
  with open(os.path.join(args.out, "decode_frontier.md"), "w") as f:
    f.write(md + "\n")
  plot(rows, os.path.join(args.out, "decode_frontier.png"),
       f"{len(captions)} held-out captions, L={args.gen_length}, block {args.block_length}, "
       f"{jax.default_backend()}")
  print(md)


if __name__ == "__main__":
  main()
