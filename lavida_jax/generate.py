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
import logging
import os
import sys
import time
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavida_jax import image as image_lib
from lavida_jax import text as text_lib
from lavida_jax.data import packing
from lavida_jax.diffusion import sampler as sampler_lib
from lavida_jax.diffusion import schedule as schedule_lib
from lavida_jax.models import layers
from lavida_jax.models.lavida import IMAGE_TOKEN_ID, LaViDa
from lavida_jax.models.lm import KVCache

# Prompt lengths compiled for: 32, 64, every multiple of 128 (TPU tiles) up to 4096,
# then of 512.
# Padding costs in the prefill and in every step's keys (a ~600-token prompt in the 1024
# bucket: a d512 prefill takes 1.9x, a step 1.1x the time at 640); one compile per bucket.
PREFIX_BUCKETS = (32, 64, *range(128, 4096 + 1, 128), *range(4608, 8192 + 1, 512))


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
  """-> (token ids with -200 at the image, [(pixel_values, image_size)]).

  With `model.cfg.reference_compat` the ids are LaViDa's inference ids: LLaVA's
  `tokenizer_image_token` drops the token after each `<image>` (the "\n" of
  `<image>\n{question}`) in LLaDA prompts (SPEC §13); the default keeps it, as
  training does.
  """
  images, question = [], req.prompt
  if req.image is not None:
    images.append(req.image if hasattr(req.image, "size") else image_lib.load_image(req.image))
    if text_lib.IMAGE_TOKEN not in question:
      question = f"{text_lib.IMAGE_TOKEN}\n{question}"
  return chat_ids(model, tokenizer, [{"role": "user", "content": question}], images,
                  system_prompt)


def chat_ids(model: LaViDa, tokenizer, messages, images, system_prompt=text_lib.SYSTEM_PROMPT):
  """A conversation ([{"role", "content"}], `<image>` in the content where each PIL
  image goes) -> (token ids, [(pixel_values, image_size)]), as `prompt_ids`."""
  images = [image_lib.process_anyres(im, model.cfg.image) for im in images]
  fmt = text_lib.TEMPLATES[template_for(model)]
  prompt = fmt(messages, system_prompt=system_prompt)
  compat = model.cfg.reference_compat
  bos = tokenizer.token_to_id("<|startoftext|>") if template_for(model) == "llada" else None
  ids = text_lib.tokenize_prompt(prompt, tokenizer, reference_compat=compat, bos_id=bos)
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


def pack_prompts(model: LaViDa, prompts, length: int,
                 views: int | None = None) -> dict[str, np.ndarray]:
  """[(ids, images)] -> host arrays for `LaViDa.embed_packed`, left-padded to `length`.

  ids [B, length] (-200 at image tokens), pixels [B, V, S, S, 3] (each row's views,
  zero-padded to `views`, default the batch's most), image_index / image_weight [B, length, 4] (which
  pooled view features make each image token, `data/packing.py`), valid [B, length].
  Left padding puts every prompt's end next to the canvas.
  """
  cfg = model.cfg
  views = views or max([len(im[0][0]) for _, im in prompts if im] or [1])
  size = cfg.image.size
  out = dict(ids=np.zeros((len(prompts), length), np.int32),
             pixels=np.zeros((len(prompts), views, size, size, 3), np.float32),
             image_index=np.zeros((len(prompts), length, 4), np.int32),
             image_weight=np.zeros((len(prompts), length, 4), np.float32),
             valid=np.zeros((len(prompts), length), bool))
  for b, (ids, images) in enumerate(prompts):
    if len(images) > 1:
      raise ValueError(f"a request holds at most one image, got {len(images)}")
    image_size = None
    if images:
      pixels, image_size = images[0]
      out["pixels"][b, :len(pixels)] = pixels
    n = prompt_length(model, ids, images)
    if n > length:
      raise ValueError(f"prompt of {n} tokens (images expanded) exceeds length {length}")
    row = packing.pack_example(ids, ids, image_size, cfg, n, 0, views)
    out["ids"][b, length - n:] = row["input_ids"]
    out["image_index"][b, length - n:] = row["image_index"]
    out["image_weight"][b, length - n:] = row["image_weight"]
    out["valid"][b, length - n:] = True
  return out


def check_context(model: LaViDa, prompts, gen_length: int) -> None:
  """Refuses a prompt + canvas longer than the model's context (`LMConfig.max_length`,
  config.json's max_sequence_length: 4096 for LLaDA), naming the lengths: past it the
  model answers nothing useful (RoPE positions it never saw)."""
  limit = model.cfg.lm.max_length
  for b, (ids, images) in enumerate(prompts):
    n = prompt_length(model, ids, images)
    if limit is not None and n + gen_length > limit:
      image = n - (len(ids) - sum(i == IMAGE_TOKEN_ID for i in ids))
      which = f"request {b}: " if len(prompts) > 1 else ""
      raise ValueError(f"{which}prompt of {n} tokens ({n - image} text + {image} image) + "
                       f"canvas of {gen_length} = {n + gen_length} tokens exceeds the model's "
                       f"context of {limit}")


def prompt_length(model: LaViDa, ids, images) -> int:
  """Tokens of a prompt with its image expanded."""
  return (len(ids) - sum(i == IMAGE_TOKEN_ID for i in ids)
          + sum(model.layout(*im).num_tokens for im in images))


def _embed(state, ids, pixels, image_index, image_weight, *, graphdef):
  model = nnx.merge(graphdef, state)
  return model.embed_packed(ids, pixels, image_index, image_weight)


_embed_jit = jax.jit(_embed, static_argnames="graphdef")  # graphdefs hash: compiled once


def embed_prompts(model: LaViDa, prompts, length: int):
  """[(ids, images)] -> left-padded x [B, length, D], valid [B, length]."""
  packed = pack_prompts(model, prompts, length)
  graphdef, state = nnx.split(model)
  valid = packed.pop("valid")
  return _embed_jit(state, **packed, graphdef=graphdef), jnp.asarray(valid)


def _prepare(state, ids, pixels, image_index, image_weight, valid, *, graphdef, cache):
  """Prompt arrays -> the sampler's operands after lm_state: (x, valid) for Full-DLM,
  else the prompt's (KV cache, logits at its last position [B, V]). One compiled
  program per bucket: vision, splice and prefill."""
  x = _embed(state, ids, pixels, image_index, image_weight, graphdef=graphdef)
  if not cache:
    return x, valid
  lm = nnx.merge(graphdef, state).lm
  kv, h = lm.prefill(x, valid)
  return kv, lm.logits_from_hidden(h[:, -1])  # left padding: the prompt ends at P - 1


CACHES = ("none", "prefix", "dual")


def _shift_block(logits_BLbV, first_BV, start_B):
  """Dream's shifted logits for a block: the caller passed the logits of positions
  start - 1 .. start + Lb - 2 (or 0 .. Lb - 1 where start = 0, whose first logit
  comes from the prompt's last position, `first`)."""
  at_zero = jnp.concatenate([first_BV[:, None].astype(logits_BLbV.dtype),
                             logits_BLbV[:, :-1]], axis=1)
  return jnp.where((start_B == 0)[:, None, None], at_zero, logits_BLbV)


def _from_canvas_hidden(lm, h_BLD, start_B, first_BV, lb, shifted):
  """Block logits [B, Lb, V] from hidden states of the whole canvas [B, L, D]."""
  if not shifted:
    return lm.logits_from_hidden(sampler_lib.block_slice(h_BLD, start_B, lb))
  h = sampler_lib.block_slice(h_BLD, jnp.maximum(start_B - 1, 0), lb)
  return _shift_block(lm.logits_from_hidden(h), first_BV, start_B)


def _denoise_full(canvas, start, _, lm_state, prefix_x, prefix_valid, *, lm_graphdef,
                  shifted, lb):
  """Full-DLM: prompt + canvas every step."""
  lm = nnx.merge(lm_graphdef, lm_state)
  b, p = prefix_valid.shape
  x = jnp.concatenate([prefix_x, lm.embed_tokens(canvas).astype(prefix_x.dtype)], axis=1)
  valid = jnp.concatenate([prefix_valid, jnp.ones(canvas.shape, bool)], axis=1)
  positions = jnp.cumsum(valid, axis=1) - 1
  h = lm.hidden(x, valid, positions)
  h = h[:, p - 1:-1] if shifted else h[:, p:]  # aligned: h[:, i] predicts canvas i
  return lm.logits_from_hidden(sampler_lib.block_slice(h, start, lb))


def _loop_invariants(canvas0, lm_state, cache, first, *, lm_graphdef, split_heads=False):
  """The cached denoisers' `setup`, once per call: the canvas's rotary angles (else
  each step recomputes them in every layer's q and k: ~5% of a d512 step on CPUs).
  split_heads (XLA:CPU, per-layer caches): at batch 1 the cache split by head, so
  no step copies a head out of it (`layers.split_heads`)."""
  rope = nnx.merge(lm_graphdef, lm_state).canvas_rope(cache, canvas0.shape[1])
  if split_heads and canvas0.shape[0] == 1 and isinstance(cache.k, tuple):
    k, v = zip(*(layers.split_heads(k, v) for k, v in zip(cache.k, cache.v)))
    cache = cache._replace(k=k, v=v)
  return lm_state, cache, first, rope


def _denoise_prefix(canvas, start, _, lm_state, cache, first, rope=None, *, lm_graphdef, shifted,
                    lb):
  """Prefix-DLM: the whole canvas over the prompt's KV cache every step. canvas
  [B, S, L] (the lookahead): S canvases per row side by side in one pass."""
  lm = nnx.merge(lm_graphdef, lm_state)
  if canvas.ndim == 2:
    h = lm.hidden_with_cache(lm.embed_tokens(canvas), cache, rope=rope)
    return _from_canvas_hidden(lm, h, start, first, lb, shifted)
  b, s, length = canvas.shape
  if rope is not None:
    rope = tuple(jnp.tile(a, (1, s, 1)) for a in rope)
  h = lm.hidden_with_cache(lm.embed_tokens(canvas.reshape(b, s * length)), cache, rope=rope,
                           groups=s)
  per_canvas = lambda a: jnp.repeat(a, s, axis=0)
  logits = _from_canvas_hidden(lm, h.reshape(b * s, length, -1), per_canvas(start),
                               per_canvas(first), lb, shifted)
  return logits.reshape(b, s, lb, -1)


def _dual_refresh(canvas, start, lm_state, cache, first, rope=None, *, lm_graphdef, shifted, lb):
  """The dual cache's block-start pass: the Prefix-DLM step that also keeps the
  canvas's K/V -> (block logits, cache of prompt + canvas keys)."""
  lm = nnx.merge(lm_graphdef, lm_state)
  h, (k, v) = lm.hidden_with_cache(lm.embed_tokens(canvas), cache, collect_kv=True, rope=rope)
  dual = cache.extend(k, v, jnp.ones(canvas.shape, bool))
  return _from_canvas_hidden(lm, h, start, first, lb, shifted), dual


def _dual_step(canvas, start, dual, lm_state, cache, first, rope=None, *, lm_graphdef, shifted,
               lb):
  """A dual-cache step: only the block's window is recomputed, over the cached
  prompt and canvas keys (its own cached keys masked; SPEC §14). Dream's window
  starts one position early (the logit of a block's first token comes from the
  position before it) and so holds Lb + 1 positions."""
  lm = nnx.merge(lm_graphdef, lm_state)
  b, length = canvas.shape
  w = min(lb + int(shifted), length)
  ws = jnp.clip(start - 1, 0, length - w) if shifted else start
  p = cache.valid.shape[1]
  pos = jnp.arange(p + length)[None, :] - p
  window = (pos >= ws[:, None]) & (pos < ws[:, None] + w)
  x = lm.embed_tokens(sampler_lib.block_slice(canvas, ws, w))
  if rope is not None:
    rope = tuple(sampler_lib.block_slice(a, ws, w) for a in rope)
  h = lm.hidden_with_cache(x, dual._replace(valid=dual.valid & ~window), start_B=ws,
                           rope=rope)
  logits = lm.logits_from_hidden(h[:, :lb])
  return _shift_block(logits, first, start) if shifted else logits


def denoiser(cache_mode: str, lm_graphdef, shifted: bool, block_length: int,
             split_heads: bool = False):
  """The sampler's `Denoiser` for a cache mode (operands: lm_state, then the
  prompt's (x, valid) for "none" or its (KV cache, first logits) otherwise).
  split_heads: the prefix cache split by head at batch 1 (`_loop_invariants`)."""
  kw = dict(lm_graphdef=lm_graphdef, shifted=shifted, lb=block_length)
  if cache_mode == "none":
    return sampler_lib.Denoiser(functools.partial(_denoise_full, **kw))
  setup = functools.partial(_loop_invariants, lm_graphdef=lm_graphdef)
  if cache_mode == "prefix":
    return sampler_lib.Denoiser(functools.partial(_denoise_prefix, **kw),
                                setup=functools.partial(setup, split_heads=split_heads),
                                canvases=True)
  if cache_mode == "dual":
    return sampler_lib.Denoiser(functools.partial(_dual_step, **kw),
                                functools.partial(_dual_refresh, **kw),
                                KVCache.batch_axes, setup)
  raise ValueError(f"unknown cache {cache_mode!r}; expected one of {', '.join(CACHES)}")


def _platform(model: nnx.Module) -> str:
  """Where the model's weights live (abstract ones too: an AOT compile for TPUs from
  a CPU host), else the default backend."""
  sh = getattr(jax.tree.leaves(nnx.state(model))[0], "sharding", None)
  return next(iter(sh.device_set)).platform if sh is not None else jax.default_backend()


def _weakref(x):
  try:
    return weakref.ref(x)
  except TypeError:  # not weakly referable: hold it
    return lambda: x


class InferenceCopy:
  """A model's modules arranged for decoding (`Generator`'s unroll_layers), built once
  per model, arrangement and weights and shared by every Generator holding it: a
  server's or a harness's Generators (one per sampler setting) would otherwise each
  keep a copy of the weights. Built anew once the model's weights are other arrays
  (after training steps or a reload); it goes when its last Generator does."""

  def __init__(self, model: LaViDa, unroll: bool):
    self.weights = [_weakref(a) for a in jax.tree.leaves(nnx.state(model))]
    graphdef, state = nnx.split(model)
    # New modules and variables over the same arrays: nnx.merge(*nnx.split(model))
    # would share the variables, and an in-place update of the model (nnx.update)
    # would reach the arrays this copy did not copy but not the ones it did.
    run = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
    if unroll:
      run.lm.blocks = layers.unstack_layers(run.lm.blocks)
      run.vision.blocks = layers.unstack_layers(run.vision.blocks)
    if _platform(model) == "cpu":  # XLA:CPU's faster forms of the same products
      for _, m in nnx.iter_modules(run):
        if isinstance(m, layers.Attention) and m.implementation in (None, "xla"):
          m.implementation = "xla_cpu"
      if unroll:  # the copy of the weights unrolling already costs
        layers.out_major_kernels(run)
    self.model = run

  def of(self, leaves) -> bool:
    return len(leaves) == len(self.weights) and all(
        r() is a for r, a in zip(self.weights, leaves))


_COPIES: "weakref.WeakValueDictionary[tuple[int, bool], InferenceCopy]" = (
    weakref.WeakValueDictionary())


def inference_copy(model: LaViDa, unroll: bool | None = None) -> InferenceCopy:
  """The shared `InferenceCopy` of `model` (unroll None: on CPUs and GPUs)."""
  if unroll is None:
    unroll = _platform(model) in ("cpu", "gpu", "cuda", "rocm")
  key = (id(model), bool(unroll))
  copy = _COPIES.get(key)
  if copy is None or not copy.of(jax.tree.leaves(nnx.state(model))):
    copy = _COPIES[key] = InferenceCopy(model, bool(unroll))
  return copy


class Generator:
  """Compiled prefill and sampler for one model, sampler config and cache; reuse it.

  cache: "none" (Full-DLM: prompt + canvas every step), "prefix" (Prefix-DLM,
  SPEC §7.3) or "dual" (prefix cache + the canvas's keys refreshed at each block
  start, SPEC §14). A bool means "prefix" (True) or "none" (False).

  With `model.cfg.reference_compat` the Generator reproduces LaViDa's inference:
  its prompt ids (`prompt_ids`) and, with the fixed decoder, its sampler's argmax
  and confidence softmax over the whole vocabulary, mask id included
  (`SamplerConfig.forbid_mask=False`). The default forbids the mask id.

  unroll_layers (default: on CPUs and GPUs): run the LM's and the vision tower's
  layers unrolled on per-layer copies of their weights (`layers.unstack_layers`;
  the model itself is not changed). A scan over stacked layers slices each
  layer's weights out of the stack, which XLA copies on every pass: a quarter
  of a d512 cached step on the CPU, half of a full-size LaViDa-L cached step on
  an H200 (13.5 -> 6.5 ms at batch 1, benchmarks/README.md). It costs a second
  copy of those weights, one per model and weights however many Generators hold
  it (`inference_copy`; pass False where memory is short; TPUs keep the scan);
  on CPUs that copy is stored [out, in] (`layers.out_major_kernels`, the same
  products: the d512 bench's step 26.4 -> 24.4 ms, d1024's 1.6x faster with the
  canvas's rotary angles computed once). On CPUs the attention of the vision
  tower and of the prefill is `layers.xla_attention` (the same values; the d512
  bench's vision 91 -> 63 ms), and at batch 1 the prefix cache is split by head
  once per call (`_loop_invariants`).

  cfg.lookahead (fixed decoder, prefix cache only): the same tokens in fewer, wider
  passes (`sampler` docstring, Lookahead); NFE then counts passes.

  on_step: `on_step(canvas [B, L], steps [B])`, numpy, called on the host after every
  denoising step (streaming; `sampler.sample`). It is compiled in: a Generator with
  it is a second program.
  """

  def __init__(self, model: LaViDa, tokenizer, cfg: sampler_lib.SamplerConfig,
               cache: str | bool = "prefix",
               system_prompt: str | None = text_lib.SYSTEM_PROMPT,
               unroll_layers: bool | None = None, on_step=None):
    if isinstance(cache, bool):
      cache = "prefix" if cache else "none"
    self.model, self.tokenizer, self.cache = model, tokenizer, cache
    if cfg.decoder != "fixed" and not cfg.stop_ids:
      cfg = dataclasses.replace(cfg, stop_ids=tuple(self.stop_ids()))
    if model.cfg.reference_compat and cfg.decoder == "fixed":
      cfg = dataclasses.replace(cfg, forbid_mask=False)
    self.cfg, self.system_prompt = cfg, system_prompt
    self._copy = inference_copy(model, unroll_layers)  # held: shared with the others
    run = self._copy.model
    self.lm_graphdef, self.lm_state = nnx.split(run.lm)
    self.graphdef, self.state = nnx.split(run)
    self._prepare = jax.jit(functools.partial(_prepare, graphdef=self.graphdef,
                                              cache=cache != "none"))
    if cfg.lookahead and cache != "prefix":
      raise ValueError(f"lookahead needs cache='prefix', got {cache!r}")
    den = denoiser(cache, self.lm_graphdef, model.cfg.lm.shifted_logits, cfg.block_length,
                   split_heads=_platform(model) == "cpu")
    self._sample = sampler_lib.make_sampler(den, cfg, return_steps=True, on_step=on_step)
    self._prefill = jax.jit(functools.partial(_prefill, lm_graphdef=self.lm_graphdef))

  @property
  def prefix_cache(self) -> bool:
    return self.cache != "none"

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
    out, nfe = self.run(prompts, self.canvas(reqs), rng)
    seconds = (time.perf_counter() - t0) / len(reqs)
    return [Result(self.decode(row), [int(i) for i in row], int(n), seconds)
            for row, n in zip(out, nfe)]

  def run(self, prompts, canvas0: np.ndarray, rng=None, length: int | None = None,
          views: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[(ids, images)] from `prompt_ids` and their canvases [B, L] -> (ids [B, L], NFE
    [B]: the row's forward passes, its prefill included). `length`: the prompt bucket
    (default: the smallest that holds the longest prompt); `views`: image views per
    row (default: the batch's most). Both are compiled shapes."""
    check_context(self.model, prompts, canvas0.shape[1])
    length = length or bucket(max(prompt_length(self.model, *p) for p in prompts))
    counts = sampler_lib.transfer_schedule(canvas0, self.cfg)
    rng = jax.random.key(0) if rng is None else rng
    packed = pack_prompts(self.model, prompts, length, views)
    operands = self._prepare(self.state, **packed)
    out, steps = jax.device_get(self._sample(canvas0, counts, rng, self.lm_state, *operands))
    return out, steps + int(self.prefix_cache)

  def stop_ids(self) -> list[int]:
    return stop_ids(self.model, self.tokenizer)

  def decode(self, ids) -> str:
    return decode_answer(self.tokenizer, ids, self.stop_ids())


def stop_ids(model: LaViDa, tokenizer) -> list[int]:
  """EOS and the end-of-turn tokens: an answer ends at the first of them."""
  return [model.cfg.lm.eos_id] + [
      i for i in (tokenizer.token_to_id("<|eot_id|>"), tokenizer.token_to_id("<|im_end|>"))
      if i is not None]


def decode_answer(tokenizer, ids, stops) -> str:
  """Canvas ids -> the answer's text: up to the first stop id, fillers dropped."""
  ids = sampler_lib.stop_at(ids, stops)
  fill = tokenizer.token_to_id("[S]")
  if fill is not None:
    ids = sampler_lib.strip_fillers(ids, fill)
  return tokenizer.decode(ids, skip_special_tokens=True).strip()


def parse_request(line: str, where: str) -> tuple[dict, "Request | str"]:
  """One JSONL line of batch mode -> (the row, its Request), or (the row as far as it
  parsed, the one-line error) for a line that is not {"prompt": str, "image"?: str,
  "draft"?: str, ...}: the batch goes on without it."""
  try:
    row = json.loads(line)
  except (ValueError, RecursionError) as e:
    return {"line": line[:200]}, f"{where}: not JSON ({str(e)[:80]})"
  if not isinstance(row, dict):
    return {"line": line[:200]}, f"{where}: a JSON {type(row).__name__}, expected an object"
  for key in ("prompt", "image", "draft"):
    if row.get(key) is not None and not isinstance(row[key], str):
      return row, f"{where}: {key!r} is a {type(row[key]).__name__}, expected a string"
  return row, Request(row.get("prompt") or "", row.get("image"), row.get("draft"))


def run_generation(generator: "Generator", requests: Sequence[Request],
                   batch_size: int = 8) -> list[Result]:
  """Batches of requests; a bad request gets its error and the rest go on."""
  results = []
  for i in range(0, len(requests), batch_size):
    chunk = requests[i:i + batch_size]
    try:
      results += generator(chunk)
    except (ValueError, OSError):  # retry one by one to isolate the bad request
      for r in chunk:
        try:
          results += generator([r])
        except (ValueError, OSError) as err:
          results.append(Result("", [], 0, 0.0, error=str(err)))
  return results


def _prefill(lm_state, x, valid, *, lm_graphdef):
  """Prompt -> (KV cache, logits at the prompt's last position [B, V])."""
  lm = nnx.merge(lm_graphdef, lm_state)
  cache, h = lm.prefill(x, valid)
  return cache, lm.logits_from_hidden(h[:, -1])  # left padding: the prompt ends at P - 1


# --- command line ---------------------------------------------------------------------

GENERATION_FILE = "generation.json"  # written beside a training run's checkpoints


def side_folders(checkpoint: str) -> list[str]:
  """Where a checkpoint's tokenizer and generation.json are: a training step's `files`
  item, the folder itself, its parent (older training runs; checkpoint/orbax.py)."""
  from lavida_jax.checkpoint import orbax as orbax_lib
  if orbax_lib.is_orbax(checkpoint):  # a CheckpointManager root: its newest step's
    return orbax_lib.side_folders(orbax_lib.find_step(checkpoint))
  return [checkpoint, os.path.dirname(os.path.abspath(checkpoint))]


def find_beside(checkpoint: str, name: str) -> str | None:
  """`name` in the first of the checkpoint's side folders that holds it."""
  for folder in side_folders(checkpoint):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      return path
  return None


def resolve_checkpoint(checkpoint: str) -> str:
  """A local folder for --checkpoint: a folder as given, a hub id ('org/name') through
  the Hugging Face cache (checkpoint/hub.py); a one-line exit if it cannot be had."""
  from lavida_jax.checkpoint import hub
  from lavida_jax.checkpoint.shards import CheckpointError
  try:
    return hub.resolve(checkpoint)
  except CheckpointError as e:
    raise SystemExit(f"error: {e}") from None


def load_tokenizer_for(checkpoint: str, override: str | None = None):
  if override:
    return text_lib.load_tokenizer(override)
  for folder in side_folders(checkpoint):
    try:
      return text_lib.load_tokenizer(folder)
    except (ValueError, FileNotFoundError):
      continue
  raise ValueError(f"no tokenizer found in {checkpoint}, its files/ item or its parent; "
                   "pass --tokenizer")


def system_prompt_for(checkpoint: str) -> str | None:
  """The system prompt a training run used (generation.json), else LaViDa's."""
  path = find_beside(checkpoint, GENERATION_FILE)
  if path:
    with open(path) as f:
      return json.load(f).get("system_prompt", text_lib.SYSTEM_PROMPT)
  if any(os.path.isdir(os.path.join(folder, "opt_state")) for folder in side_folders(checkpoint)):
    # A training step written before steps were self-contained, moved out of its run:
    # its prompts may have been built otherwise. Say so rather than guess silently.
    logging.warning("%s is a training step without generation.json (older runs kept it "
                    "beside the steps): using LaViDa's system prompt", checkpoint)
  return text_lib.SYSTEM_PROMPT


def define_decoding_flags(steps_list: bool = False):
  """The sampler's flags, shared by generate and evaluate (steps_list: a sweep)."""
  from absl import flags as f
  f.DEFINE_integer("gen_length", 32, "Canvas length L.")
  if steps_list:
    f.DEFINE_list("steps", ["32"], "Step counts to evaluate (fixed decoder: an NFE sweep).")
  else:
    f.DEFINE_integer("steps", 32, "Denoising steps over all blocks (fixed decoder).")
  f.DEFINE_integer("block_length", 32, "Block length (divides gen_length).")
  f.DEFINE_enum("schedule", "shift", list(schedule_lib.SCHEDULES),
                "Transfer schedule, LaViDa's names: none (LLaDA's uniform rule), linear "
                "(sigma = t), shift (--shift), cosine, logit_normal.")
  f.DEFINE_float("shift", 1 / 3, "Timestep-shift alpha for --schedule=shift (the paper's "
                 "1/3; LaViDa's generate defaults to 3, its eval scripts pass 0.33).")
  f.DEFINE_enum("decoder", "fixed", list(sampler_lib.DECODERS),
                "fixed: the schedule's counts; threshold / factor: Fast-dLLM's parallel "
                "decoding (as many steps as the answer needs).")
  f.DEFINE_float("threshold", 0.9, "threshold decoder: commit masks with confidence >= this.")
  f.DEFINE_float("factor", 1.0, "factor decoder: Fast-dLLM's f.")
  f.DEFINE_integer("lookahead", 0, "fixed decoder with the prefix cache: the next steps' "
                   "canvases guessed and verified in each pass (the same tokens in fewer "
                   "passes; 1-3 pay where a pass costs the weights' bytes).")
  f.DEFINE_enum("cache", None, list(CACHES), "KV cache: none (Full-DLM), prefix "
                "(Prefix-DLM) or dual (prefix + canvas keys refreshed per block). Default: "
                "--prefix_cache.")
  f.DEFINE_boolean("prefix_cache", True, "Same as --cache=prefix (--noprefix_cache: none).")
  f.DEFINE_float("temperature", 0.0, "0: argmax; > 0: Gumbel-max sampling.")
  f.DEFINE_enum("confidence", "low_confidence", list(sampler_lib.CONFIDENCES),
                "Which positions to commit first.")


def define_quantize_flag():
  """--quantize, shared by generate, evaluate and serve (`models/quant.py`)."""
  from absl import flags as f
  f.DEFINE_enum("quantize", None, ["int8"], "int8: the LM's linear layers as int8 weights "
                "with per-channel scales (qwix): half the bytes of bfloat16.")


def decoding_from_flags(FLAGS, mask_id: int, steps: int | None = None):
  """-> (SamplerConfig, cache mode) from `define_decoding_flags`' flags."""
  cfg = sampler_lib.SamplerConfig(
      gen_length=FLAGS.gen_length, block_length=FLAGS.block_length,
      steps=FLAGS.steps if steps is None else steps, schedule=FLAGS.schedule,
      alpha=FLAGS.shift, temperature=FLAGS.temperature, confidence=FLAGS.confidence,
      mask_id=mask_id, decoder=FLAGS.decoder, threshold=FLAGS.threshold, factor=FLAGS.factor,
      lookahead=FLAGS.lookahead)
  return cfg, FLAGS.cache or ("prefix" if FLAGS.prefix_cache else "none")


def _flags():
  from absl import flags
  f = flags
  f.DEFINE_string("checkpoint", None, "Hugging Face or Orbax checkpoint folder, or a hub id "
                  "(org/name, through the HF cache; HF_HUB_OFFLINE honoured).", required=True)
  f.DEFINE_string("image", None, "Image file (one request).")
  f.DEFINE_string("prompt", None, "The question (one request).")
  f.DEFINE_string("requests", None, "JSONL of {\"prompt\", \"image\"?, \"draft\"?} (batch mode).")
  f.DEFINE_string("output", None, "Where batch mode writes its JSONL results (default stdout).")
  f.DEFINE_string("tokenizer", None, "Tokenizer file/folder (default: beside the checkpoint).")
  define_decoding_flags()
  f.DEFINE_string("draft", None, "Infilling draft: fixed text with <|mdm_mask|> runs.")
  f.DEFINE_integer("seed", 0, "PRNG seed.")
  f.DEFINE_integer("batch_size", 8, "Requests per batch in batch mode.")
  f.DEFINE_string("dtype", "float32", "Parameter dtype.")
  define_quantize_flag()
  return flags.FLAGS


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  import lavida_jax

  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  if (FLAGS.requests is None) == (FLAGS.prompt is None):
    raise SystemExit("give either --prompt (with --image) or --requests")
  checkpoint = resolve_checkpoint(FLAGS.checkpoint)
  model = lavida_jax.load_pretrained(checkpoint, dtype=FLAGS.dtype, quantize=FLAGS.quantize)
  tokenizer = load_tokenizer_for(checkpoint, FLAGS.tokenizer)
  system_prompt = system_prompt_for(checkpoint)
  try:
    cfg, cache = decoding_from_flags(FLAGS, model.cfg.lm.mask_id)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  gen = Generator(model, tokenizer, cfg, cache, system_prompt=system_prompt)
  rng = jax.random.key(FLAGS.seed)
  if FLAGS.prompt is not None:
    res = gen([Request(FLAGS.prompt, FLAGS.image, FLAGS.draft)], rng)[0]
    print(res.text)
    print(f"[nfe={res.nfe} seconds={res.seconds:.2f}]", file=sys.stderr)
    return
  with open(FLAGS.requests) as f:
    parsed = [parse_request(line, f"{FLAGS.requests} line {i + 1}")
              for i, line in enumerate(f) if line.strip()]
  good = [req for _, req in parsed if isinstance(req, Request)]
  done = iter(run_generation(gen, good, FLAGS.batch_size))
  results = [next(done) if isinstance(req, Request) else Result("", [], 0, 0.0, error=req)
             for _, req in parsed]
  rows = [row for row, _ in parsed]
  out = open(FLAGS.output, "w") if FLAGS.output else sys.stdout
  for row, res in zip(rows, results):
    out.write(json.dumps({**row, "output": res.text, "nfe": res.nfe, "seconds": res.seconds,
                          "error": res.error}) + "\n")
  if FLAGS.output:
    out.close()


if __name__ == "__main__":
  from lavida_jax import cli
  _flags()
  cli.run(main)
