"""The OpenAI-compatible server (issue 13) on localhost, called by the official
`openai` client and by raw HTTP: answers equal `generate`'s for the same settings
(greedy), alone, streamed, with an image and in concurrent batches; every bad
input is a 4xx JSON error naming the problem and the server goes on."""
import base64
import concurrent.futures
import io
import json
import socket
import struct
import threading
import time
import zlib

import numpy as np
import openai
import pytest
import requests
import uvicorn
from PIL import Image

from lavida_jax import generate
from lavida_jax.diffusion.sampler import SamplerConfig
from lavida_jax.serve import app as app_lib
from lavida_jax.serve import engine as engine_lib

NAME = "tiny-lavida"
L, LB, STEPS = 16, 8, 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """uvicorn on a free localhost port, in a thread."""

  def __init__(self, api):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=self.port,
                                                log_level="warning", access_log=False))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      assert time.monotonic() < deadline, "the server did not start"
      time.sleep(0.02)

  def stop(self):
    self.server.should_exit = True
    self.thread.join(timeout=10)


def _png(size=(40, 30), seed=0) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _data_url(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode()


def _bomb_png(width=100_000, height=100_000) -> bytes:
  """A tiny PNG whose header declares width x height pixels."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def served(loaded, tiny_tokenizer):
  """(server, engine, model, tokenizer, default settings) for the tiny LLaDA model."""
  _, model = loaded("lavida-llada")
  # Only ids that are words: this random model would otherwise answer most image
  # questions with stop or out-of-vocabulary ids (""), and equal answers prove little
  silent = tuple(i for i in range(model.cfg.lm.vocab_size)
                 if not tiny_tokenizer.decode([i]).strip() and i != model.cfg.lm.mask_id)
  cfg = SamplerConfig(gen_length=L, block_length=LB, steps=STEPS,
                      mask_id=model.cfg.lm.mask_id, forbid_ids=silent)
  defaults = engine_lib.Settings(cfg, "prefix")
  eng = engine_lib.Engine(model, tiny_tokenizer, None, max_batch=8, batch_window_ms=30,
                          max_queue=64)
  limits = app_lib.Limits(max_tokens=64, max_context=1000, max_image_bytes=100_000,
                          max_image_pixels=1_000_000, request_timeout_s=120)
  server = Server(app_lib.create_app(eng, defaults, NAME, limits))
  yield server, eng, model, tiny_tokenizer, defaults
  server.stop()
  eng.close()


@pytest.fixture(scope="module")
def client(served):
  return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0)


def _reference(served, prompt, image=None, **cfg_kw):
  """`generate`'s answer for the same settings."""
  _, _, model, tok, defaults = served
  cfg = defaults.sampler
  if cfg_kw:
    import dataclasses
    cfg = dataclasses.replace(cfg, **cfg_kw)
  gen = generate.Generator(model, tok, cfg, defaults.cache, system_prompt=None)
  pil = Image.open(io.BytesIO(image)) if image else None
  return gen([generate.Request(prompt, pil)])[0]


def _ask(client, prompt, image=None, **kw):
  content = [{"type": "text", "text": prompt}]
  if image is not None:
    content.append({"type": "image_url", "image_url": {"url": _data_url(image)}})
  return client.chat.completions.create(model=NAME, messages=[{"role": "user",
                                                                "content": content}],
                                        temperature=0, **kw)


def test_models_health_and_page(served):
  url = served[0].url
  assert [m["id"] for m in requests.get(url + "/v1/models").json()["data"]] == [NAME]
  assert requests.get(url + "/health").json()["status"] == "ok"
  page = requests.get(url + "/")
  assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_plain_and_image_answers_equal_generate(served, client):
  for prompt, image in (("what colour is the circle ?", None),
                        ("how many shapes are there ?", _png((40, 30), 1))):
    ref = _reference(served, prompt, image)
    got = _ask(client, prompt, image)
    assert ref.text and got.choices[0].message.content == ref.text
    assert got.usage.nfe == ref.nfe  # extra fields come through the client
    assert got.model == NAME and got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.completion_tokens <= L


def test_diffusion_settings_as_extra_body(served, client):
  ref = _reference(served, "a red square", decoder="threshold", threshold=0.5,
                   stop_ids=tuple(generate.stop_ids(served[2], served[3])))
  got = _ask(client, "a red square", extra_body={"decoder": "threshold", "threshold": 0.5})
  assert got.choices[0].message.content == ref.text and got.usage.nfe == ref.nfe
  ref = _reference(served, "a red square", gen_length=32, steps=8, block_length=8)
  got = _ask(client, "a red square", max_tokens=32, extra_body={"steps": 8})
  assert got.choices[0].message.content == ref.text
  got = _ask(client, "a red square", max_tokens=32, extra_body={"steps": 8, "lookahead": 2})
  assert got.choices[0].message.content == ref.text and got.usage.nfe <= ref.nfe


def test_stream_prints_the_answer_and_the_canvas_fills(served, client):
  prompt, image = "what is the red square ?", _png((30, 40), 2)
  whole = _ask(client, prompt, image).choices[0].message.content
  chunks = list(_ask(client, prompt, image, stream=True))
  text = "".join(c.choices[0].delta.content or "" for c in chunks)
  assert whole and text == whole
  canvases = [c.lavida for c in chunks if getattr(c, "lavida", None)]
  assert len(canvases) == STEPS  # one per step of the fixed decoder
  masked = [sum(t is None for t in c["tokens"]) for c in canvases]
  assert masked == sorted(masked, reverse=True) and masked[-1] == 0 and masked[0] < L
  assert [c["step"] for c in canvases] == list(range(1, STEPS + 1))
  assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.nfe


def test_concurrent_requests_are_batched_and_answer_as_alone(served, client):
  prompts = [f"what colour is the {w} ?" for w in
             ("circle", "square", "triangle", "red", "blue", "green", "shapes", "one")]
  images = [_png((40 + 3 * i, 30), 10 + i) if i % 2 else None for i in range(len(prompts))]
  before = _batches(served)
  with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
    got = list(pool.map(lambda a: _ask(client, *a).choices[0].message.content,
                        zip(prompts, images)))
  for p, im, g in zip(prompts, images, got):
    assert g and g == _reference(served, p, im).text
  count, total = _batches(served)
  assert total - before[1] == len(prompts) and count - before[0] < len(prompts)


def _batches(served):
  """(batches run, requests in them) from /metrics."""
  text = requests.get(served[0].url + "/metrics").text
  get = lambda key: float(next(line.split()[-1] for line in text.splitlines()
                               if line.startswith(key)))
  return get("lavida_batch_size_count"), get("lavida_batch_size_sum")


def _post(served, body, raw=None):
  data = raw if raw is not None else json.dumps(body)
  r = requests.post(served[0].url + "/v1/chat/completions", data=data,
                    headers={"Content-Type": "application/json"})
  return r.status_code, r.json()


def _msg(content):
  return {"messages": [{"role": "user", "content": content}]}


def _image_msg(url):
  return _msg([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": url}}])


@pytest.mark.parametrize("body,raw,status,words", [
    (None, "{not json", 400, "not valid JSON"),
    (None, "[1, 2]", 400, "JSON object"),
    ({"messages": "hi"}, None, 400, "messages"),
    (_msg(5), None, 400, "content"),
    ({**_msg("hi"), "max_tokens": "many"}, None, 400, "max_tokens"),
    ({**_msg("hi"), "max_tokens": 1000}, None, 400, "cap of 64"),
    ({**_msg("hi"), "model": "gpt-4o"}, None, 404, "'gpt-4o' not found"),
    ({**_msg("hi"), "steps": 7}, None, 400, "steps"),
    ({**_msg("hi"), "decoder": "fast"}, None, 400, "decoder"),
    ({**_msg("hi"), "cache": "big"}, None, 400, "cache"),
    ({**_msg("hi"), "lookahead": 1, "cache": "dual"}, None, 400, "lookahead needs cache='prefix'"),
    ({**_msg("hi"), "lookahead": 1, "decoder": "threshold"}, None, 400,
     "lookahead needs the fixed decoder"),
    ({**_msg("hi " * 1000)}, None, 400, "context cap of 1000"),
    ({**_msg("hi " * 5000)}, None, 400, "model's context of 4096"),
    (_image_msg("data:image/png;base64,%%%"), None, 400, "not valid base64"),
    (_image_msg(_data_url(b"not an image at all")), None, 400, "image"),
    (_image_msg(_data_url(_png()[:60])), None, 400, "image"),
    (_image_msg(_data_url(_bomb_png())), None, 400, "pixels"),
    (_image_msg(_data_url(b"\0" * 120_000)), None, 400, "exceeds the server's limit"),
    (_image_msg("https://example.com/cat.png"), None, 400, "not fetched"),
    (_image_msg("/etc/passwd"), None, 400, "local image paths are refused"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, None, 400, "user"),
], ids=lambda x: x if isinstance(x, str) and len(x) < 30 else None)
def test_bad_requests_get_4xx_json_errors_naming_the_problem(served, body, raw, status,
                                                             words):
  got_status, got = _post(served, body, raw)
  assert got_status == status, got
  assert words in got["error"]["message"], got
  assert set(got["error"]) >= {"message", "type", "code"}


def test_the_server_goes_on_after_bad_requests(served, client):
  for _ in range(3):
    _post(served, None, "{")
    _post(served, _image_msg(_data_url(b"junk")))
  assert _ask(client, "a circle").choices[0].message.content == _reference(
      served, "a circle").text
  text = requests.get(served[0].url + "/metrics").text
  assert 'lavida_requests_total{status="400"}' in text


def test_a_full_queue_answers_429_and_a_client_gone_frees_its_slot(served):
  server, eng = served[0], served[1]
  before = _batches(served)
  with eng.paused():
    eng._max_queue, old = 1, eng._max_queue
    try:
      streamed = requests.post(server.url + "/v1/chat/completions", stream=True,
                               json={**_msg("a circle"), "stream": True})
      first = next(streamed.iter_lines())  # the role chunk: the job is queued
      assert first.startswith(b"data: ")
      status, body = _post(served, _msg("a square"))
      assert status == 429 and "queue is full" in body["error"]["message"]
      streamed.close()  # the client goes away before its job ran
      deadline = time.monotonic() + 10
      while not eng._queue[0].cancelled:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    finally:
      eng._max_queue = old
  deadline = time.monotonic() + 10
  while eng.queue_depth():
    assert time.monotonic() < deadline
    time.sleep(0.02)
  assert _batches(served) == before  # dropped, never run


def test_a_request_past_its_timeout_gets_408(served):
  _, eng, _, _, defaults = served
  limits = app_lib.Limits(max_tokens=64, max_context=1000, request_timeout_s=0.2)
  other = Server(app_lib.create_app(eng, defaults, NAME, limits))
  try:
    with eng.paused():  # past the timeout
      r = [None]
      t = threading.Thread(target=lambda: r.__setitem__(0, requests.post(
          other.url + "/v1/chat/completions", json=_msg("a circle"))))
      t.start()
      t.join(timeout=5)
    assert r[0].status_code == 408 and "timeout" in r[0].json()["error"]["message"]
  finally:
    other.stop()


def test_engine_pads_batches_to_compiled_sizes():
  assert engine_lib.batch_sizes(16) == [1, 2, 4, 8, 16]
  assert engine_lib.batch_sizes(12) == [1, 2, 4, 8, 12]
  assert engine_lib.batch_sizes(1) == [1]


def _chromium():
  import shutil
  return shutil.which("chromium") and shutil.which("chromedriver")


@pytest.mark.skipif(not _chromium(), reason="Debian's chromium and chromium-driver are not "
                    "installed (.ci/run installs them)")
def test_the_page_unmasks_the_answer_in_a_browser(served, client, tmp_path):
  """Headless Chromium: pick an image, ask, watch the canvas; the page's final answer
  equals the API's, and a screenshot is saved as a test artifact."""
  import os
  import shutil

  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  image = _png((48, 36), 7)
  path = tmp_path / "scene.png"
  path.write_bytes(image)
  question = "how many shapes are there ?"
  expected = _ask(client, question, image).choices[0].message.content
  assert expected  # (a test of something: this random model's answer is not empty)

  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium")
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1000,800"):
    options.add_argument(arg)
  driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
  try:
    driver.get(served[0].url + "/")
    driver.find_element(By.ID, "image").send_keys(str(path))
    WebDriverWait(driver, 20).until(
        lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:"))
    box = driver.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "send").click()
    answer = driver.find_element(By.ID, "answer")
    WebDriverWait(driver, 60).until(lambda d: answer.get_attribute("data-done") == "1"
                                    or d.find_element(By.ID, "error").text)
    assert driver.find_element(By.ID, "error").text == ""
    assert answer.text == expected
    tokens = driver.find_elements(By.CSS_SELECTOR, "#canvas .tok")
    assert len(tokens) == L and not driver.find_elements(By.CSS_SELECTOR, "#canvas .mask")
    assert f"step {STEPS}" in driver.find_element(By.ID, "status").text
    folder = os.environ.get("LAVIDA_TEST_ARTIFACTS",
                            os.path.join(os.path.dirname(__file__), "..", "test-artifacts"))
    os.makedirs(folder, exist_ok=True)
    shot = os.path.join(folder, "serve_page.png")
    assert driver.save_screenshot(shot) and os.path.getsize(shot) > 1000
  finally:
    driver.quit()


def test_the_cli_warms_up_serves_and_stops(reference_checkpoint, tiny_tokenizer, tmp_path):
  """python -m lavida_jax.serve (a subprocess, --port=0, the model on a 1x4x2 mesh of
  8 CPU devices): it prints its warm-up and address, answers as `generate` does on
  one device, and shuts down on SIGINT."""
  import os
  import signal
  import subprocess
  import sys

  import lavida_jax

  _, folder = reference_checkpoint("lavida-llada")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(
      [sys.executable, "-m", "lavida_jax.serve", f"--checkpoint={folder}", "--port=0",
       f"--tokenizer={tiny_tokenizer.name}", "--gen_length=8", "--block_length=4",
       "--steps=4", "--max_batch=2", "--warmup_tokens=0", f"--log_file={tmp_path}/log",
       "--served_model_name=tiny", "--mesh=1,4,2"],
      cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    lines = []
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("serving"):
        break
    out = "".join(lines)
    assert "warmed 2 batch sizes (1, 2)" in out and "serving tiny on http://" in out, (
        out + proc.stderr.read() if proc.poll() is not None else out)
    url = out.split("on ")[-1].split()[0]
    got = openai.OpenAI(base_url=url + "/v1", api_key="none").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a red square"}])
    model = lavida_jax.load_pretrained(folder)
    cfg = SamplerConfig(gen_length=8, block_length=4, steps=4, mask_id=model.cfg.lm.mask_id)
    want = generate.Generator(model, tiny_tokenizer, cfg, "prefix")(
        [generate.Request("a red square")])[0]
    assert got.choices[0].message.content == want.text and got.usage.nfe == want.nfe
  finally:
    proc.send_signal(signal.SIGINT)  # uvicorn shuts down, then re-raises the signal
    assert proc.wait(timeout=30) == 0
  assert "Traceback" not in proc.stderr.read()
