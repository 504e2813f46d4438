"""Load and soak of `python -m lavida_jax.serve` with the stock `openai` client (issue 13).

Starts the server (a subprocess) on a trained demo checkpoint, then:
  load   N concurrent clients (threads, one `openai.OpenAI` each) for N in --clients,
         each asking held-out demo scenes to be described (an image + question):
         answers/s, p50/p95 latency, mean batch size (the server's /metrics), and the
         answers' exact match against the scenes' captions (quality beside speed);
         every answer must equal the 1-client answer to the same request (greedy).
  soak   --soak requests at --soak_clients, --bad of them malformed (bad JSON, bad
         image, unknown model, max_tokens over the cap): every good request answered
         correctly, every bad one a 4xx, the server alive; its RSS sampled throughout.

  python -m lavida_jax.main                                   # the demo checkpoint
  python benchmarks/serve_load.py --workdir=/tmp/lavida_jax_demo

Not a timed test: the figures go to benchmarks/README.md. The client threads share
the machine with the server (on 2 cores they compete for them).
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(args) -> tuple[subprocess.Popen, str, str]:
  cmd = [sys.executable, "-m", "lavida_jax.serve", f"--checkpoint={args.checkpoint}",
         "--port=0", f"--max_batch={args.max_batch}",
         f"--batch_window_ms={args.batch_window_ms}", f"--gen_length={args.gen_length}",
         f"--block_length={args.gen_length}", f"--steps={args.steps}",
         f"--max_queue={args.max_queue}", "--served_model_name=demo",
         f"--decoder={args.decoder}", f"--cache={args.cache}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = []
  for line in proc.stdout:
    lines.append(line.rstrip())
    print("  server:", line.rstrip(), flush=True)
    if line.startswith("serving"):
      break
  if proc.poll() is not None:
    raise SystemExit("the server did not start:\n" + "\n".join(lines))
  threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
  url = lines[-1].split(" on ")[1].split()[0]
  return proc, url, "\n".join(lines)


def requests_from_demo(folder: str, n: int) -> list[dict]:
  """Held-out describe records -> [{"messages", "caption"}] (images inline)."""
  rows = [json.loads(line) for line in open(os.path.join(folder, "captions_heldout.jsonl"))]
  out = []
  for r in rows[:n]:
    with open(os.path.join(folder, "images", r["image"]), "rb") as f:
      url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    question = r["conversations"][0]["value"].replace("<image>", "").strip()
    out.append(dict(caption=r["conversations"][1]["value"], messages=[{
        "role": "user", "content": [{"type": "text", "text": question},
                                    {"type": "image_url", "image_url": {"url": url}}]}]))
  return out


def batch_stats(url: str) -> tuple[float, float]:
  text = requests.get(url + "/metrics", timeout=10).text
  get = lambda key: float(next(line.split()[-1] for line in text.splitlines()
                               if line.startswith(key)))
  return get("lavida_batch_size_count"), get("lavida_batch_size_sum")


def cpu_seconds(pid: int) -> float:
  """User + system CPU time of a process so far."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
  return kb / 1024


def run_load(url: str, work: list[tuple[int, dict]], clients: int):
  """Sends `work` [(index, request)] from `clients` threads -> (answers by index,
  latencies, seconds)."""
  answers, latencies, lock = {}, [], threading.Lock()
  queue = list(reversed(work))

  def client_loop():
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                           timeout=600)
    while True:
      with lock:
        if not queue:
          return
        i, req = queue.pop()
      t0 = time.perf_counter()
      got = client.chat.completions.create(model="demo", messages=req["messages"],
                                           temperature=0)
      dt = time.perf_counter() - t0
      with lock:
        answers.setdefault(i, []).append(got.choices[0].message.content)
        latencies.append(dt)

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    for f in [pool.submit(client_loop) for _ in range(clients)]:
      f.result()
  return answers, latencies, time.perf_counter() - t0


def bad_request(kind: int) -> tuple[str, dict]:
  """(raw body, headers) of a malformed request of one of four kinds."""
  h = {"Content-Type": "application/json"}
  msg = lambda content: {"role": "user", "content": content}
  if kind == 0:
    return '{"messages": [', h
  if kind == 1:
    return json.dumps({"messages": [msg([{"type": "text", "text": "hi"}, {
        "type": "image_url", "image_url": {"url": "data:image/png;base64,AAAAAAAA"}}])]}), h
  if kind == 2:
    return json.dumps({"model": "gpt-4o", "messages": [msg("hi")]}), h
  return json.dumps({"messages": [msg("hi")], "max_tokens": 10 ** 6}), h


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="/tmp/lavida_jax_demo", help="a demo run")
  ap.add_argument("--checkpoint", default=None, help="default: WORKDIR/checkpoints")
  ap.add_argument("--clients", default="1,4,16,64")
  ap.add_argument("--per_client", type=int, default=16, help="requests per client "
                  "(at least --min_requests in all)")
  ap.add_argument("--min_requests", type=int, default=64)
  ap.add_argument("--distinct", type=int, default=200, help="distinct held-out scenes")
  ap.add_argument("--max_batch", type=int, default=16)
  ap.add_argument("--max_queue", type=int, default=1024)
  ap.add_argument("--batch_window_ms", type=float, default=5.0)
  ap.add_argument("--gen_length", type=int, default=12)
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--decoder", default="fixed")
  ap.add_argument("--cache", default="prefix")
  ap.add_argument("--soak", type=int, default=2000)
  ap.add_argument("--soak_clients", type=int, default=16)
  ap.add_argument("--bad", type=float, default=0.1)
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                "serve_load.json"))
  args = ap.parse_args()
  args.checkpoint = args.checkpoint or os.path.join(args.workdir, "checkpoints")

  proc, url, startup = start_server(args)
  result = dict(settings=dict(vars(args)), startup=startup, load=[], machine=os.uname()[1],
                cpus=os.cpu_count())
  try:
    reqs = requests_from_demo(os.path.join(args.workdir, "demo_data"), args.distinct)
    reference = {}
    for clients in [int(c) for c in args.clients.split(",")]:
      n = max(args.min_requests, clients * args.per_client)
      work = [(i % len(reqs), reqs[i % len(reqs)]) for i in range(n)]
      before, cpu0 = batch_stats(url), (cpu_seconds(proc.pid), cpu_seconds(os.getpid()))
      answers, lat, seconds = run_load(url, work, clients)
      after, cpu1 = batch_stats(url), (cpu_seconds(proc.pid), cpu_seconds(os.getpid()))
      for i, got in answers.items():
        reference.setdefault(i, got[0])
      wrong = sum(a != reference[i] for i, got in answers.items() for a in got)
      exact = np.mean([a == reqs[i]["caption"] for i, got in answers.items() for a in got])
      row = dict(clients=clients, requests=n, seconds=round(seconds, 2),
                 answers_per_s=round(n / seconds, 2),
                 p50_ms=round(1000 * float(np.percentile(lat, 50)), 1),
                 p95_ms=round(1000 * float(np.percentile(lat, 95)), 1),
                 mean_batch=round((after[1] - before[1]) / max(after[0] - before[0], 1), 2),
                 differ_from_reference=wrong, caption_exact=round(float(exact), 3),
                 server_cpu_ms_per_answer=round(1000 * (cpu1[0] - cpu0[0]) / n, 2),
                 client_cpu_ms_per_answer=round(1000 * (cpu1[1] - cpu0[1]) / n, 2))
      result["load"].append(row)
      print(json.dumps(row), flush=True)

    if args.soak:
      rng = random.Random(0)
      good_lock, outcome = threading.Lock(), dict(good=0, wrong=0, lost=0, bad=0,
                                                  bad_not_4xx=0)
      plan = [("bad", rng.randrange(4)) if rng.random() < args.bad
              else ("good", rng.randrange(len(reqs))) for _ in range(args.soak)]
      rss = [rss_mib(proc.pid)]
      stop = threading.Event()

      def sample_rss():
        while not stop.wait(1.0):
          rss.append(rss_mib(proc.pid))

      sampler = threading.Thread(target=sample_rss, daemon=True)
      sampler.start()
      queue = list(reversed(plan))

      def soak_loop():
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                               timeout=600)
        session = requests.Session()
        while True:
          with good_lock:
            if not queue:
              return
            kind, i = queue.pop()
          if kind == "bad":
            body, headers = bad_request(i)
            r = session.post(url + "/v1/chat/completions", data=body, headers=headers,
                             timeout=600)
            ok = 400 <= r.status_code < 500 and "error" in r.json()
            with good_lock:
              outcome["bad"] += 1
              outcome["bad_not_4xx"] += not ok
            continue
          try:
            got = client.chat.completions.create(model="demo", messages=reqs[i]["messages"],
                                                 temperature=0).choices[0].message.content
          except openai.OpenAIError:
            got = None
          with good_lock:
            outcome["good"] += 1
            if got is None:
              outcome["lost"] += 1
            elif got != reference.setdefault(i, got):
              outcome["wrong"] += 1

      t0 = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(args.soak_clients) as pool:
        for f in [pool.submit(soak_loop) for _ in range(args.soak_clients)]:
          f.result()
      stop.set()
      sampler.join()
      alive = requests.get(url + "/health", timeout=10).json()["status"] == "ok"
      result["soak"] = dict(outcome, requests=args.soak, clients=args.soak_clients,
                            seconds=round(time.perf_counter() - t0, 1), server_alive=alive,
                            rss_mib_start=round(rss[0], 1), rss_mib_end=round(rss[-1], 1),
                            rss_mib_max=round(max(rss), 1),
                            rss_mib_first_quarter=round(rss[len(rss) // 4], 1))
      print(json.dumps(result["soak"]), flush=True)
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(table(result))


def table(result) -> str:
  one = result["load"][0]
  lines = ["| clients | requests | answers/s | vs 1 client | p50 ms | p95 ms | p95 / 1-client "
           "p50 | mean batch | caption exact | answers != 1-client |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["load"]:
    lines.append(f"| {r['clients']} | {r['requests']} | {r['answers_per_s']} | "
                 f"{r['answers_per_s'] / one['answers_per_s']:.1f}x | {r['p50_ms']} | "
                 f"{r['p95_ms']} | {r['p95_ms'] / one['p50_ms']:.1f}x | {r['mean_batch']} | "
                 f"{r['caption_exact']} | {r['differ_from_reference']} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
