"""`--model lavida_jax` for stock lmms-eval: LaViDa-L, LaViDa-D and LLaDA-V in JAX.

  lmms-eval eval --model lavida_jax \
      --model_args checkpoint=DIR,decoder=fixed,steps=16,cache=prefix \
      --tasks coco2017_cap_val_lite --batch_size 8

generate_until: requests are grouped by (task, generation kwargs), so each group
is one compiled Generator (`settings.resolve`: LaViDa's and LLaDA-V's kwarg names),
and batched `batch_size` at a time with ragged prompts (left-padded to a length
bucket; a row's answer never depends on its batch-mates). An answer ends at the
first EOS / end-of-turn token (as LaViDa's and LLaDA-V's harnesses decode), then at
the task's first `until` string. Speed per task goes to lmms-eval's `throughput`
results and, with `speed_log=FILE`, to a JSONL line per task.
loglikelihood: LLaDA's Monte Carlo ELBO (`likelihood.Scorer`, `mc_num` samples).
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger

from lavida_jax import evaluate, generate
from lavida_jax.diffusion import sampler as sampler_lib
from lavida_jax.lmms import likelihood, settings


def _mesh(spec):
  """'DxFxT' (data x fsdp x tensor, one may be -1) -> a mesh; None -> one device."""
  if spec in (None, "", "none"):
    return None
  from lavida_jax import sharding
  try:
    shape = tuple(int(s) for s in str(spec).split("x"))
  except ValueError:
    raise ValueError(f"mesh={spec!r}: expected DATAxFSDPxTENSOR, e.g. 1x8x1") from None
  if len(shape) != 3:
    raise ValueError(f"mesh={spec!r}: expected 3 sizes (data x fsdp x tensor), got {len(shape)}")
  return sharding.make_mesh(shape)


class LavidaJax(lmms):
  """model_args: checkpoint (folder or hub id), tokenizer, dtype, mesh (DxFxT),
  system_prompt (text, a file, or "none"), the decoding defaults of
  `settings.Decoding` (gen_length, block_length, steps, schedule, shift, decoder,
  threshold, factor, confidence, cache, temperature), mc_num / mc_batch / greedy for
  loglikelihood, seed, speed_log (a JSONL file: a speed line per task), warmup (run a
  new setting's first batch once untimed, so compiling is not counted in the speed),
  reference_compat."""

  is_simple = True

  def __init__(self, checkpoint: str, tokenizer: str | None = None, dtype: str = "float32",
               mesh: str | None = None, system_prompt: str | None = None,
               batch_size: int | str = 1, mc_num: int = 128, mc_batch: int = 16,
               seed: int = 0, speed_log: str | None = None, reference_compat: bool = False,
               warmup: bool = True, greedy: bool = False, **kwargs):
    super().__init__()
    import lavida_jax
    decoding = {f: kwargs.pop(f) for f in list(kwargs)
                if f in settings.Decoding.__dataclass_fields__}
    for f in ("device", "max_batch_size"):  # lmms-eval's torch-side settings: JAX places
      kwargs.pop(f, None)
    if kwargs:
      raise ValueError(f"unknown model_args for lavida_jax: {', '.join(sorted(kwargs))}")
    path = generate.resolve_checkpoint(checkpoint)
    self.model = lavida_jax.load_pretrained(path, dtype=dtype, mesh=_mesh(mesh),
                                            reference_compat=settings.as_bool(reference_compat))
    self.tokenizer = generate.load_tokenizer_for(path, tokenizer)
    if system_prompt is None:
      self.system_prompt = generate.system_prompt_for(path)
    else:
      self.system_prompt = None if system_prompt == "none" else self._resolve_system_prompt(
          system_prompt)
    self.decoding = settings.decoding_from_args(decoding)
    self.batch_size_per_gpu = int(batch_size) if str(batch_size) != "auto" else 8
    self.scorer = likelihood.Scorer(self.model, self.tokenizer, self.system_prompt,
                                    int(mc_num), int(mc_batch))
    self.seed, self.speed_log = int(seed), speed_log
    self.warmup, self.greedy = settings.as_bool(warmup), settings.as_bool(greedy)
    self._generators = {}

  # --- generation -----------------------------------------------------------------------

  def generator(self, cfg: sampler_lib.SamplerConfig, cache: str) -> generate.Generator:
    if (cfg, cache) not in self._generators:  # one compiled program per setting
      self._generators[cfg, cache] = generate.Generator(
          self.model, self.tokenizer, cfg, cache, system_prompt=self.system_prompt)
    return self._generators[cfg, cache]

  def _request(self, context, doc_to_visual, doc_id, task, split) -> generate.Request:
    visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
    visuals = [v for v in (visuals or []) if v is not None]
    if len(visuals) > 1:
      raise ValueError(f"{task} doc {doc_id} has {len(visuals)} images; lavida_jax "
                       "answers with one image per request")
    return generate.Request(context, visuals[0] if visuals else None)

  def _answer(self, gen, requests, chunk) -> list[generate.Result]:
    """One batch; a request that cannot be built gets its error, the rest go on."""
    reqs, results = {}, {}
    for i in chunk:
      try:
        reqs[i] = self._request(requests[i].args[0], *requests[i].args[2:])
      except ValueError as err:
        results[i] = generate.Result("", [], 0, 0.0, error=str(err))
    if reqs:
      batch = list(reqs.values())
      # A short batch (the last, or one with failed requests) is padded with copies of
      # its last request to the batch size: one compiled shape per setting, and a
      # row's answer does not depend on its batch-mates.
      batch += batch[-1:] * (self.batch_size_per_gpu - len(batch))
      for i, res in zip(reqs, evaluate.run_generation(gen, batch, len(batch))):
        results[i] = res
    return [results[i] for i in chunk]

  def generate_until(self, requests) -> list:
    groups: dict[tuple, list[int]] = {}
    for i, req in enumerate(requests):
      _, gen_kwargs, _, _, task, _ = req.args
      groups.setdefault((task, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(i)
    out = [None] * len(requests)
    for (task, _), idx in groups.items():
      gen_kwargs = requests[idx[0]].args[1]
      cfg, cache, until, unknown = settings.resolve(gen_kwargs, self.decoding,
                                                    self.model.cfg.lm.mask_id)
      if unknown:
        logger.warning(f"lavida_jax ignores gen_kwargs {unknown} of task {task}")
      fresh = (cfg, cache) not in self._generators
      gen = self.generator(cfg, cache)
      stops = gen.stop_ids()
      if fresh and self.warmup:  # compile outside the timed loop (speed is per answer)
        self._answer(gen, requests, idx[:self.batch_size_per_gpu])
      results, t0 = [], time.perf_counter()
      for start in range(0, len(idx), self.batch_size_per_gpu):
        results += self._answer(gen, requests, idx[start:start + self.batch_size_per_gpu])
      wall = time.perf_counter() - t0
      for i, res in zip(idx, results):
        if res.error:
          logger.error(f"lavida_jax: {task} doc {requests[i].args[3]}: {res.error}")
        answer = sampler_lib.stop_at(res.ids, stops)
        out[i] = GenerationResult(settings.cut_at(res.text, until).strip(),
                                  TokenCounts(output_tokens=len(answer)))
      self._report(task, cfg, cache, [r for r in results if not r.error], wall, len(idx),
                   sum(r.token_counts.output_tokens for r in (out[i] for i in idx)))
    return out

  def _report(self, task, cfg, cache, results, wall, n, tokens):
    """Speed beside the score: lmms-eval's `throughput` block and our JSONL."""
    speed = evaluate.speed(results, wall, n, cfg.gen_length, int(cache != "none"))
    log_metrics(total_elapsed_time=wall, total_gen_tokens=tokens,
                avg_speed=tokens / wall if wall > 0 else 0.0,
                additional_metrics={f"{task}/{k}": v for k, v in speed.items()})
    if self.speed_log:
      os.makedirs(os.path.dirname(os.path.abspath(self.speed_log)), exist_ok=True)
      with open(self.speed_log, "a") as f:
        f.write(json.dumps({"task": task, "n": n, "errors": n - len(results), **speed,
                            "gen_length": cfg.gen_length, "block_length": cfg.block_length,
                            "steps": cfg.steps, "decoder": cfg.decoder, "cache": cache,
                            "batch_size": self.batch_size_per_gpu}) + "\n")

  def generate_until_multi_round(self, requests) -> list:
    raise NotImplementedError("lavida_jax answers single-round requests only "
                              "(generate_until); multi-round tasks are not supported")

  # --- likelihood -----------------------------------------------------------------------

  def loglikelihood(self, requests) -> list:
    """(-ELBO, greedy) per request: lmms-eval's multiple choice takes the argmin, i.e.
    expects a loss (its issue #370), and LaViDa's harness returns -ELBO too; greedy is
    LLaDA's greedy agreement with `greedy=True`, else False (LaViDa's harness does not
    compute it: it costs a decoding per request). Consecutive requests sharing a
    prompt (a document's choices) share its prefix embedding; each request's noise
    comes from (seed, its index). A request that cannot be scored logs its error and
    gets +inf. Each pair is wrapped in a GenerationResult: 0.7.3's evaluator passes
    other outputs through `unwrap_generation_output`, which turns a (float, bool)
    tuple into its string."""
    out, prefixes = [], {}
    for n, req in enumerate(requests):
      if len(req.args) == 2:  # an unconditional choice (lmms-eval's mutual information)
        context, continuation = req.args
        key, build = ("", context), functools.partial(generate.Request, context)
      else:
        context, target, doc_to_visual, doc_id, task, split = req.args
        doc = self.task_dict[task][split][doc_id]
        continuation = target if isinstance(target, str) else target(doc)
        key = (task, split, doc_id, context)
        build = functools.partial(self._request, context, doc_to_visual, doc_id, task, split)
      rng = jax.random.fold_in(jax.random.key(self.seed), n)
      greedy = False
      try:
        if key not in prefixes:
          request = build()
          prefixes = {key: (request, self.scorer.prefix(request))}
        request, prefix = prefixes[key]
        loss = -self.scorer(prefix, continuation, rng)
        greedy = self.greedy and self.scorer.greedy(request,
                                                    self.tokenizer.encode(continuation))
      except ValueError as err:
        logger.error(f"lavida_jax loglikelihood: {key[:3]}: {err}")
        loss = float("inf")
      out.append(GenerationResult((loss, greedy)))
    return out
