"""Context limits (issue 16, item 3): a prompt (text + image tokens) plus its canvas
longer than the model's context is refused per request, with the lengths named, in
the Generator, in batch mode and in evaluate; the limit comes from config.json."""
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

import lavida_jax
from lavida_jax import evaluate, generate
from lavida_jax.checkpoint import hf
from lavida_jax.diffusion.sampler import SamplerConfig

LIMIT = 600


@pytest.fixture(scope="module")
def small_context(reference_checkpoint, tmp_path_factory):
  """The tiny LaViDa-L with max_sequence_length 600 in its config.json."""
  _, src = reference_checkpoint("lavida-llada")
  folder = str(tmp_path_factory.mktemp("ctx") / "ckpt")
  shutil.copytree(src, folder)
  raw = json.load(open(os.path.join(folder, "config.json")))
  raw["max_sequence_length"] = LIMIT
  json.dump(raw, open(os.path.join(folder, "config.json"), "w"))
  return lavida_jax.load_pretrained(folder)


def _gen(model, tok, gen_length=8):
  cfg = SamplerConfig(gen_length=gen_length, block_length=gen_length, steps=4,
                      mask_id=model.cfg.lm.mask_id)
  return generate.Generator(model, tok, cfg, cache="prefix")


def _words(n):
  return " ".join(["circle"] * n)


def test_limits_come_from_config_json(reference_checkpoint, small_context):
  assert small_context.cfg.lm.max_length == LIMIT
  for family, key in (("lavida-llada", "max_sequence_length"),
                      ("lavida-dream", "max_position_embeddings"),
                      ("llada-v", "max_position_embeddings")):
    _, src = reference_checkpoint(family)
    raw = json.load(open(os.path.join(src, "config.json")))
    cfg = hf.config_from_hf({**raw, key: 1234}, where=src)
    assert cfg.lm.max_length == 1234
    assert hf.config_to_hf(cfg)[key] == 1234


def test_a_prompt_past_the_context_is_refused_with_its_lengths(small_context, tiny_tokenizer):
  gen = _gen(small_context, tiny_tokenizer)
  image = Image.fromarray(np.zeros((40, 40, 3), np.uint8))
  fits = generate.Request("what colour is the circle", image)
  ids, images = generate.prompt_ids(small_context, tiny_tokenizer, fits, gen.system_prompt)
  n = generate.prompt_length(small_context, ids, images)
  n_image = n - (len(ids) - 1)
  assert n_image > 0 and n + 8 <= LIMIT
  gen([fits])  # fits
  # exactly at the limit passes; one token more is refused, the lengths named
  extra = LIMIT - 8 - n
  at = generate.Request("what colour is the circle " + _words(extra), image)
  assert generate.prompt_length(small_context, *generate.prompt_ids(
      small_context, tiny_tokenizer, at, gen.system_prompt)) + 8 == LIMIT
  gen([at])
  over = generate.Request("what colour is the circle " + _words(extra + 1), image)
  with pytest.raises(ValueError, match=(
      rf"^prompt of {LIMIT - 7} tokens \({LIMIT - 7 - n_image} text \+ {n_image} image\) \+ "
      rf"canvas of 8 = {LIMIT + 1} tokens exceeds the model's context of {LIMIT}$")):
    gen([over])


def test_batch_mode_and_evaluate_refuse_only_the_long_request(small_context, tiny_tokenizer):
  gen = _gen(small_context, tiny_tokenizer)
  reqs = [generate.Request("what colour is the circle"),
          generate.Request(_words(700)),
          generate.Request("how many shapes are there")]
  out = evaluate.run_generation(gen, reqs, batch_size=3)
  assert [r.error is None for r in out] == [True, False, True]
  assert "exceeds the model's context of 600" in out[1].error
  assert out[0].ids == gen(reqs[:1])[0].ids
  metrics = evaluate.evaluate(gen, [(r, "red") for r in reqs], "vqa", batch_size=3)
  assert (metrics["n"], metrics["errors"]) == (2, 1)


def test_five_thousand_words_are_refused_at_once(loaded, tiny_tokenizer):
  """The issue's failure (c): 5,000 words ran 22 s and answered nothing."""
  _, model = loaded("lavida-llada")
  assert model.cfg.lm.max_length == 4096
  gen = _gen(model, tiny_tokenizer, gen_length=32)
  t0 = time.perf_counter()
  with pytest.raises(ValueError, match=r"= 50\d\d tokens exceeds the model's context of 4096"):
    gen([generate.Request(_words(5000))])
  assert time.perf_counter() - t0 < 5
