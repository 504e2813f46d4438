"""The Pallas splash-attention path (TPU kernel, run here in Pallas interpret mode)
against the XLA path: MHA and GQA, with and without key padding, lengths that are
and are not multiples of the kernel's 128-wide tiles, gradients, a mesh, and a
whole tiny LM."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lavida_jax import sharding
from lavida_jax.models import layers, lm
from tests.conftest import assert_close


def _qkv(b, t, n, k, h, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, n, h)), jax.random.normal(kk, (b, t, k, h)),
          jax.random.normal(kv, (b, t, k, h)))


def _valid(b, t):
  """Row 0 whole, row 1 right-padded (keys 0..t-41 real): [B, S] bool."""
  lengths = np.array([t, t - 40] + [t] * (b - 2))
  return jnp.asarray(np.arange(t)[None] < lengths[:, None])


@pytest.mark.parametrize("t,n,k,h,padded", [
    (256, 4, 4, 64, False),   # MHA, two 128-tiles
    (128, 4, 2, 128, True),   # GQA 2:1, key padding
    (200, 4, 1, 64, True),    # GQA 4:1, length padded to 256 + key padding
])
def test_splash_equals_xla(t, n, k, h, padded):
  q, kk, v = _qkv(2, t, n, k, h)
  valid = _valid(2, t) if padded else None
  ours = layers.dot_product_attention(q, kk, v, valid, "splash_interpret")
  ref = layers.dot_product_attention(q, kk, v, valid, "xla")
  assert ours.shape == ref.shape == (2, t, n, h)
  assert_close(ours, ref, rel=1e-5)  # padded query rows included: same keys as XLA's


def test_splash_gradients_equal_xla():
  q, k, v = _qkv(2, 128, 4, 2, 64, seed=1)
  valid = _valid(2, 128)
  w = jax.random.normal(jax.random.key(5), (2, 128, 4, 64))

  def loss(impl):
    return lambda q, k, v: jnp.sum(w * layers.dot_product_attention(q, k, v, valid, impl))

  ours = jax.grad(loss("splash_interpret"), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, ref):
    assert_close(a, b, rel=1e-5)


def test_splash_under_a_mesh_runs_per_shard():
  """8 devices: batch over (data, fsdp) = 2 x 2, heads over tensor = 2 (shard_map)."""
  mesh = sharding.make_mesh((2, 2, 2))
  q, k, v = _qkv(4, 128, 4, 2, 64, seed=2)
  valid = _valid(4, 128)
  ref = layers.dot_product_attention(q, k, v, valid, "xla")
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    f = jax.jit(lambda q, k, v, m: layers.dot_product_attention(q, k, v, m, "splash_interpret"))
    text = f.lower(put(q), put(k), put(v), put(valid)).as_text()
    ours = f(put(q), put(k), put(v), put(valid))
  assert "shard_map" in text or "sdy.manual_computation" in text
  assert_close(ours, ref, rel=1e-5)


def test_block_sizes_and_refusals():
  assert [layers.splash_block(t) for t in (128, 256, 384, 768, 4096)] == [128, 256, 128,
                                                                        256, 512]
  with pytest.raises(ValueError, match="multiples of 128, got 200"):
    layers.splash_block(200)
  q, k, v = _qkv(1, 128, 3, 2, 64)
  with pytest.raises(ValueError, match=r"query heads \(3\) to be a multiple of kv heads \(2\)"):
    layers.splash_attention(q, k, v, interpret=True)


def test_full_mask_falls_back_to_xla():
  """An arbitrary [B, T, S] mask is not expressible as segment ids: XLA runs it."""
  q, k, v = _qkv(1, 128, 2, 2, 64)
  mask = jnp.tril(jnp.ones((128, 128), bool))[None]
  out = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, mask, "splash"))
  assert "pallas" not in out.lower(q, k, v).as_text().lower()
  assert_close(out(q, k, v), layers.dot_product_attention(q, k, v, mask), rel=1e-6)


def test_lm_with_splash_equals_xla():
  """A tiny Dream-structured LM (GQA 7:1): same logits with either attention, key
  padding included, and the same prefix-cache decoding."""
  cfg = lm.LMConfig.tiny_dream(n_layers=1, d_model=56, n_heads=7, head_dim=8)
  ref = lm.DiffusionLM(cfg, rngs=nnx.Rngs(0))
  ours = lm.DiffusionLM(dataclasses.replace(cfg, attention_impl="splash_interpret"),
                        rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 250, (2, 40)))
  valid = jnp.asarray(np.arange(40)[None] < np.array([[40], [31]]))
  assert_close(ours(ids, valid), ref(ids, valid), rel=1e-5)
  prefix_valid = valid[:, :24]
  x = ours.embed_tokens(ids)
  cache_o, _ = ours.prefill(x[:, :24], prefix_valid)
  cache_r, _ = ref.prefill(x[:, :24], prefix_valid)
  assert_close(ours.hidden_with_cache(x[:, 24:], cache_o),
               ref.hidden_with_cache(x[:, 24:], cache_r), rel=1e-5)
