"""int8 weight-only LM linears (issue 15, models/quant.py): the kernel and scales
qwix computes equal the absmax rule restated in NumPy, a Linear's output equals x @
the dequantized kernel, the LM's logits stay close to fp32, the bytes shrink, and a
quantized model generates the same on a mesh as on one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lavida_jax
from lavida_jax import generate, sharding
from lavida_jax.diffusion.sampler import SamplerConfig
from lavida_jax.models import layers, quant


def _absmax_int8(w, out_axes):
  """NumPy restatement of qwix's symmetric int8: one scale per output channel (and
  layer), absmax / 127.5 (qwix widens the bound by half a step so the top bucket is
  used whole), values rounded and saturated to int8."""
  red = tuple(i for i in range(w.ndim) if i not in out_axes)
  scale = np.abs(w).max(axis=red, keepdims=True) / np.float32(127.5)
  return np.clip(np.round(w / scale), -128, 127).astype(np.int8), scale


@pytest.mark.parametrize("in_shape,out_shape,stack", [((8,), (12,), 0), ((8,), (3, 4), 0),
                                                       ((3, 4), (8,), 0), ((8,), (12,), 2)])
def test_linear_int8_is_x_times_the_dequantized_kernel(in_shape, out_shape, stack):
  axes = ("embed",) * len(in_shape) + ("mlp",) * len(out_shape)
  lin = layers.Linear(in_shape, out_shape, axes, bias=True, rngs=nnx.Rngs(0))
  if stack:  # a stacked kernel [layers, *in, *out], as scanned blocks hold them
    lin.kernel = nnx.Param(jax.random.normal(jax.random.key(1), (stack, *in_shape,
                                                                 *out_shape)))
  w = np.asarray(lin.kernel[...])
  quant.quantize_linear(lin)
  n_in = len(in_shape)
  out_axes = tuple(range(stack and 1)) + tuple(range((stack and 1) + n_in, w.ndim))
  q, scale = _absmax_int8(w, out_axes)
  assert lin.kernel[...].dtype == jnp.int8
  edge = np.abs(w / scale) > 127.4  # the absmax itself: +-127.5, rounding either way
  got = np.asarray(lin.kernel[...]).astype(np.int32)
  np.testing.assert_array_equal(got[~edge], q[~edge])
  assert np.abs(got[edge] - q[edge]).max() <= 1
  np.testing.assert_allclose(lin.kernel_scale[...], scale, rtol=1e-6)
  x = np.random.RandomState(2).randn(2, 5, *in_shape).astype(np.float32)
  if stack:
    return  # (a stacked kernel is sliced per layer by scan_layers before it is called)
  ins, outs = "abc"[:n_in], "def"[:len(out_shape)]
  kernel = got * np.asarray(lin.kernel_scale[...])  # its own int8 values, dequantized
  want = np.einsum(f"xy{ins},{ins}{outs}->xy{outs}", x, kernel) + np.asarray(lin.bias[...])
  np.testing.assert_allclose(lin(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
def test_quantized_lm_logits_close_and_bytes_shrink(loaded, family):
  _, model = loaded(family)
  q = nnx.merge(*nnx.split(model))  # a copy over new arrays once quantized
  quant.quantize_lm(q)
  ids = jax.random.randint(jax.random.key(0), (2, 24), 0, 200)
  ref, got = model.lm(ids), q.lm(ids)
  rel = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
  assert 0 < rel < 5e-2, rel  # int8 is lossy, but not by much (3 random layers)
  assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
  kernels = [m.kernel[...] for _, m in nnx.iter_graph(q.lm) if isinstance(m, layers.Linear)]
  assert kernels and all(k.dtype == jnp.int8 for k in kernels)
  before, after = quant.param_bytes(model.lm), quant.param_bytes(q.lm)
  linear = sum(k.size for k in kernels)
  assert before - after == pytest.approx(3 * linear, rel=0.02)  # fp32 -> int8 (+ scales)


def test_load_pretrained_int8_generates_the_same_on_a_mesh(reference_checkpoint,
                                                           tiny_tokenizer):
  _, folder = reference_checkpoint("lavida-llada")
  one = lavida_jax.load_pretrained(folder, quantize="int8")
  mesh = sharding.make_mesh((1, 4, 2))
  sharded = lavida_jax.load_pretrained(folder, quantize="int8", mesh=mesh)
  k = sharded.lm.head.kernel[...]
  assert k.dtype == jnp.int8 and len(k.sharding.device_set) > 1
  cfg = SamplerConfig(gen_length=8, block_length=4, steps=4, mask_id=one.cfg.lm.mask_id)
  reqs = [generate.Request("what colour is the circle ?"), generate.Request("a red square")]
  a = generate.Generator(one, tiny_tokenizer, cfg)(reqs)
  b = generate.Generator(sharded, tiny_tokenizer, cfg)(reqs)
  c = generate.Generator(one, tiny_tokenizer, cfg, unroll_layers=False)(reqs)
  assert [r.ids for r in a] == [r.ids for r in b] == [r.ids for r in c]
  with pytest.raises(ValueError, match="quantize='int4': expected one of int8"):
    lavida_jax.load_pretrained(folder, quantize="int4")
