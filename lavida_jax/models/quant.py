"""int8 weight-only inference: the LM's linear layers quantized with qwix (issue 15).

`quantize_lm(model)` replaces every `layers.Linear` kernel of the LM (q/k/v/o,
gate/up/down, the head) by int8 values with one scale per output channel (and per
layer, for stacked layers), as `qwix.quantize` computes them (absmax, symmetric);
`Linear` then runs `qwix.einsum` on them, which multiplies in the activations'
dtype and scales the output channels, so no dequantized kernel is materialised.
The embedding (a gather), the norms, the vision tower and the projector keep their
dtype: they are a small share of the bytes (LaViDa-L: 0.6 of 8.4 B parameters).

The int8 kernel keeps the kernel's logical axes (it shards as the kernel did); its
scale has them on the output axes only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from lavida_jax.models import layers

QUANTIZE = ("int8",)


def quantize_lm(model, scale_dtype=None):
  """Quantizes `model.lm`'s linear kernels to int8 in place; returns the model.

  scale_dtype: the scales' dtype (default: the kernel's, e.g. bfloat16).
  """
  for _, module in nnx.iter_graph(model.lm):
    if isinstance(module, layers.Linear) and module.kernel_scale is None:
      quantize_linear(module, scale_dtype)
  return model


def quantize_linear(linear: layers.Linear, scale_dtype=None) -> None:
  kernel = linear.kernel[...]
  n_in, n_out = len(linear.in_shape), len(linear.out_shape)
  stacked = kernel.ndim - n_in - n_out  # leading layer axis of stacked blocks
  out_axes = tuple(range(stacked)) + tuple(range(stacked + n_in, kernel.ndim))
  q = qwix.quantize(kernel, jnp.int8, channelwise_axes=out_axes,
                    scale_dtype=scale_dtype or kernel.dtype)
  names = linear.kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
  scale_names = tuple(n if i in out_axes else None for i, n in enumerate(names))
  linear.kernel = nnx.Param(q.qvalue, out_sharding=tuple(names), eager_sharding=False)
  linear.kernel_scale = nnx.Param(q.scale, out_sharding=scale_names, eager_sharding=False)


def param_bytes(module) -> int:
  """Bytes of a module's parameters (int8 kernels and their scales included)."""
  return sum(x.size * x.dtype.itemsize
             for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
