"""A quiet console (issue 16, item 5): library logs to the log file, one-line errors
with exit status 2 (--traceback for the whole one), the run's closing table and grid."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lavida_jax import cli, convert, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _run(*args, timeout=240):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


def test_library_logs_go_to_the_file_and_ours_to_the_console(tmp_path):
  log = tmp_path / "log.txt"
  code = f"""
import logging, sys
from absl import app, logging as absl_logging
from lavida_jax import cli
def main(argv):
  absl_logging.info("orbax-style info")
  logging.getLogger("orbax.checkpoint").warning("orbax warning")
  logging.getLogger("jax._src.xla_bridge").warning("jax warning")
  logging.getLogger("asyncio").error("Task exception was never retrieved")
  logging.getLogger("lavida_jax.train").warning("our warning")
  import warnings; warnings.warn("a deprecation")
cli.run(main, lambda: {str(log)!r})
"""
  out = _run("-c", code)
  assert out.returncode == 0, out.stderr
  assert out.stderr.strip().splitlines()[-1].endswith("our warning")
  for quiet in ("orbax-style info", "orbax warning", "jax warning", "never retrieved",
                "a deprecation"):
    assert quiet not in out.stderr, quiet
    assert quiet in log.read_text(), quiet
  loud = _run("-c", code, "--verbosity=0")  # absl's flag brings the INFO lines back
  assert "orbax-style info" in loud.stderr


@pytest.fixture(scope="module")
def checkpoint(reference_checkpoint, tiny_tokenizer, tmp_path_factory):
  _, src = reference_checkpoint("lavida-llada")
  tok = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  tiny_tokenizer._hf.save(tok)
  return src, tok


@pytest.mark.parametrize("args,message", [
    (["--image=NOT_AN_IMAGE"], "cannot decode image, truncated or corrupt"),
    (["--gen_length=abc"], "flag --gen_length=abc: invalid literal"),
    (["--checkpoint=/no/such/folder"], "/no/such/folder is not a Hugging Face checkpoint"),
])
def test_generate_errors_are_one_line_with_status_2(checkpoint, tmp_path, args, message):
  src, tok = checkpoint
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  args = [a.replace("NOT_AN_IMAGE", str(bad)) for a in args]
  base = [f"--checkpoint={src}", f"--tokenizer={tok}", "--prompt=what colour is the circle",
          "--gen_length=8", "--block_length=8", "--steps=4"]
  out = _run("-m", "lavida_jax.generate", *base, *args)
  assert out.returncode == 2
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
  assert message in out.stderr
  if "image" in args[0]:  # --traceback: the whole story
    full = _run("-m", "lavida_jax.generate", *base, *args, "--traceback")
    assert full.returncode != 0 and "Traceback (most recent call last)" in full.stderr


def test_convert_errors_are_one_line_with_status_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    convert.main(["orbax-to-hf", "--src=x"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "the following arguments are required: --dst" in err
  assert convert.main(["orbax-to-hf", f"--src={tmp_path}", f"--dst={tmp_path}/o"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{tmp_path} is not an Orbax checkpoint" in err
  with pytest.raises(Exception, match="is not an Orbax checkpoint"):
    convert.main(["orbax-to-hf", f"--src={tmp_path}", f"--dst={tmp_path}/o", "--traceback"])


def test_one_line_names_bugs_by_type():
  assert cli.one_line(ValueError("bad\n  thing")) == "bad thing"
  assert cli.one_line(KeyError("k")) == "KeyError: 'k'"
  assert cli.one_line(SystemExit("error: nope")) == "nope"
  embedded = ValueError("flag --config=x: Error whilst parsing config file: Traceback (most "
                        "recent call last):\n  File \"x.py\", line 1\nValueError: stage 9")
  assert cli.one_line(embedded) == ("flag --config=x: Error whilst parsing config file: "
                                    "ValueError: stage 9")


@pytest.mark.parametrize("args,message", [
    (["--config=configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
    (["--config=configs/cpu_demo.py:stage=9"], "unknown config argument 'stage=9'"),
    (["--config.train.no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--workdir=/proc/no/such"], "No such file or directory"),
])
def test_main_errors_are_one_line_with_status_2(args, message):
  out = _run("-m", "lavida_jax.main", *args, "--config.train.steps=1")
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert out.stderr.startswith("error: ") and message in out.stderr, out.stderr


SUMMARY = {"step": 2000, "loss": 0.01234, "wall_s": 720.4, "skipped": {"too_long": 3,
           "bad_image": 0}, "exact_match": 0.9, "exact_match/count": 1.0,
           "exact_match/shape_of_colour": 0.82, "n": 500, "nfe": 5.0,
           "seconds_per_sample": 0.25, "caption/exact_match": 0.934, "caption/cider": 8.17,
           "caption/bleu4": 0.9, "caption/n": 500}


def test_summary_table():
  assert report.summary_table(SUMMARY).splitlines() == [
      "step 2000 | loss 0.0123 | 12 min 0 s | skipped records: too_long 3",
      "held-out               n  exact match",
      "one-word answers     500        90.0%",
      "  count                        100.0%",
      "  shape of colour               82.0%",
      "captions             500        93.4%  CIDEr 8.170 BLEU-4 0.900",
      "decoding: 5.0 forward passes and 0.25 s per answer"]
  json.dumps(SUMMARY)
  fast = report.summary_table({**SUMMARY, "seconds_per_sample": 0.004027})
  assert fast.splitlines()[-1] == "decoding: 5.0 forward passes and 4.0 ms per answer"


def test_answer_grid_marks_right_green_and_wrong_red(tmp_path):
  images = [Image.fromarray(np.full((56, 56, 3), v, np.uint8)) for v in (0, 255)]
  examples = [report.Example(images[0], "what colour?", "red", "red", True),
              report.Example(images[1], "how many?", "two", "three", False)]
  path = report.answer_grid(examples, str(tmp_path / "grid.png"), columns=2, cell=64)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (64 + 58 + 12, 2 * (64 + 12), 3)
  # the frame just outside each image: green, then red
  assert tuple(grid[6 + 32, 6 - 2]) == (0, 160, 0)
  assert tuple(grid[6 + 32, 76 + 6 - 2]) == (210, 0, 0)
  assert tuple(grid[6 + 32, 6 + 32]) == (0, 0, 0) and tuple(grid[38, 82 + 32]) == (255,) * 3


def test_batch_mode_answers_good_lines_and_names_bad_ones(checkpoint, tmp_path):
  src, tok = checkpoint
  requests = tmp_path / "in.jsonl"
  requests.write_text('{"prompt": "what colour is the circle", "id": 1}\n'
                      '[1, 2]\n\n'
                      '{"prompt": 7}\n'
                      '{"prompt": "how many shapes are there", "id": 4}\n')
  out = _run("-m", "lavida_jax.generate", f"--checkpoint={src}", f"--tokenizer={tok}",
             f"--requests={requests}", f"--output={tmp_path / 'out.jsonl'}",
             "--gen_length=8", "--block_length=8", "--steps=4")
  assert out.returncode == 0, out.stderr
  rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
  assert [r["error"] for r in rows] == [
      None, f"{requests} line 2: a JSON list, expected an object",
      f"{requests} line 4: 'prompt' is a int, expected a string", None]
  assert rows[0]["id"] == 1 and rows[3]["id"] == 4 and rows[0]["nfe"] > 0
