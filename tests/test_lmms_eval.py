"""lmms-eval integration: LLaDA's Monte Carlo ELBO, the papers' generation kwargs, and
the stock `lmms-eval` CLI on the local demo task against `lavida_jax.evaluate`."""
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavida_jax import evaluate, generate
from lavida_jax.diffusion import likelihood as lik
from lavida_jax.diffusion import sampler as sampler_lib
from lavida_jax.lmms import settings


# --- the estimator -------------------------------------------------------------------------

def test_noisy_answers_stratify_the_mask_counts_over_the_batch():
  answer = jnp.array([5, 6, 7, 8, 9, 0, 0, 0], jnp.int32)  # T = 5, padded to 8
  for seed in range(5):
    noisy, masked, ratio = lik.noisy_answers(jax.random.key(seed), answer, 5, 5, 99)
    counts = np.asarray(masked.sum(1))
    # b = T rows: x_j = ((k + j - 1) mod T) + 1 covers 1..T exactly once (LLaDA).
    assert sorted(counts) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(np.asarray(ratio), counts / 5)
    assert not np.asarray(masked)[:, 5:].any()  # padding is never masked
    np.testing.assert_array_equal(np.asarray(noisy), np.where(masked, 99, answer[None]))


def test_elbo_of_uniform_logits_is_t_log_v_on_every_row():
  t, v = 6, 50
  answer = jnp.arange(t, dtype=jnp.int32)
  _, masked, ratio = lik.noisy_answers(jax.random.key(0), answer, t, 8, 49)
  terms = lik.elbo_terms(jnp.zeros((8, t, v)), answer, masked, ratio)
  np.testing.assert_allclose(np.asarray(terms), t * np.log(v), rtol=1e-5)


def test_elbo_is_unbiased_for_a_context_free_model():
  """With logits that ignore the context, E[sum CE / ratio] = sum_i -log p(a_i)."""
  t, v, rows = 7, 11, 16
  answer = jnp.array([1, 4, 2, 9, 3, 3, 0], jnp.int32)
  logits = jax.random.normal(jax.random.key(1), (t, v)) * 2
  exact = -float(jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(t), answer]))

  def batch(key):
    _, masked, ratio = lik.noisy_answers(key, answer, t, rows, v)
    return lik.elbo_terms(jnp.broadcast_to(logits, (rows, t, v)), answer, masked, ratio)

  terms = jax.vmap(batch)(jax.random.split(jax.random.key(2), 2000))
  assert float(terms.mean()) == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
def test_one_token_likelihood_is_the_masked_logit(loaded, tiny_tokenizer, family):
  """A 1-token answer is always the one masked token (ratio 1): the estimate is
  exactly log softmax of the model's logit there, Dream's taken one position early."""
  from lavida_jax.lmms import likelihood
  _, model = loaded(family)
  scorer = likelihood.Scorer(model, tiny_tokenizer, generate.text_lib.SYSTEM_PROMPT, 32, 16)
  req = generate.Request("what colour is the circle")
  ids, _ = generate.prompt_ids(model, tiny_tokenizer, req)
  token = tiny_tokenizer.encode("red")
  assert len(token) == 1
  logits = model.text_logits(jnp.array([ids + [model.cfg.lm.mask_id]], jnp.int32))[0]
  at = -2 if model.cfg.lm.shifted_logits else -1
  want = float(jax.nn.log_softmax(logits[at].astype(jnp.float32))[token[0]])
  got = scorer(scorer.prefix(req), "red", jax.random.key(0))
  assert got == pytest.approx(want, abs=1e-4)
  # LLaDA's greedy agreement: true for the argmax token (mask id excluded), not another.
  top = int(jnp.argmax(logits[at].at[model.cfg.lm.mask_id].set(-jnp.inf)))
  assert scorer.greedy(req, [top]) and not scorer.greedy(req, [(top + 1) % 200])


# --- the papers' generation kwargs ---------------------------------------------------------

def test_lavida_coco_kwargs():
  """run_coco.sh: prefix_lm, step_ratio 0.5, shift 0.33 over coco's 32-token canvas."""
  cfg, cache, until, unknown = settings.resolve(
      {"max_new_tokens": 32, "prefix_lm": "True", "step_ratio": 0.5, "schedule": "shift",
       "schedule__shift": 0.33, "temperature": 0, "do_sample": False, "until": ["\n\n"]},
      settings.Decoding(), 126336)
  assert (cfg.gen_length, cfg.block_length, cfg.steps) == (32, 32, 16)
  assert cfg.schedule == "shift" and cfg.alpha == 0.33 and cache == "prefix"
  assert until == ["\n\n"] and unknown == []


def test_lavida_defaults_and_dream_alg():
  """No kwargs: LaViDa's harness (256 tokens, blocks of min(128, L), one token per
  step, no prefix cache when prefix_lm is false, LLaDA's uniform schedule)."""
  cfg, cache, _, _ = settings.resolve({"max_new_tokens": 256, "prefix_lm": False},
                                      settings.Decoding(), 7)
  assert (cfg.gen_length, cfg.block_length, cfg.steps, cfg.schedule) == (256, 128, 256, "none")
  assert cache == "none"
  cfg, _, _, _ = settings.resolve({"max_new_tokens": 64, "alg": "topk_margin",
                                   "step_per_block": 16}, settings.Decoding(), 7)
  assert cfg.confidence == "margin" and (cfg.block_length, cfg.steps) == (64, 16)


def test_llada_v_kwargs_and_errors():
  cfg, _, _, _ = settings.resolve({"gen_length": 96, "steps": 96, "block_length": 48},
                                  settings.Decoding(), 7)
  assert (cfg.gen_length, cfg.block_length, cfg.steps) == (96, 48, 96)
  cfg, _, _, unknown = settings.resolve({"gen_length": 2, "steps": 2, "block_length": 2,
                                         "bogus": 1}, settings.Decoding(), 7)
  assert (cfg.gen_length, cfg.steps) == (2, 2) and unknown == ["bogus"]
  with pytest.raises(ValueError, match="not a multiple of block_length 48"):
    settings.resolve({"gen_length": 100, "block_length": 48}, settings.Decoding(), 7)
  with pytest.raises(ValueError, match="unknown cache 'full'"):
    settings.resolve({"cache": "full"}, settings.Decoding(), 7)
  d = settings.decoding_from_args({"steps": "8", "threshold": "0.7", "block_length": "None",
                                   "lookahead": "2"})
  assert d.steps == 8 and d.threshold == 0.7 and d.block_length is None and d.lookahead == 2
  assert settings.resolve({"gen_length": 8}, d, 7)[0].lookahead == 2
  with pytest.raises(ValueError, match="lookahead needs the fixed decoder"):
    settings.resolve({"decoder": "threshold"}, d, 7)
  assert settings.cut_at("red. \n\nQ: next", ["\n\n"]) == "red. "


def test_speed_counts_the_prefill_and_the_wall():
  res = [generate.Result("a", [], 5, 0.0), generate.Result("b", [], 3, 0.0)]
  s = evaluate.speed(res, 2.0, 4, 12, 1)
  assert s == {"nfe": 4.0, "tokens_per_forward": 4.0, "seconds_per_sample": 0.5,
               "answers_per_s": 2.0}


# --- the stock CLI on the local demo task --------------------------------------------------

QUESTIONS, CAPTIONS = 10, 6  # ragged at batch 8


def _lmms_eval(task_dir, out, checkpoint, tokenizer, batch_size, tmp_path):
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), JAX_PLATFORMS="cpu",
             JAX_DEFAULT_MATMUL_PRECISION="highest", WANDB_MODE="disabled")
  cmd = [sys.executable, "-m", "lmms_eval", "eval", "--model", "lavida_jax",
         "--model_args", f"checkpoint={checkpoint},tokenizer={tokenizer},warmup=False,"
         f"speed_log={out}/speed.jsonl,mc_num=16",
         "--include_path", str(task_dir),
         "--tasks", "lavida_demo_vqa,lavida_demo_caption,lavida_demo_mc",
         "--batch_size", str(batch_size), "--output_path", str(out), "--log_samples"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  found = glob.glob(f"{out}/**/*_results.json", recursive=True)
  # lmms-eval logs a failed evaluation and still exits 0: no results file then.
  assert proc.returncode == 0 and found, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.load(open(found[0]))
  answers = {}
  for task in ("lavida_demo_vqa", "lavida_demo_caption"):
    path = glob.glob(f"{out}/**/*_samples_{task}.jsonl", recursive=True)[0]
    rows = sorted((json.loads(line) for line in open(path)), key=lambda r: r["doc_id"])
    answers[task] = [r["filtered_resps"] for r in rows]
  with open(f"{out}/speed.jsonl") as f:
    speed = {r["task"]: r for r in map(json.loads, f)}
  return results, answers, speed


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def test_lmms_eval_cli_matches_lavida_evaluate(reference_checkpoint, loaded, tiny_tokenizer,
                                               tmp_path):
  pytest.importorskip("lmms_eval", reason="pip install --no-deps lmms-eval==0.7.3 "
                      "(and the [lmms] extra)")
  from lavida_jax.data import demo
  from lavida_jax.lmms import demo_task, likelihood

  _, folder = reference_checkpoint("lavida-llada")
  _, model = loaded("lavida-llada")
  demo.generate(str(tmp_path / "demo"), seed=0, num_train=0, num_heldout=6,
                        image_size=56)
  task_dir = tmp_path / "task"
  paths = demo_task.export(str(tmp_path / "demo"), str(task_dir))
  vqa = _read(paths["vqa"])[:QUESTIONS]
  captions = _read(paths["captions"])[:CAPTIONS]

  def gen(length):
    cfg = sampler_lib.SamplerConfig(gen_length=length, block_length=length, steps=length,
                                    schedule="shift", alpha=1 / 3,
                                    mask_id=model.cfg.lm.mask_id)
    return generate.Generator(model, tiny_tokenizer, cfg, "prefix",
                              system_prompt=generate.system_prompt_for(folder))

  def pairs(rows):
    return [(generate.Request(r["question"], r["image"]), r["answer"]) for r in rows]

  # A random model answers nonsense: make every other reference its own answer, so that
  # exact match (>= 1/2) and CIDEr are not trivially zero on either path.
  for rows, g in ((vqa, gen(4)), (captions, gen(12))):
    for r, res in list(zip(rows, evaluate.run_generation(g, [p for p, _ in pairs(rows)])))[::2]:
      r["answer"] = res.text
  _write(paths["vqa"], vqa)
  _write(paths["captions"], captions)
  ours = {"lavida_demo_vqa": evaluate.evaluate(gen(4), pairs(vqa), "vqa", batch_size=8),
          "lavida_demo_caption": {
              **evaluate.evaluate(gen(12), pairs(captions), "caption", batch_size=8),
              "exact_match": evaluate.evaluate(gen(12), pairs(captions), "vqa", 8)["exact_match"]}}
  our_answers = {"lavida_demo_vqa": [r.text for r in evaluate.run_generation(gen(4), [
                     p for p, _ in pairs(vqa)], 8)],
                 "lavida_demo_caption": [r.text for r in evaluate.run_generation(gen(12), [
                     p for p, _ in pairs(captions)], 8)]}
  assert ours["lavida_demo_vqa"]["exact_match"] >= 0.5
  assert ours["lavida_demo_caption"]["cider"] > 0
  # Multiple choice by likelihood: the choice of least -ELBO (1-token choices: exact).
  import importlib.util
  spec = importlib.util.spec_from_file_location("task_utils", task_dir / "utils.py")
  task_utils = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(task_utils)
  scorer = likelihood.Scorer(model, tiny_tokenizer, generate.system_prompt_for(folder), 16, 16)
  mc = _read(paths["mc"])
  hits = []
  for r in mc:
    prefix = scorer.prefix(generate.Request(r["question"], r["image"]))
    losses = [-scorer(prefix, c, jax.random.key(0)) for c in task_utils.doc_to_choice(r)]
    hits.append(int(np.argmin(losses)) == task_utils.doc_to_target_index(r))
  ours["lavida_demo_mc"] = {"acc": float(np.mean(hits))}

  for batch_size in (1, 8):
    results, answers, speed = _lmms_eval(task_dir, tmp_path / f"out{batch_size}", folder,
                                         tiny_tokenizer.name, batch_size, tmp_path)
    assert answers == our_answers, batch_size
    for task, metrics in ours.items():
      got = results["results"][task]
      for k in ("exact_match", "cider", "bleu4", "acc"):
        if k in metrics:
          assert got[f"{k},none"] == pytest.approx(metrics[k], abs=1e-9), (task, k)
      if task == "lavida_demo_mc":
        continue
      assert speed[task]["n"] == len(answers[task]) and speed[task]["errors"] == 0
      assert speed[task]["nfe"] == metrics["nfe"]  # L one-token steps + the prefill
      assert results["throughput"][f"avg_{task}/nfe"] == metrics["nfe"]
      assert results["throughput"][f"avg_{task}/tokens_per_forward"] == 1.0


# --- the papers' shipped configs -----------------------------------------------------------

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "lmms_eval")
RUN_KEYS = {"model", "model_args", "tasks", "gen_kwargs", "batch_size", "log_samples",
            "output_path"}


@pytest.mark.parametrize("name", ["lavida_llada", "lavida_dream", "llada_v"])
def test_paper_configs_name_stock_tasks_and_resolve(name):
  """Every run of a shipped --config names tasks that stock lmms-eval 0.7.3 defines and
  generation kwargs our model reads, with the papers' canvas, steps and cache."""
  lmms_eval = pytest.importorskip("lmms_eval")
  import re

  import yaml
  from lmms_eval.utils import simple_parse_args_string

  defined = set()
  for path in glob.glob(os.path.join(os.path.dirname(lmms_eval.__file__), "tasks", "**",
                                     "*.yaml"), recursive=True):
    with open(path, errors="replace") as f:
      defined.update(re.findall(r"^(?:task|group):\s*\"?([\w-]+)\"?\s*$", f.read(), re.M))
  with open(os.path.join(CONFIGS, f"{name}.yaml")) as f:
    runs = yaml.safe_load(f)
  seen = {}
  for run in runs:
    assert set(run) <= RUN_KEYS and run["model"] == "lavida_jax" and run["batch_size"] == 1
    args = simple_parse_args_string(run["model_args"])
    assert args["checkpoint"] and args["dtype"] == "bfloat16"
    base = settings.decoding_from_args({k: v for k, v in args.items()
                                        if k in settings.Decoding.__dataclass_fields__})
    cfg, cache, _, unknown = settings.resolve(simple_parse_args_string(run["gen_kwargs"]),
                                              base, 126336)
    assert unknown == []
    for task in run["tasks"].split(","):
      assert task in defined, task
      seen[task] = (cfg.gen_length, cfg.block_length, cfg.steps, cache, cfg.confidence)
  if name == "lavida_llada":  # run.sh's typo: Full-DLM, one token per step
    assert seen["mmmu_val"] == (16, 16, 16, "none", "low_confidence")
    assert seen["coco2017_cap_val_lite"] == (32, 32, 16, "prefix", "low_confidence")
  if name == "lavida_dream":
    assert seen["mathvista_testmini_format"] == (100, 100, 100, "prefix", "margin")
  if name == "llada_v":
    assert seen["mmmu_val"] == (2, 2, 2, "none", "low_confidence")
    assert seen["mathvista_testmini"] == (96, 48, 96, "none", "low_confidence")


# --- the model class in process --------------------------------------------------------------

def _instances(kind, rows, gen_kwargs=None):
  from lmms_eval.api.instance import Instance
  out = []
  for i, (context, extra) in enumerate(rows):
    args = ((context, gen_kwargs, lambda d: d["images"], i, "t", "test") if kind == "generate_until"
            else (context, extra, lambda d: d["images"], i, "t", "test"))
    out.append(Instance(kind, args, i, {"task": "t", "doc_id": i, "repeats": 1}))
  return out


def test_model_batches_ragged_prompts_on_a_mesh_and_scores_choices(reference_checkpoint,
                                                                  tiny_tokenizer, tmp_path):
  """Batch 3 on a 1x4x2 mesh answers as batch 1 on one device (ragged prompts, one
  text-only), `until` cuts, a two-image doc gets its one-line error and the rest go on;
  loglikelihood of a 1-token choice equals the Scorer's and repeats under the seed."""
  pytest.importorskip("lmms_eval")
  from PIL import Image

  from lavida_jax.lmms.model import LavidaJax
  _, folder = reference_checkpoint("lavida-llada")
  img = Image.new("RGB", (40, 30), (200, 10, 10))
  docs = [{"images": [img]}, {"images": []}, {"images": [img]}, {"images": [img, img]}]
  rows = [("what colour is the circle", None), ("how many shapes", None),
          ("what colour is the square and the triangle of the circle", None), ("two", None)]
  kw = {"max_new_tokens": 4, "block_length": 4, "steps": 4}

  def run(**model_args):
    m = LavidaJax(checkpoint=folder, tokenizer=tiny_tokenizer.name, warmup=False, **model_args)
    m.task_dict = {"t": {"test": docs}}
    return m, [r.text for r in m.generate_until(_instances("generate_until", rows, kw))]

  one, single = run(batch_size=1)
  _, meshed = run(batch_size=3, mesh="1x4x2")
  assert meshed == single and single[3] == ""  # the two-image doc: an error, no answer
  assert any(single[:3])
  until = single[0].split()[0] if single[0] else "zzz"
  cut = [r.text for r in one.generate_until(_instances("generate_until", rows,
                                                        {**kw, "until": [until]}))]
  assert cut[0] == single[0].split(until, 1)[0].strip()

  scores = [r.text for r in one.loglikelihood(_instances(
      "loglikelihood", [("what colour", "red"), ("what colour", "blue")]))]
  again = one.loglikelihood(_instances("loglikelihood", [("what colour", "red")]))[0].text
  assert scores[0][0] == again[0] and scores[0][0] != scores[1][0]
  assert all(loss > 0 and g is False for loss, g in scores)  # losses: lmms-eval's argmin
  direct = one.scorer(one.scorer.prefix(generate.Request("what colour", img)), "red",
                      jax.random.fold_in(jax.random.key(0), 0))
  assert scores[0][0] == pytest.approx(-direct, abs=1e-6)
  one.greedy = True  # LLaDA's greedy agreement, wired through (model arg greedy=True)
  (_, greedy), = [r.text for r in one.loglikelihood(_instances("loglikelihood",
                                                                [("what colour", "red")]))]
  assert greedy == one.scorer.greedy(generate.Request("what colour", img),
                                     tiny_tokenizer.encode("red"))
