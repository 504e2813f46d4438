"""The demo's held-out questions and captions as a local lmms-eval task folder.

  python -m lavida_jax.lmms.demo_task --demo_data=WORKDIR/demo_data --out=/tmp/lavida_demo_task
  lmms-eval eval --include_path /tmp/lavida_demo_task --tasks lavida_demo_vqa,lavida_demo_caption \
      --model lavida_jax --model_args checkpoint=WORKDIR/checkpoints --batch_size 8

copies the shipped task YAMLs (`configs/lmms_eval/lavida_demo/`) to `out` and writes
`out/data/{vqa,mc,captions}.jsonl` from the demo set's `heldout.jsonl` (the
one-word questions, generated and multiple choice) and `captions_heldout.jsonl`: one `{"id", "question", "answer", "kind", "image"}` line
per record (absolute image paths), in the demo's order, so the task's documents are
`lavida_jax.evaluate.qa_pairs`' pairs one for one.
"""
from __future__ import annotations

import json
import os
import shutil

TASK_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lmms_eval",
                        "lavida_demo")
FILES = {"vqa": "heldout.jsonl", "mc": "heldout.jsonl", "captions": "captions_heldout.jsonl"}


def task_rows(records: list[dict], image_folder: str) -> list[dict]:
  """LLaVA records (first human turn, first gpt turn) -> the task's flat rows."""
  rows = []
  for r in records:
    conv = r["conversations"]
    rows.append({"id": r["id"], "question": conv[0]["value"], "answer": conv[1]["value"],
                 "kind": r.get("kind", ""),
                 "image": os.path.abspath(os.path.join(image_folder, r["image"]))})
  return rows


def export(demo_data: str, out: str, limit: int = 0) -> dict[str, str]:
  """-> {"vqa": path, "mc": path, "captions": path}: the JSONL under out/data."""
  if not os.path.isdir(TASK_DIR):
    raise FileNotFoundError(f"task YAMLs not found at {os.path.abspath(TASK_DIR)} "
                            "(an editable install of the repository ships them)")
  shutil.copytree(TASK_DIR, out, dirs_exist_ok=True,
                  ignore=shutil.ignore_patterns("data", "__pycache__"))
  os.makedirs(os.path.join(out, "data"), exist_ok=True)
  paths = {}
  for name, src in FILES.items():
    path = os.path.join(demo_data, src)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: is {demo_data} a demo set "
                              "(lavida_jax.data.demo.generate)?")
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    rows = task_rows(records[:limit or None], os.path.join(demo_data, "images"))
    paths[name] = os.path.join(out, "data", f"{name}.jsonl")
    with open(paths[name], "w") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
  return paths


def main(argv):
  from absl import flags
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  for name, path in export(FLAGS.demo_data, FLAGS.out, FLAGS.limit).items():
    print(f"{name}: {path}")
  print(f"lmms-eval eval --include_path {FLAGS.out} "
        "--tasks lavida_demo_vqa,lavida_demo_caption,lavida_demo_mc --model lavida_jax "
        "--model_args checkpoint=CHECKPOINT --batch_size 8")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("demo_data", None, "A demo set (WORKDIR/demo_data).", required=True)
  flags.DEFINE_string("out", None, "The task folder to write.", required=True)
  flags.DEFINE_integer("limit", 0, "Records per task (0: all).")
  app.run(main)
