"""Serving: an OpenAI-compatible HTTP server over dynamically batched generation.

  engine.py   the request queue and the batching worker (compiled programs)
  schema.py   the chat-completions wire format (pydantic)
  media.py    images from messages (data URLs; local files inside one folder)
  app.py      the FastAPI routes, errors, streaming, metrics
  page.html   the page at / that shows the canvas being unmasked
  __main__.py python -m lavida_jax.serve --checkpoint=DIR_OR_HUB_ID
"""
