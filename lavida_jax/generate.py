"""Answer questions about images with the diffusion sampler (SPEC §7).

Prompt (chat template, `<image>` spliced) -> left-padded to a length bucket ->
either a prefix KV cache (Prefix-DLM: prefill once, each step runs only the L
canvas positions) or the full sequence every step (Full-DLM) -> one jitted
`diffusion.sampler` scan -> ids -> text.

Left padding puts every prompt's end next to the canvas, so Dream's shifted
logits (canvas token 0 comes from the last prompt position) need no per-row
gather; padded keys are masked and positions count real tokens only, so a
row's answer never depends on its batch-mates.

CLI: python -m lavida_jax.generate --checkpoint=DIR --image=FILE --prompt="..."
     python -m lavida_jax.generate --checkpoint=DIR --requests=in.jsonl --output=out.jsonl
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavida_jax import image as image_lib
from lavida_jax import text as text_lib
from lavida_jax.diffusion import sampler as sampler_lib
from lavida_jax.models.lavida import IMAGE_TOKEN_ID, LaViDa

PREFIX_BUCKETS = (64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class Request:
  prompt: str  # the user's question; "<image>\n" is prepended when an image is given
  image: object = None  # a path, bytes or PIL image; None for text only
  draft: str | None = None  # infilling: fixed text with mask tokens (SPEC §7.4)


@dataclasses.dataclass
class Result:
  text: str
  ids: list[int]
  nfe: int
  seconds: float
  error: str | None = None


def template_for(model: LaViDa) -> str:
  return "dream" if model.cfg.family == "lavida-dream" else "llada"


def prompt_ids(model: LaViDa, tokenizer, req: Request, system_prompt=text_lib.SYSTEM_PROMPT):
  """-> (token ids with -200 at the image, [(pixel_values, image_size)])."""
  images, question = [], req.prompt
  if req.image is not None:
    pil = req.image if hasattr(req.image, "size") else image_lib.load_image(req.image)
    images.append(image_lib.process_anyres(pil, model.cfg.image))
    if text_lib.IMAGE_TOKEN not in question:
      question = f"{text_lib.IMAGE_TOKEN}\n{question}"
  fmt = text_lib.TEMPLATES[template_for(model)]
  prompt = fmt([{"role": "user", "content": question}], system_prompt=system_prompt)
  ids = text_lib.tokenize_prompt(prompt, tokenizer)
  if sum(i == IMAGE_TOKEN_ID for i in ids) != len(images):
    raise ValueError(f"the prompt has {sum(i == IMAGE_TOKEN_ID for i in ids)} <image> "
                     f"marker(s) but {len(images)} image(s) were given")
  return ids, images


def bucket(n: int, buckets: Sequence[int] = PREFIX_BUCKETS) -> int:
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"prompt of {n} tokens (images expanded) exceeds the largest bucket "
                   f"{buckets[-1]}")


def embed_prompts(model: LaViDa, prompts, length: int):
  """[(ids, images)] -> left-padded x [B, length, D], valid [B, length]."""
  rows = [model.embed_multimodal(np.asarray(ids)[None], images)[0][0] for ids, images in prompts]
  x = jnp.stack([jnp.pad(r, ((length - r.shape[0], 0), (0, 0))) for r in rows])
  valid = np.arange(length)[None, :] >= np.array([length - r.shape[0] for r in rows])[:, None]
  return x, jnp.asarray(valid)


def _denoise_cached(canvas, lm_state, cache, first_logits, *, lm_graphdef, shifted):
  lm = nnx.merge(lm_graphdef, lm_state)
  logits = lm.logits_from_hidden(lm.hidden_with_cache(lm.embed_tokens(canvas), cache))
  if shifted:  # logit i predicts token i + 1: the first comes from the prompt's end
    logits = jnp.concatenate([first_logits[:, None], logits[:, :-1]], axis=1)
  return logits


def _denoise_full(canvas, lm_state, prefix_x, prefix_valid, *, lm_graphdef, shifted):
  lm = nnx.merge(lm_graphdef, lm_state)
  b, p = prefix_valid.shape
  x = jnp.concatenate([prefix_x, lm.embed_tokens(canvas).astype(prefix_x.dtype)], axis=1)
  valid = jnp.concatenate([prefix_valid, jnp.ones(canvas.shape, bool)], axis=1)
  positions = jnp.cumsum(valid, axis=1) - 1
  h = lm.hidden(x, valid, positions)
  h = h[:, p - 1:-1] if shifted else h[:, p:]
  return lm.logits_from_hidden(h)


class Generator:
  """Compiled prefill and sampler for one model and sampler config; reuse it."""

  def __init__(self, model: LaViDa, tokenizer, cfg: sampler_lib.SamplerConfig,
               prefix_cache: bool = True, system_prompt: str | None = text_lib.SYSTEM_PROMPT):
    self.model, self.tokenizer, self.cfg, self.prefix_cache = model, tokenizer, cfg, prefix_cache
    self.system_prompt = system_prompt
    self.lm_graphdef, self.lm_state = nnx.split(model.lm)
    shifted = model.cfg.lm.shifted_logits
    fn = _denoise_cached if prefix_cache else _denoise_full
    self._sample = sampler_lib.make_sampler(
        functools.partial(fn, lm_graphdef=self.lm_graphdef, shifted=shifted), cfg)
    self._prefill = jax.jit(functools.partial(_prefill, lm_graphdef=self.lm_graphdef))

  def canvas(self, reqs: Sequence[Request]) -> np.ndarray:
    """[B, L]: all masks, or each request's draft (fixed tokens + masks)."""
    out = np.full((len(reqs), self.cfg.gen_length), self.cfg.mask_id, np.int32)
    for b, r in enumerate(reqs):
      if r.draft is not None:
        ids = self.tokenizer.encode(r.draft)
        if len(ids) > self.cfg.gen_length:
          raise ValueError(f"draft of {len(ids)} tokens exceeds gen_length {self.cfg.gen_length}")
        out[b, :len(ids)] = ids
    return out

  def __call__(self, reqs: Sequence[Request], rng=None) -> list[Result]:
    t0 = time.perf_counter()
    prompts = [prompt_ids(self.model, self.tokenizer, r, self.system_prompt) for r in reqs]
    lengths = [len(ids) - sum(i == IMAGE_TOKEN_ID for i in ids)
               + sum(self.model.layout(*im).num_tokens for im in images)
               for ids, images in prompts]
    x, valid = embed_prompts(self.model, prompts, bucket(max(lengths)))
    canvas0 = self.canvas(reqs)
    counts = sampler_lib.transfer_schedule(canvas0, self.cfg)
    rng = jax.random.key(0) if rng is None else rng
    if self.prefix_cache:
      cache, first = self._prefill(self.lm_state, x, valid)
      operands = (cache, first)
    else:
      operands = (x, valid)
    out = np.asarray(self._sample(canvas0, counts, rng, self.lm_state, *operands))
    seconds = (time.perf_counter() - t0) / len(reqs)
    nfe = sampler_lib.forward_passes(counts) + int(self.prefix_cache)
    return [Result(self.decode(row), [int(i) for i in row], nfe, seconds) for row in out]

  def decode(self, ids) -> str:
    eos = self.model.cfg.lm.eos_id
    stops = [eos] + [i for i in (self.tokenizer.token_to_id("<|eot_id|>"),
                                 self.tokenizer.token_to_id("<|im_end|>")) if i is not None]
    ids = sampler_lib.stop_at(ids, stops)
    fill = self.tokenizer.token_to_id("[S]")
    if fill is not None:
      ids = sampler_lib.strip_fillers(ids, fill)
    return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _prefill(lm_state, x, valid, *, lm_graphdef):
  """Prompt -> (KV cache, logits at the prompt's last position [B, V])."""
  lm = nnx.merge(lm_graphdef, lm_state)
  cache, h = lm.prefill(x, valid)
  return cache, lm.logits_from_hidden(h[:, -1])  # left padding: the prompt ends at P - 1


# --- command line ---------------------------------------------------------------------

GENERATION_FILE = "generation.json"  # written beside a training run's checkpoints


def find_beside(checkpoint: str, name: str) -> str | None:
  """`name` in the checkpoint folder or its parent (a CheckpointManager root)."""
  for folder in (checkpoint, os.path.dirname(os.path.abspath(checkpoint))):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      return path
  return None


def load_tokenizer_for(checkpoint: str, override: str | None = None):
  if override:
    return text_lib.load_tokenizer(override)
  for folder in (checkpoint, os.path.dirname(os.path.abspath(checkpoint))):
    try:
      return text_lib.load_tokenizer(folder)
    except (ValueError, FileNotFoundError):
      continue
  raise ValueError(f"no tokenizer found in {checkpoint} or its parent; pass --tokenizer")


def system_prompt_for(checkpoint: str) -> str | None:
  """The system prompt a training run used (generation.json), else LaViDa's."""
  path = find_beside(checkpoint, GENERATION_FILE)
  if path:
    with open(path) as f:
      return json.load(f).get("system_prompt", text_lib.SYSTEM_PROMPT)
  return text_lib.SYSTEM_PROMPT


def _flags():
  from absl import flags
  f = flags
  f.DEFINE_string("checkpoint", None, "Hugging Face or Orbax checkpoint folder.", required=True)
  f.DEFINE_string("image", None, "Image file (one request).")
  f.DEFINE_string("prompt", None, "The question (one request).")
  f.DEFINE_string("requests", None, "JSONL of {\"prompt\", \"image\"?, \"draft\"?} (batch mode).")
  f.DEFINE_string("output", None, "Where batch mode writes its JSONL results (default stdout).")
  f.DEFINE_string("tokenizer", None, "Tokenizer file/folder (default: beside the checkpoint).")
  f.DEFINE_integer("gen_length", 32, "Canvas length L.")
  f.DEFINE_integer("steps", 32, "Denoising steps over all blocks.")
  f.DEFINE_integer("block_length", 32, "Block length (divides gen_length).")
  f.DEFINE_enum("schedule", "shift", ["shift", "linear", "cosine"], "Transfer schedule.")
  f.DEFINE_float("shift", 1 / 3, "Timestep-shift alpha (the paper's 1/3).")
  f.DEFINE_boolean("prefix_cache", True, "Prefix KV cache (Prefix-DLM).")
  f.DEFINE_float("temperature", 0.0, "0: argmax; > 0: Gumbel-max sampling.")
  f.DEFINE_string("confidence", "low_confidence", "low_confidence|random|margin|entropy.")
  f.DEFINE_string("draft", None, "Infilling draft: fixed text with <|mdm_mask|> runs.")
  f.DEFINE_integer("seed", 0, "PRNG seed.")
  f.DEFINE_integer("batch_size", 8, "Requests per batch in batch mode.")
  f.DEFINE_string("dtype", "float32", "Parameter dtype.")
  return flags.FLAGS


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  import lavida_jax
  from lavida_jax import evaluate

  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  if (FLAGS.requests is None) == (FLAGS.prompt is None):
    raise SystemExit("give either --prompt (with --image) or --requests")
  model = lavida_jax.load_pretrained(FLAGS.checkpoint, dtype=FLAGS.dtype)
  tokenizer = load_tokenizer_for(FLAGS.checkpoint, FLAGS.tokenizer)
  system_prompt = system_prompt_for(FLAGS.checkpoint)
  cfg = sampler_lib.SamplerConfig(
      gen_length=FLAGS.gen_length, block_length=FLAGS.block_length, steps=FLAGS.steps,
      schedule=FLAGS.schedule, alpha=FLAGS.shift, temperature=FLAGS.temperature,
      confidence=FLAGS.confidence, mask_id=model.cfg.lm.mask_id)
  gen = Generator(model, tokenizer, cfg, prefix_cache=FLAGS.prefix_cache,
                  system_prompt=system_prompt)
  rng = jax.random.key(FLAGS.seed)
  if FLAGS.prompt is not None:
    res = gen([Request(FLAGS.prompt, FLAGS.image, FLAGS.draft)], rng)[0]
    print(res.text)
    print(f"[nfe={res.nfe} seconds={res.seconds:.2f}]", file=sys.stderr)
    return
  with open(FLAGS.requests) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  reqs = [Request(r.get("prompt", ""), r.get("image"), r.get("draft")) for r in rows]
  results = evaluate.run_generation(gen, reqs, FLAGS.batch_size)
  out = open(FLAGS.output, "w") if FLAGS.output else sys.stdout
  for row, res in zip(rows, results):
    out.write(json.dumps({**row, "output": res.text, "nfe": res.nfe, "seconds": res.seconds,
                          "error": res.error}) + "\n")
  if FLAGS.output:
    out.close()


if __name__ == "__main__":
  from absl import app
  _flags()
  app.run(main)
