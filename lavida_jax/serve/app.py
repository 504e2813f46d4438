"""The FastAPI app: OpenAI chat completions over the batching engine (SPEC §15).

  POST /v1/chat/completions   plain or streamed (SSE chat.completion.chunk)
  GET  /v1/models, /health, /metrics (Prometheus), /  (the page that shows the canvas)

Every client mistake is a 4xx `{"error": {"message", "type", "code"}}` naming the
problem; an unexpected failure is a 500 of the same shape, and the server goes on.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.resources
import json
import logging
import time
import uuid

import numpy as np
import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lavida_jax import generate
from lavida_jax import text as text_lib
from lavida_jax.diffusion import sampler as sampler_lib
from lavida_jax.serve import engine as engine_lib
from lavida_jax.serve import media, schema

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limits:
  max_tokens: int = 1024  # canvas length cap
  max_context: int | None = None  # prompt + canvas, below the model's own context
  max_image_bytes: int = 20 << 20
  max_image_pixels: int = 40_000_000
  request_timeout_s: float = 600.0
  media_dir: str | None = None


class ClientError(Exception):
  def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
               code: str | None = None, param: str | None = None):
    super().__init__(message)
    self.status, self.type, self.code, self.param = status, type_, code, param


def _error(status: int, message: str, type_: str, code=None, param=None) -> JSONResponse:
  body = schema.Error(error=schema.ErrorBody(message=message, type=type_, code=code,
                                             param=param))
  return JSONResponse(body.model_dump(), status_code=status)


class Metrics:
  """Prometheus series on the app's own registry (several apps in one process)."""

  def __init__(self, queue_depth):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("lavida_requests", "Chat completion requests by HTTP "
                                 "status.", ["status"], registry=r)
    self.latency = prom.Histogram("lavida_request_seconds", "Request latency (answered).",
                                  buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                  registry=r)
    self.batch = prom.Histogram("lavida_batch_size", "Requests per batch.",
                                buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
    self.nfe = prom.Histogram("lavida_nfe", "Forward passes per answer.",
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
    self.queue = prom.Gauge("lavida_queue_depth", "Requests waiting.", registry=r)
    self.queue.set_function(queue_depth)

  def on_batch(self, size: int, padded: int, seconds: float) -> None:
    del padded, seconds
    self.batch.observe(size)


def create_app(eng: engine_lib.Engine, defaults: engine_lib.Settings, model_name: str,
               limits: Limits = Limits(), metrics: Metrics | None = None) -> FastAPI:
  """The app over a running engine; `defaults`: settings of requests that set none."""
  app = FastAPI(title="lavida-jax", docs_url=None, redoc_url=None)
  metrics = metrics or Metrics(eng.queue_depth)
  eng.on_batch = metrics.on_batch
  app.state.engine, app.state.metrics = eng, metrics
  created = int(time.time())
  tok, model = eng.tokenizer, eng.model
  stops = generate.stop_ids(model, tok)

  # --- errors ------------------------------------------------------------------

  @app.exception_handler(ClientError)
  async def _client_error(request, e: ClientError):
    return _error(e.status, str(e), e.type, e.code, e.param)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, e: RequestValidationError):
    err = e.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    if err.get("type") == "json_invalid":
      return _error(400, f"the request body is not valid JSON: {err.get('msg')}",
                    "invalid_request_error")
    if not where:
      return _error(400, "the request body must be a JSON object (Content-Type: "
                    "application/json)", "invalid_request_error")
    return _error(400, f"{where or 'body'}: {err.get('msg')}", "invalid_request_error",
                  param=where or None)

  @app.exception_handler(HTTPException)
  async def _http(request, e: HTTPException):
    return _error(e.status_code, str(e.detail), "invalid_request_error")

  @app.exception_handler(Exception)
  async def _internal(request, e: Exception):
    log.exception("internal error")
    return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

  @app.middleware("http")
  async def _count(request: Request, call_next):
    response = await call_next(request)
    if request.url.path == "/v1/chat/completions":
      metrics.requests.labels(str(response.status_code)).inc()
    return response

  # --- routes ------------------------------------------------------------------

  @app.get("/", response_class=HTMLResponse)
  async def page():
    return (importlib.resources.files("lavida_jax.serve") / "page.html").read_text()

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, "queue": eng.queue_depth()}

  @app.get("/metrics")
  async def prometheus():
    return Response(prom.generate_latest(metrics.registry),
                    media_type=prom.CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def models() -> schema.ModelList:
    return schema.ModelList(data=[schema.ModelCard(id=model_name, created=created)])

  @app.post("/v1/chat/completions")
  async def chat(req: schema.ChatRequest, request: Request):
    t0 = time.perf_counter()
    if req.model not in (None, model_name):
      raise ClientError(404, f"model {req.model!r} not found; this server serves "
                        f"{model_name!r}", "invalid_request_error", "model_not_found", "model")
    settings = _settings(req, defaults, limits)
    rid, loop = f"chatcmpl-{uuid.uuid4().hex[:24]}", asyncio.get_running_loop()
    events: asyncio.Queue | None = asyncio.Queue() if req.stream else None
    with eng.arriving():  # (submitted inside: the worker waits for it meanwhile)
      job = await run_in_threadpool(_job, req, settings, eng, limits)
      if req.stream:
        job.on_step = lambda canvas, step: loop.call_soon_threadsafe(
            events.put_nowait, (canvas, step))
      try:
        future = eng.submit(job)
      except engine_lib.QueueFull as e:
        raise ClientError(429, str(e), "rate_limit_error", "queue_full") from None
    prompt_tokens = generate.prompt_length(model, *job.prompt)

    def usage(ids, nfe, seconds) -> schema.Usage:
      n = len(sampler_lib.stop_at(list(ids), stops))
      return schema.Usage(prompt_tokens=prompt_tokens, completion_tokens=n,
                          total_tokens=prompt_tokens + n, nfe=nfe, denoise_seconds=seconds)

    def finish(ids) -> str:
      return "stop" if any(int(i) in stops for i in ids) else "length"

    if not req.stream:
      ids, nfe, seconds = await _wait(future, job, limits)
      gen_text = decode(ids)
      metrics.latency.observe(time.perf_counter() - t0)
      metrics.nfe.observe(nfe)
      return schema.ChatCompletion(
          id=rid, created=int(time.time()), model=model_name,
          choices=[schema.Choice(message=schema.AnswerMessage(content=gen_text),
                                 finish_reason=finish(ids))],
          usage=usage(ids, nfe, seconds))

    def chunk(delta: schema.Delta, finish_reason=None, usage_=None, canvas=None) -> str:
      c = schema.ChatChunk(id=rid, created=int(time.time()), model=model_name,
                           choices=[schema.ChunkChoice(delta=delta,
                                                       finish_reason=finish_reason)],
                           usage=usage_, lavida=canvas)
      return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

    async def sse():
      sent, mask_id = "", job.settings.sampler.mask_id

      def step_chunk(canvas, step) -> str:
        nonlocal sent
        new = decode(committed_prefix(canvas, mask_id))
        delta = new[len(sent):] if new.startswith(sent) else ""
        sent += delta
        view = schema.Canvas(step=step, seconds=round(time.perf_counter() - t0, 4),
                             tokens=canvas_tokens(canvas, mask_id))
        return chunk(schema.Delta(content=delta or None), canvas=view)

      try:
        yield chunk(schema.Delta(role="assistant", content=""))
        waiter = asyncio.ensure_future(_wait(future, job, limits))
        while True:
          getter = asyncio.ensure_future(events.get())
          await asyncio.wait({waiter, getter}, return_when=asyncio.FIRST_COMPLETED)
          if not getter.done():
            getter.cancel()
            break
          yield step_chunk(*getter.result())
        while not events.empty():  # steps posted before the result (callbacks are FIFO)
          yield step_chunk(*events.get_nowait())
        try:
          ids, nfe, seconds = waiter.result()
        except Exception as e:  # pylint: disable=broad-except
          kind = e.type if isinstance(e, ClientError) else "server_error"
          yield f"data: {json.dumps({'error': {'message': str(e), 'type': kind}})}\n\n"
          return
        final = decode(ids)
        rest = final[len(sent):] if final.startswith(sent) else ""
        if not final.startswith(sent):
          log.warning("streamed text %r is not a prefix of the answer %r", sent, final)
        metrics.latency.observe(time.perf_counter() - t0)
        metrics.nfe.observe(nfe)
        yield chunk(schema.Delta(content=rest or None), finish(ids), usage(ids, nfe, seconds))
        yield "data: [DONE]\n\n"
      finally:
        job.cancelled = True  # a client gone mid-stream: its queued job is dropped

    return StreamingResponse(sse(), media_type="text/event-stream")

  def decode(ids) -> str:
    return generate.decode_answer(tok, np.asarray(ids), stops)

  def canvas_tokens(canvas, mask_id) -> list[str | None]:
    return [None if int(i) == mask_id else tok.decode([int(i)]) for i in canvas]

  return app


def committed_prefix(canvas, mask_id: int) -> np.ndarray:
  """The canvas up to its first mask: text that no later step can change."""
  masked = np.flatnonzero(np.asarray(canvas) == mask_id)
  return np.asarray(canvas)[:masked[0] if len(masked) else len(canvas)]


async def _wait(future, job, limits: Limits):
  try:
    return await asyncio.wait_for(asyncio.wrap_future(future), limits.request_timeout_s)
  except (asyncio.TimeoutError, engine_lib.Timeout):
    job.cancelled = True
    raise ClientError(408, f"the request took longer than the server's "
                      f"{limits.request_timeout_s:g} s timeout", "timeout_error",
                      "timeout") from None


def _settings(req: schema.ChatRequest, defaults: engine_lib.Settings,
              limits: Limits) -> engine_lib.Settings:
  """The request's sampler settings (its fields over the server's defaults)."""
  d = defaults.sampler
  length = req.max_tokens or req.max_completion_tokens or d.gen_length
  if length > limits.max_tokens:
    raise ClientError(400, f"max_tokens={length} exceeds the server's cap of "
                      f"{limits.max_tokens}", param="max_tokens")
  block = req.block_length or min(d.block_length, length)
  steps = req.steps
  if steps is None:  # the default steps per token, whole steps per block
    blocks = max(length // block, 1)
    steps = max(round(length * d.steps / d.gen_length / blocks), 1) * blocks
  cache = req.cache or defaults.cache
  if cache not in generate.CACHES:
    raise ClientError(400, f"cache={cache!r}: expected one of {', '.join(generate.CACHES)}",
                      param="cache")
  decoder = req.decoder or d.decoder
  lookahead = req.lookahead
  if lookahead is None:  # the server's, where it applies (it never changes the tokens)
    lookahead = d.lookahead if decoder == "fixed" and cache == "prefix" else 0
  if lookahead and cache != "prefix":
    raise ClientError(400, f"lookahead needs cache='prefix', got {cache!r}", param="lookahead")
  try:
    cfg = dataclasses.replace(
        d, gen_length=length, block_length=block, steps=steps,
        schedule=req.schedule or d.schedule, alpha=req.alpha or d.alpha,
        temperature=d.temperature if req.temperature is None else req.temperature,
        decoder=decoder, threshold=req.threshold or d.threshold,
        factor=req.factor or d.factor, lookahead=lookahead)
  except ValueError as e:
    raise ClientError(400, f"diffusion settings: {e}") from None
  return engine_lib.Settings(cfg, cache)


def _job(req: schema.ChatRequest, settings: engine_lib.Settings, eng: engine_lib.Engine,
         limits: Limits) -> engine_lib.Job:
  """Messages -> prompt ids and images (host work, off the event loop) -> a Job."""
  messages, images, system = [], [], eng.system_prompt
  for m in req.messages:
    if isinstance(m.content, str):
      content = m.content
    else:
      # LLaVA's order whatever the parts' order: `<image>\n{text}`, as in training
      texts = [p.text for p in m.content if p.type == "text"]
      urls = [p.image_url.url for p in m.content if p.type == "image_url"]
      for url in urls:
        try:
          images.append(media.load(url, max_bytes=limits.max_image_bytes,
                                   max_pixels=limits.max_image_pixels,
                                   media_dir=limits.media_dir))
        except media.MediaError as e:
          raise ClientError(400, str(e), param="messages") from None
      content = "\n".join([text_lib.IMAGE_TOKEN] * len(urls) + texts)
    if m.role == "system":
      system = content
    else:
      messages.append({"role": m.role, "content": content})
  if not messages or messages[-1]["role"] != "user":
    raise ClientError(400, "the last message must be the user's", param="messages")
  if len(images) > 1:
    raise ClientError(400, f"one image per request is supported, got {len(images)}",
                      param="messages")
  try:
    prompt = generate.chat_ids(eng.model, eng.tokenizer, messages, images, system)
  except ValueError as e:
    raise ClientError(400, str(e), param="messages") from None
  cfg = settings.sampler
  n = generate.prompt_length(eng.model, *prompt)
  try:
    generate.check_context(eng.model, [prompt], cfg.gen_length)
    if limits.max_context and n + cfg.gen_length > limits.max_context:
      raise ValueError(f"prompt of {n} tokens (images expanded) + max_tokens "
                       f"{cfg.gen_length} exceeds the server's context cap of "
                       f"{limits.max_context} tokens")
  except ValueError as e:
    raise ClientError(400, str(e), "invalid_request_error", "context_length_exceeded",
                      "messages") from None
  canvas = np.full((cfg.gen_length,), cfg.mask_id, np.int32)
  if req.draft is not None:
    ids = eng.tokenizer.encode(req.draft)
    if len(ids) > cfg.gen_length:
      raise ClientError(400, f"draft of {len(ids)} tokens exceeds max_tokens "
                        f"{cfg.gen_length}", param="draft")
    canvas[:len(ids)] = ids
  return engine_lib.Job(settings, prompt, generate.bucket(n), canvas,
                        time.monotonic() + limits.request_timeout_s)
