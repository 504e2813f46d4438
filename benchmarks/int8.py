"""int8 weight-only inference (`load_pretrained(quantize="int8")`) against full precision
on a trained demo checkpoint (issue 15): parameter bytes, logits error, and held-out
exact match (one-word questions and captions) with the same decoding settings.

  python benchmarks/int8.py --workdir=/tmp/lavida_jax_demo [--num=500]

Bytes are counted in bfloat16 (the serving dtype on accelerators) and float32; the
forward passes run in float32 activations (XLA's CPU backend has no bf16 x bf16 ->
f32 dot for the attention scores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lavida_jax  # noqa: E402
from lavida_jax import evaluate, generate  # noqa: E402
from lavida_jax.data import demo  # noqa: E402
from lavida_jax.diffusion.sampler import SamplerConfig  # noqa: E402
from lavida_jax.models import quant  # noqa: E402


def lm_bytes(checkpoint: str, dtype: str, quantize) -> int:
  model = lavida_jax.load_pretrained(checkpoint, dtype=dtype, quantize=quantize)
  return quant.param_bytes(model.lm), quant.param_bytes(model)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="/tmp/lavida_jax_demo")
  ap.add_argument("--num", type=int, default=500)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "int8.json"))
  args = ap.parse_args()
  checkpoint = os.path.join(args.workdir, "checkpoints")
  data = os.path.join(args.workdir, "demo_data")
  out = {"checkpoint": checkpoint}
  for dtype in ("bfloat16", "float32"):
    full, q = lm_bytes(checkpoint, dtype, None), lm_bytes(checkpoint, dtype, "int8")
    out[f"bytes_{dtype}"] = dict(lm=full[0], lm_int8=q[0], model=full[1], model_int8=q[1],
                                 lm_ratio=round(q[0] / full[0], 4))

  models = {None: lavida_jax.load_pretrained(checkpoint),
            "int8": lavida_jax.load_pretrained(checkpoint, quantize="int8")}
  tok = generate.load_tokenizer_for(checkpoint)
  system = generate.system_prompt_for(checkpoint)
  qa = evaluate.qa_pairs(demo.read_jsonl(os.path.join(data, "heldout.jsonl"))[:args.num],
                         os.path.join(data, "images"))
  caps = evaluate.qa_pairs(
      demo.read_jsonl(os.path.join(data, "captions_heldout.jsonl"))[:args.num],
      os.path.join(data, "images"))

  # logits of the whole prompt + a masked canvas, both models, the same inputs
  errs = []
  for req, _ in qa[:64]:
    prompt = generate.prompt_ids(models[None], tok, req, system)
    x = {k: generate.embed_prompts(m, [prompt], generate.bucket(
        generate.prompt_length(m, *prompt))) for k, m in models.items()}
    logits = {k: m.lm.logits_from_hidden(m.lm.hidden(*x[k])) for k, m in models.items()}
    ref = logits[None]
    errs.append(float(jnp.abs(logits["int8"] - ref).max() / jnp.abs(ref).max()))
  out["logits_rel_err"] = dict(median=float(np.median(errs)), max=float(np.max(errs)),
                               prompts=len(errs))

  for name, pairs, length in (("one_word", qa, 4), ("captions", caps, 12)):
    cfg = SamplerConfig(gen_length=length, block_length=length, steps=length,
                        mask_id=models[None].cfg.lm.mask_id)
    for key, model in models.items():
      gen = generate.Generator(model, tok, cfg, "prefix", system_prompt=system)
      answers = generate.run_generation(gen, [r for r, _ in pairs], 50)
      exact = np.mean([a.text == want for a, (_, want) in zip(answers, pairs)])
      out[f"{name}_exact/{key or 'fp32'}"] = round(float(exact), 4)
  print(json.dumps(out, indent=1))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
