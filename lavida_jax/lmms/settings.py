"""Generation kwargs of LaViDa's and LLaDA-V's lmms-eval harnesses -> our decoding.

A task's `generation_kwargs` (and `--gen_kwargs`) arrive as a dict. The names are
the papers' harnesses', so their task settings run unchanged:

- LaViDa (`eval/lmms_eval/models/llava_llada.py`, `llada/generate.py`):
  `max_new_tokens` is the canvas length L (default 256), `block_length` defaults to
  min(128, L), steps per block are `step_per_block` (capped at the block) or
  L / blocks, times `step_ratio`; `prefix_lm=True` is the prefix KV cache;
  `schedule` + `schedule__shift` (LaViDa's names); Dream's `alg` (topk_margin ...).
- LLaDA-V: `gen_length`, `steps` (over all blocks), `block_length`.
- Ours: `decoder`, `threshold`, `factor`, `lookahead`, `cache`, `confidence`.

HF-style keys the diffusion sampler has no use for (`do_sample`, `top_p`,
`num_beams`, ...) are dropped; `until` is returned for the stop handling.
"""
from __future__ import annotations

import dataclasses

from lavida_jax.diffusion import sampler as sampler_lib

# Dream's `alg` names (its diffusion_generate) -> our confidence rules.
DREAM_ALGS = {"topk_margin": "margin", "entropy": "entropy", "maskgit_plus": "low_confidence",
              "origin": "random"}
IGNORED = frozenset({"do_sample", "top_p", "top_k", "num_beams", "use_cache",
                     "image_aspect_ratio", "repetition_penalty", "max_length"})
CACHE_NAMES = ("none", "prefix", "dual")


@dataclasses.dataclass(frozen=True)
class Decoding:
  """Model-level defaults (the `--model_args`), overridden per task by gen_kwargs."""
  gen_length: int = 32
  block_length: int | None = None  # None: min(128, gen_length), as LaViDa
  steps: int | None = None  # over all blocks; None: one token per step
  schedule: str = "none"  # LaViDa's harness passes no schedule: LLaDA's uniform rule
  shift: float = 1 / 3
  decoder: str = "fixed"
  threshold: float = 0.9
  factor: float = 1.0
  lookahead: int = 0  # fixed decoder, prefix cache: the same tokens in fewer passes
  confidence: str = "low_confidence"
  cache: str = "prefix"
  temperature: float = 0.0


def decoding_from_args(args: dict) -> Decoding:
  """model_args (strings from the command line, or numbers) -> Decoding."""
  out = {}
  for k, v in args.items():
    kind = Decoding.__dataclass_fields__[k].type
    try:
      out[k] = (None if v in (None, "None", "none") and "None" in kind else
                int(v) if kind.startswith("int") else float(v) if kind == "float" else str(v))
    except ValueError:
      raise ValueError(f"model_arg {k}={v!r}: expected {kind}") from None
  return Decoding(**out)


def as_bool(v) -> bool:
  if isinstance(v, str):
    if v.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
      raise ValueError(f"expected a boolean, got {v!r}")
    return v.strip().lower() in ("true", "1", "yes")
  return bool(v)


def resolve(gen_kwargs: dict, base: Decoding, mask_id: int):
  """-> (SamplerConfig, cache mode, until strings, unknown keys) for one task's
  gen_kwargs (unknown keys: the caller warns about them)."""
  kw = dict(gen_kwargs or {})
  until = kw.pop("until", None)
  until = [until] if isinstance(until, str) else list(until or [])
  for k in IGNORED:
    kw.pop(k, None)
  length = int(kw.pop("max_new_tokens", kw.pop("gen_length", base.gen_length)))
  block = kw.pop("block_length", None)
  block = int(block) if block is not None else (base.block_length or min(128, length))
  block = min(block, length)
  if length % block:
    raise ValueError(f"gen length {length} is not a multiple of block_length {block}")
  blocks = length // block
  per_block = kw.pop("step_per_block", None)
  steps = kw.pop("steps", None)
  ratio = kw.pop("step_ratio", None)
  if per_block is not None and ratio is not None:
    raise ValueError("pass step_per_block or step_ratio, not both (as LaViDa's generate)")
  if per_block is not None:
    per_block = min(int(per_block), block)
  elif steps is not None or (base.steps is not None and ratio is None):
    per_block = max(int(steps if steps is not None else base.steps) // blocks, 1)
  else:
    per_block = block
  if ratio is not None:
    per_block = max(int(per_block * float(ratio)), 1)  # LaViDa: int(steps * step_ratio)
  cache = kw.pop("cache", base.cache)
  if "prefix_lm" in kw:
    cache = "prefix" if as_bool(kw.pop("prefix_lm")) else "none"
  if cache not in CACHE_NAMES:
    raise ValueError(f"unknown cache {cache!r}; expected one of {', '.join(CACHE_NAMES)}")
  confidence = kw.pop("confidence", base.confidence)
  alg = kw.pop("alg", None)
  if alg is not None:
    if alg not in DREAM_ALGS:
      raise ValueError(f"unknown alg {alg!r}; expected one of {', '.join(DREAM_ALGS)}")
    confidence = DREAM_ALGS[alg]
  schedule = kw.pop("schedule", base.schedule)
  schedule = "none" if schedule in (None, "None", "null") else schedule
  shift = float(kw.pop("schedule__shift", kw.pop("shift", base.shift)))
  cfg = sampler_lib.SamplerConfig(
      gen_length=length, block_length=block, steps=per_block * blocks, schedule=schedule,
      alpha=shift, temperature=float(kw.pop("temperature", base.temperature) or 0.0),
      confidence=confidence, mask_id=mask_id, decoder=kw.pop("decoder", base.decoder),
      threshold=float(kw.pop("threshold", base.threshold)),
      factor=float(kw.pop("factor", base.factor)),
      lookahead=int(kw.pop("lookahead", base.lookahead)))
  return cfg, cache, until, sorted(kw)  # the last: keys nobody understood


def cut_at(text: str, until) -> str:
  """The text before the first stop string (lmms-eval's `until`)."""
  for stop in until:
    if stop:
      text = text.split(stop, 1)[0]
  return text
