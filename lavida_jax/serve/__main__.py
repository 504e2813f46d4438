"""python -m lavida_jax.serve --checkpoint=DIR_OR_HUB_ID [--port=8000] [--max_batch=16]

Loads the model, compiles and runs every batch size of the default settings for
the prompt buckets of a one-image question (the warm-up), prints when it is
ready, then serves the OpenAI chat-completions API and the page at /.
Library logs go to --log_file, not the console.
"""
from __future__ import annotations

import logging
import os
import time

from absl import app, flags

from lavida_jax import generate

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Checkpoint folder or hub id (as generate).",
                    required=True)
flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
flags.DEFINE_integer("port", 8000, "Port (0: a free one, printed).")
flags.DEFINE_list("mesh", None, "data,fsdp,tensor sizes, e.g. 1,8,1 (default: one device).")
flags.DEFINE_integer("max_batch", 16, "Most requests in one batch.")
flags.DEFINE_float("batch_window_ms", 5.0, "How long the oldest request waits for others.")
flags.DEFINE_integer("max_queue", 256, "Waiting requests beyond this get 429.")
flags.DEFINE_float("request_timeout_s", 600.0, "A request waiting or running longer: 408.")
flags.DEFINE_string("allow_media_dir", None, "Local image paths are read only inside this.")
flags.DEFINE_integer("max_image_bytes", 20 << 20, "Encoded image size cap.")
flags.DEFINE_integer("max_image_pixels", 40_000_000, "Decoded image size cap (bombs).")
flags.DEFINE_integer("max_tokens", 1024, "Cap on a request's max_tokens (canvas length).")
flags.DEFINE_integer("max_context", 0, "Prompt (images expanded) + canvas cap below the "
                     "model's own context (0: the model's, config.json's).")
flags.DEFINE_string("served_model_name", None, "Model id in the API (default: the "
                    "checkpoint's folder or hub name).")
flags.DEFINE_string("tokenizer", None, "Tokenizer file/folder (default: beside the checkpoint).")
flags.DEFINE_string("dtype", "float32", "Parameter dtype.")
flags.DEFINE_boolean("warmup", True, "Compile the default settings' programs before serving.")
flags.DEFINE_integer("warmup_tokens", 128, "Warm the prompt buckets of a one-image question "
                     "with up to this many text tokens.")
flags.DEFINE_string("log_file", None, "Library logs (default: $TMPDIR/lavida_jax_serve.log).")
generate.define_decoding_flags()
generate.define_quantize_flag()


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  import uvicorn

  import lavida_jax
  from lavida_jax import sharding
  from lavida_jax.serve import app as app_lib
  from lavida_jax.serve import engine as engine_lib

  log_file = FLAGS.log_file or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                            "lavida_jax_serve.log")
  logging.basicConfig(filename=log_file, level=logging.INFO, force=True)
  t0 = time.perf_counter()
  checkpoint = generate.resolve_checkpoint(FLAGS.checkpoint)
  mesh = sharding.make_mesh([int(s) for s in FLAGS.mesh]) if FLAGS.mesh else None
  model = lavida_jax.load_pretrained(checkpoint, dtype=FLAGS.dtype, mesh=mesh,
                                     quantize=FLAGS.quantize)
  tokenizer = generate.load_tokenizer_for(checkpoint, FLAGS.tokenizer)
  try:
    cfg, cache = generate.decoding_from_flags(FLAGS, model.cfg.lm.mask_id)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  defaults = engine_lib.Settings(cfg, cache)
  eng = engine_lib.Engine(model, tokenizer, generate.system_prompt_for(checkpoint),
                          max_batch=FLAGS.max_batch, batch_window_ms=FLAGS.batch_window_ms,
                          max_queue=FLAGS.max_queue)
  name = FLAGS.served_model_name or (
      FLAGS.checkpoint if not os.path.exists(FLAGS.checkpoint)
      else os.path.basename(os.path.abspath(FLAGS.checkpoint)))
  print(f"loaded {name} ({model.cfg.family}) in {time.perf_counter() - t0:.1f} s",
        flush=True)
  if FLAGS.warmup:
    buckets = warm_buckets(model, FLAGS.warmup_tokens)
    seconds = eng.warmup(defaults, buckets)
    print(f"warmed {len(eng.sizes)} batch sizes ({', '.join(map(str, eng.sizes))}) x "
          f"prompt buckets {', '.join(map(str, buckets))} in {seconds:.1f} s", flush=True)
  limits = app_lib.Limits(
      max_tokens=FLAGS.max_tokens, max_context=FLAGS.max_context or None,
      max_image_bytes=FLAGS.max_image_bytes, max_image_pixels=FLAGS.max_image_pixels,
      request_timeout_s=FLAGS.request_timeout_s, media_dir=FLAGS.allow_media_dir)
  api = app_lib.create_app(eng, defaults, name, limits)
  config = uvicorn.Config(api, host=FLAGS.host, port=FLAGS.port, log_level="warning",
                          access_log=False)
  server = uvicorn.Server(config)
  _announce(server, name)
  try:
    server.run()
  except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
    pass
  finally:
    eng.close()
  print("stopped", flush=True)


def warm_buckets(model, text_tokens: int) -> list[int]:
  """Prompt buckets of a one-image question of up to `text_tokens` tokens of text
  (the image as a square one: the fewest anyres tokens)."""
  from PIL import Image

  from lavida_jax import image as image_lib
  s = model.cfg.image.size
  n = model.layout(*image_lib.process_anyres(Image.new("RGB", (s, s)),
                                             model.cfg.image)).num_tokens
  lo, hi = generate.bucket(n), generate.bucket(n + text_tokens)
  return [b for b in generate.PREFIX_BUCKETS if lo <= b <= hi]


def _announce(server, name: str) -> None:
  """Prints the address once uvicorn listens (its port may have been 0)."""
  started = server.startup

  async def startup(sockets=None):
    await started(sockets=sockets)
    for s in server.servers:
      for sock in s.sockets:
        host, port = sock.getsockname()[:2]
        print(f"serving {name} on http://{host}:{port}  (page: /, API: /v1/chat/completions)",
              flush=True)
  server.startup = startup


if __name__ == "__main__":
  app.run(main)
