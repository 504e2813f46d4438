"""Train (and evaluate) as a config says; resumes from the newest checkpoint in the workdir.

  python -m lavida_jax.main                                   # configs/cpu_demo.py
  python -m lavida_jax.main --config=configs/tpu_v4_64.py:model=lavida-llada,stage=2 \
      --workdir=gs://bucket/run --config.train.steps=20000
"""
from __future__ import annotations

import functools
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from lavida_jax import cli, report

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "cpu_demo.py")


def _unknown_config_key(e: Exception):
  """Exits naming the key of a KeyError/AttributeError raised by ml_collections."""
  key = str(e).strip("\"'")
  overrides = " ".join(a for a in sys.argv[1:] if a.startswith("--config."))
  print(f"error: unknown config key '{key}' in {overrides}: every --config.KEY=VALUE must "
        "name a field of the config (see configs/base.py)", file=sys.stderr)
  sys.exit(cli.EXIT_USAGE)


try:  # ml_collections resolves --config.KEY overrides of the default config here
  _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                            "Config file[:args] (default: the CPU demo).",
                                            lock_config=True)
except (AttributeError, KeyError) as e:
  _unknown_config_key(e)

_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics (default: "
                               "config.workdir).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs off TPU "
    "(e.g. several CPU processes on one machine); TPU pods are detected by themselves.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "jax.distributed.initialize() with the cluster's own detection "
    "(Cloud TPU VM slices, GKE, SLURM); launch/train.sh passes it. It gives every process "
    "the coordination service (agreed preemption saves).")


def initialize_distributed() -> None:
  """jax.distributed for multi-host runs: explicit coordinator, or a TPU pod's own."""
  import jax
  if _COORDINATOR.value:
    if os.environ.get("JAX_PLATFORMS") == "cpu":  # (no backend query before initialize)
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value or (
      os.environ.get("TPU_WORKER_HOSTNAMES", "localhost") not in ("", "localhost")):
    jax.distributed.initialize()


def first_process_first(fn):
  """fn() on process 0, then on the others: on a shared disk they find its files
  (never two writers at once); on per-host disks each makes its own copy."""
  import jax
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("lavida_jax: process 0 prepared")
  return out if jax.process_index() == 0 else fn()


def demo_args(cfg) -> dict:
  """`demo.prepare`'s arguments for a config: the same config, the same set."""
  return dict(seed=cfg.train.seed, num_train=cfg.data.demo_train,
              num_heldout=cfg.data.demo_heldout, image_size=cfg.model.image_size,
              questions_per_image=cfg.data.get("demo_questions", 2),
              # Question kinds asked (comma strings; configs/cpu_demo_lora.py adds "exists").
              **{k: tuple(cfg.data[f"demo_{k}"].split(",")) for k in ("kinds", "train_extra_kinds")
                 if cfg.data.get(f"demo_{k}")})


def make_train_data(cfg, workdir: str):
  """Tokenizer, special ids and the batch iterator factory; plus the held-out sets.

  Returns (data, heldout, system_prompt); heldout is None or a dict with "qa":
  (pairs, groups) and, for the demo, "captions": the held-out describe pairs.
  """
  from lavida_jax import evaluate, text
  from lavida_jax.data import demo, pipeline
  from lavida_jax.train import TrainData

  template = pipeline.template_for(cfg.model.family)
  if cfg.data.tokenizer == "demo":
    tok_path = demo.TOKENIZER_PATH
    tokenizer = demo.demo_tokenizer()
    specials = demo.demo_special_tokens(template, tokenizer)
  else:
    if not cfg.data.tokenizer:
      raise ValueError("config.data.tokenizer is empty: give a tokenizer folder or file")
    tok_path = cfg.data.tokenizer
    tokenizer = text.load_tokenizer(tok_path)
    specials = (text.SpecialTokens.dream() if template == "dream" else text.SpecialTokens.llada())
  heldout, groups, captions = None, None, None
  if cfg.data.source == "demo":
    root = cfg.data.get("demo_root") or os.path.join(workdir, "demo_data")
    files, data_dir = first_process_first(
        functools.partial(demo.prepare, root, **demo_args(cfg)))
    source = pipeline.open_source(data_dir, "train")  # the tfds ArrayRecord copy
    records = demo.read_jsonl(files.qa["heldout"])
    heldout = evaluate.qa_pairs(records, files.image_folder)
    groups = [r["kind"] for r in records]  # accuracy per question kind
    captions = evaluate.qa_pairs(demo.read_jsonl(files.captions["heldout"]),
                                 files.image_folder)
  else:
    source = pipeline.open_source(cfg.data.source, image_folder=cfg.data.image_folder or None)
  if cfg.eval.data:
    heldout = evaluate.qa_pairs(evaluate.read_records(cfg.eval.data),
                                cfg.data.image_folder or None)
    groups = None
  system_prompt = text.SYSTEM_PROMPT if cfg.data.system_prompt else None

  def make_iterator(mcfg):
    return iter(pipeline.make_dataset(
        source, mcfg, tokenizer, specials, length=cfg.data.length,
        global_batch_size=cfg.train.batch_size * cfg.train.grad_accum, seed=cfg.train.seed,
        template=template, system_prompt=system_prompt, num_workers=cfg.data.num_workers,
        read_threads=cfg.data.read_threads))

  data = TrainData(tokenizer, specials, tok_path if os.path.isfile(tok_path) else None,
                   system_prompt, make_iterator)
  sets = {"qa": (heldout, groups)} if heldout else {}
  if captions:
    sets["captions"] = captions
  return data, sets or None, system_prompt


def _caption_scores(predictions, references) -> dict:
  """CIDEr and BLEU-4 (`evaluate.caption_scores`), or {} without pycocoevalcap (the
  "eval" extra: `pip install -e .` alone does not bring it)."""
  from lavida_jax import evaluate
  try:
    return evaluate.caption_scores(predictions, references)
  except ImportError as err:
    print(f"no CIDEr for the held-out captions ({err}): pip install -e '.[eval]'")
    return {}


def make_evaluate_fn(cfg, data, heldout, system_prompt):
  """(model, step) -> metrics of the sampler on the held-out sets.

  heldout: from make_train_data. "qa": (pairs, groups), the first
  `eval.num_examples` scored by exact match (and per group label); "captions": the
  first `eval.num_captions` (0: none) scored by exact match, CIDEr and BLEU-4 under
  "caption/" keys, sampled with a canvas of `eval.caption_gen_length` (blocks of
  `eval.caption_block_length`, `eval.caption_steps` steps). None (no evaluation)
  without held-out sets or with `eval.num_examples` = 0.
  """
  e = cfg.eval
  if not heldout or not e.num_examples:
    return None
  from lavida_jax import evaluate, generate
  from lavida_jax.diffusion.sampler import SamplerConfig

  pairs, groups = heldout.get("qa", (None, None))
  n = e.num_examples
  captions = heldout.get("captions", [])[:e.get("num_captions", 0)]

  def generator(model, gen_length, block_length, steps):
    scfg = SamplerConfig(gen_length=gen_length, block_length=block_length, steps=steps,
                         schedule=e.schedule, alpha=e.alpha, mask_id=model.cfg.lm.mask_id,
                         decoder=e.decoder, threshold=e.threshold, factor=e.factor)
    return generate.Generator(model, data.tokenizer, scfg, e.cache, system_prompt=system_prompt)

  def run(model, step):
    del step
    out = {}
    if pairs:
      gen = _Recorder(generator(model, e.gen_length, e.block_length, e.steps))
      out.update(evaluate.evaluate(gen, pairs[:n], "vqa", e.batch_size, groups and groups[:n]))
      shown = pairs[:GRID_EXAMPLES]
      run.examples = report.heldout_examples(
          shown, [gen.answers.get(id(r)) for r, _ in shown], evaluate.normalize_answer)
    if captions:
      gen = generator(model, e.caption_gen_length, e.caption_block_length, e.caption_steps)
      results = evaluate.run_generation(gen, [r for r, _ in captions], e.batch_size)
      ok = [(res.text, ref) for res, (_, ref) in zip(results, captions) if res.error is None]
      preds, refs = [p for p, _ in ok], [r for _, r in ok]
      scores = {**evaluate.score("vqa", preds, refs), **_caption_scores(preds, refs),
                "n": len(ok), "errors": len(results) - len(ok),
                "nfe": float(sum(res.nfe for res in results if res.error is None)
                             / max(len(ok), 1))}
      out.update({f"caption/{k}": v for k, v in scores.items()})
    return out

  run.examples = []  # the last evaluation's first held-out answers, for the grid
  return run


GRID_EXAMPLES = 16


class _Recorder:
  """A Generator that remembers each request's result (by request identity)."""

  def __init__(self, gen):
    self.gen, self.answers = gen, {}

  def __getattr__(self, name):
    return getattr(self.gen, name)

  def __call__(self, reqs, rng=None):
    results = self.gen(reqs, rng)
    self.answers.update({id(r): res for r, res in zip(reqs, results)})
    return results


def scores_line(summary: dict) -> str | None:
  """The held-out scores of a summary in one line (None without any)."""
  scores = []
  if "exact_match" in summary:
    scores.append(f"one-word exact match {summary['exact_match']:.3f} (n={summary['n']})")
  if "caption/exact_match" in summary:
    cider = summary.get("caption/cider")
    scores.append(f"captions exact match {summary['caption/exact_match']:.3f}"
                  + ("" if cider is None else f", CIDEr {cider:.3f}")
                  + f" (n={summary['caption/n']})")
  return "held-out: " + "; ".join(scores) if scores else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  initialize_distributed()
  from lavida_jax import train

  cfg = _CONFIG.value
  workdir = _WORKDIR.value or cfg.workdir
  if not workdir:
    raise app.UsageError("no workdir: pass --workdir or set config.workdir")
  data, heldout, system_prompt = make_train_data(cfg, workdir)
  evaluate_fn = make_evaluate_fn(cfg, data, heldout, system_prompt)
  summary = train.train_and_evaluate(cfg, workdir, data, evaluate_fn)
  import jax
  if jax.process_index() != 0:
    return
  print("\n" + report.summary_table(summary))
  if "://" not in workdir:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1, default=str)
    print(f"\nsummary:    {os.path.join(workdir, 'summary.json')}")
    if evaluate_fn is not None and evaluate_fn.examples:
      grid = report.answer_grid(evaluate_fn.examples,
                                os.path.join(workdir, "heldout_answers.png"))
      print(f"answers:    {grid} (held-out images; green right, red wrong)")
  print(f"checkpoint: {summary['checkpoint']}\n"
        f"generate:   python -m lavida_jax.generate --checkpoint={summary['checkpoint']} "
        f"--image=IMAGE.png --prompt=\"What colour is the circle?\"")


def parse_flags(argv):
  """cli's parser; an unknown --config.KEY (of a --config=FILE) ends with its name."""
  try:
    return cli.parse_flags(argv)
  except (AttributeError, KeyError) as e:
    _unknown_config_key(e)


def log_file() -> str | None:
  """The workdir's log file (none for a bucket: no appends there)."""
  workdir = _WORKDIR.value or _CONFIG.value.workdir
  return None if not workdir or "://" in workdir else os.path.join(workdir, cli.LOG_FILE)


if __name__ == "__main__":
  cli.run(main, log_file, flags_parser=parse_flags)
