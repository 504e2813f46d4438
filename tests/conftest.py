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
