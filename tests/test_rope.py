"""The RoPE inverse-frequency table has PyTorch's bits (SPEC §13), and long prompts
keep fp32 parity with transformers' Llama / Qwen2 at 1e-5."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import lavida_jax
from lavida_jax.models import layers
from lavida_jax.models.lavida import LaViDaConfig
from tests.conftest import assert_close

CASES = [(d, theta) for d in (64, 128) for theta in (1e4, 5e5, 1e6)]


def transformers_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  cfg = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, rope_theta=theta)
  return LlamaRotaryEmbedding(cfg).inv_freq.numpy()


def bits(x) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.int32)


@pytest.mark.parametrize("head_dim,theta", CASES)
def test_inv_freq_has_torch_bits(head_dim, theta):
  """Bit-equal to transformers' table wherever torch's float32 `pow` is its scalar
  (glibc) one. On AVX2 / AVX-512 torch's vectorised pow (SLEEF, 1-ulp bound) rounds
  a few powers lying within ~1e-9 of a float32 midpoint the other way; those entries
  equal torch's own scalar pow, entry by entry."""
  ours, theirs = layers.rope_inv_freq(head_dim, theta), transformers_inv_freq(head_dim, theta)
  exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
  scalar = np.array([(1.0 / (theta ** exponent[i:i + 1])).item()  # one element: scalar path
                     for i in range(head_dim // 2)], np.float32)
  assert ours.dtype == np.float32 and ours.shape == (head_dim // 2,)
  np.testing.assert_array_equal(bits(ours), bits(scalar))
  simd_off = np.flatnonzero(bits(theirs) != bits(scalar))
  np.testing.assert_array_equal(np.flatnonzero(bits(ours) != bits(theirs)), simd_off)
  assert simd_off.size <= 1, simd_off
  # a correctly rounded 1/θ^e (what XLA computes in float32) is not torch's table
  exact = (1.0 / np.float64(theta) ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
  assert (bits(exact) != bits(theirs)).sum() >= 10


def test_inv_freq_has_torch_bits_on_torchs_default_cpu_kernels():
  """With ATEN_CPU_CAPABILITY=default (no SLEEF) every entry of every case is equal."""
  code = ("import numpy as np, tests.test_rope as t\n"
          "for d, th in t.CASES:\n"
          "  np.testing.assert_array_equal(t.bits(t.transformers_inv_freq(d, th)),\n"
          "                                t.bits(t.layers.rope_inv_freq(d, th)))\n"
          "print('ok')\n")
  env = dict(os.environ, ATEN_CPU_CAPABILITY="default", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def long_reference_checkpoint(tmp_path, family: str):
  """The tiny model with the real head_dim 128 (and the family's θ), saved in the
  released layout. (LLaDA's config has no head_dim: d_model = 2 × 128; Dream keeps
  its tiny width 112 under 7 heads of 128, GQA 7:1.)"""
  from tests.torch_reference import Reference
  tiny = LaViDaConfig.create(family, "tiny")
  lm = dataclasses.replace(tiny.lm, head_dim=128)
  if family == "lavida-llada":
    lm = dataclasses.replace(lm, n_heads=2, n_kv_heads=2, d_model=256)
  cfg = dataclasses.replace(tiny, lm=lm,
                            connector=dataclasses.replace(tiny.connector, lm_dim=lm.d_model))
  ref = Reference(family, seed=7, cfg=cfg)
  return ref, ref.save(str(tmp_path / family))


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
def test_text_logits_over_1100_positions(tmp_path, family):
  """Positions 0..1099 at head_dim 128 (θ 5e5 / 1e6): a 1-ulp table moved these
  logits by ~1e-4 relative past ~500 positions."""
  ref, folder = long_reference_checkpoint(tmp_path, family)
  model = lavida_jax.load_pretrained(folder)
  ids = np.random.default_rng(11).integers(0, 250, (1, 1100))
  assert_close(model.text_logits(ids), ref.text_logits(ids), rel=1e-5)
