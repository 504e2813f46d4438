"""Test setup: the CPU backend with 8 fake devices, fp32 matmuls."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
  """(Reference, folder) per family: tiny PyTorch models saved in the released layout."""
  from tests.torch_reference import Reference

  cache = {}

  def get(family: str, shards: int = 1):
    if (family, shards) not in cache:
      ref = Reference(family)
      folder = ref.save(str(tmp_path_factory.mktemp(f"{family}-{shards}")), shards=shards)
      cache[family, shards] = (ref, folder)
    return cache[family, shards]

  return get


@pytest.fixture(scope="session")
def loaded(reference_checkpoint):
  """(Reference, our model loaded through load_pretrained) per family."""
  import lavida_jax

  cache = {}

  def get(family: str):
    if family not in cache:
      ref, folder = reference_checkpoint(family)
      cache[family] = (ref, lavida_jax.load_pretrained(folder))
    return cache[family]

  return get


def assert_close(ours, ref, rel=1e-4):
  """max |ours - ref| <= rel * max |ref| (fp32 parity, SPEC §3.6)."""
  import numpy as np

  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  scale = max(np.abs(ref).max(), 1e-6)
  err = np.abs(ours - ref).max()
  assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x scale {scale:.3g}"


TINY_SPECIALS = {"<|startoftext|>": 244, "<|start_header_id|>": 245, "<|end_header_id|>": 246,
                 "<|eot_id|>": 247, "<|im_start|>": 248, "<|im_end|>": 249, "[FIM]": 250,
                 "[S]": 251, "<image>": 252, "<|endoftext|>": 254, "<|mdm_mask|>": 255}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
  """A word-level tokenizer.json inside the tiny models' 256-id vocabulary, with the
  chat specials; eos 254 and mask 255 as in LMConfig.tiny_*()."""
  import re

  import tokenizers
  from tokenizers import models, pre_tokenizers

  from lavida_jax import text

  words = sorted(set(re.findall(r"\w+|[^\w\s]", text.SYSTEM_PROMPT + " system user assistant "
                                "what colour is the circle square triangle red blue green "
                                "how many shapes are there one two three a an and of")))
  vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
  assert len(vocab) < 244
  vocab.update(TINY_SPECIALS)
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(list(TINY_SPECIALS))
  folder = tmp_path_factory.mktemp("tiny_tokenizer")
  tok.save(str(folder / "tokenizer.json"))
  return text.load_tokenizer(str(folder))


# Identical programs compiled by several tests (and xdist workers) are compiled once.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.environ.get("TMPDIR", "/tmp"), "lavida_jax_jit_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
