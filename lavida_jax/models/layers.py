"""Building blocks shared by the vision tower and the language models.

Axes: B batch, T query length, S key length, D model width, N query heads,
K kv heads, H head dim, F MLP width. Every parameter carries logical axis
names (`out_sharding` metadata); `lavida_jax.sharding` maps them to the mesh.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes,
          dtype=jnp.float32) -> nnx.Param:
  """A parameter with logical axis names; sharding happens at jit boundaries."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), tuple(shape), dtype),
                   out_sharding=tuple(axes), eager_sharding=False)


normal = nnx.initializers.normal
zeros = nnx.initializers.zeros
ones = nnx.initializers.ones


class Linear(nnx.Module):
  """y = x @ W (+ b) with W: [*in_shape, *out_shape] (heads kept as an axis)."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               axes: Axes, *, bias: bool, rngs: nnx.Rngs,
               param_dtype=jnp.float32, dtype=None):
    self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
    fan_in = math.prod(self.in_shape)
    self.kernel = param(rngs, normal(fan_in ** -0.5), self.in_shape + self.out_shape,
                        axes, param_dtype)
    self.bias = (param(rngs, zeros, self.out_shape, axes[len(self.in_shape):], param_dtype)
                 if bias else None)
    self.dtype = dtype

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    letters = "abcdefgh"
    ins, outs = letters[:n_in], letters[n_in:n_in + n_out]
    y = jnp.einsum(f"...{ins},{ins}{outs}->...{outs}", x.astype(dtype),
                   self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class RMSNorm(nnx.Module):
  """LLaMA/LLaDA RMSNorm: normalise in fp32, cast back, then scale."""

  def __init__(self, dim: int, eps: float, axis_name: str, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.scale = param(rngs, ones, (dim,), (axis_name,), param_dtype)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, axis_name: str, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.scale = param(rngs, ones, (dim,), (axis_name,), param_dtype)
    self.bias = param(rngs, zeros, (dim,), (axis_name,), param_dtype)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def rope_angles(positions_BT, head_dim: int, theta: float):
  """cos, sin: [B, T, H/2], angles computed in float32 like the reference."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTNH, cos_BTh, sin_BTh):
  """Rotate-half (NeoX) layout: pairs (i, i + H/2)."""
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS=None, implementation=None):
  """Softmax attention, scale 1/sqrt(H), GQA when K < N.

  mask_BTS: bool, True where query t may attend key s (None: attend to all).
  implementation: None/'xla' (any backend) or 'cudnn' (GPU).
  """
  impl = None if implementation in (None, "xla") else implementation
  mask = None if mask_BTS is None else mask_BTS[:, None, :, :]
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask,
                                      implementation=impl)


class Attention(nnx.Module):
  """Multi-head attention with optional GQA, biases and rotary embedding."""

  def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
               qkv_bias: bool, out_bias: bool, axes: dict[str, str],
               rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
               implementation=None):
    e, q, kv, h = axes["embed"], axes["q_heads"], axes["kv_heads"], axes["head_dim"]
    mk = lambda n, ax, b: Linear((dim,), (n, head_dim), (e, ax, h), bias=b, rngs=rngs,
                                 param_dtype=param_dtype, dtype=dtype)
    self.q = mk(n_heads, q, qkv_bias)
    self.k = mk(n_kv_heads, kv, qkv_bias)
    self.v = mk(n_kv_heads, kv, qkv_bias)
    self.o = Linear((n_heads, head_dim), (dim,), (q, h, e), bias=out_bias, rngs=rngs,
                    param_dtype=param_dtype, dtype=dtype)
    self.implementation = implementation

  def __call__(self, x_BTD, mask_BTS=None, rope=None, prefix_kv=None):
    """-> (out [B, T, D], (k, v) [B, T, K, H] of x's own positions, post-RoPE).

    prefix_kv: cached (k, v) [B, P, K, H] of earlier positions; queries attend to
    the prefix keys first, then their own (mask_BTS is then [B, T, P + T]).
    """
    q, k, v = self.q(x_BTD), self.k(x_BTD), self.v(x_BTD)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    keys, values = k, v
    if prefix_kv is not None:
      keys = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)
      values = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
    out = dot_product_attention(q, keys, values, mask_BTS, self.implementation)
    return self.o(out), (k, v)


class MLP(nnx.Module):
  """fc1 -> activation -> fc2, with biases (SigLIP MLP and the LaViDa projector)."""

  def __init__(self, d_in: int, d_hidden: int, d_out: int, act: Callable,
               axes: Axes, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
    a_in, a_hidden, a_out = axes
    self.fc1 = Linear((d_in,), (d_hidden,), (a_in, a_hidden), bias=True, rngs=rngs,
                      param_dtype=param_dtype, dtype=dtype)
    self.fc2 = Linear((d_hidden,), (d_out,), (a_hidden, a_out), bias=True, rngs=rngs,
                      param_dtype=param_dtype, dtype=dtype)
    self.act = act

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               dtype=None):
    mk = lambda i, o, ax: Linear((i,), (o,), ax, bias=False, rngs=rngs,
                                 param_dtype=param_dtype, dtype=dtype)
    self.gate = mk(dim, hidden, ("embed", "mlp"))
    self.up = mk(dim, hidden, ("embed", "mlp"))
    self.down = mk(hidden, dim, ("mlp", "embed"))

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


gelu_tanh = lambda x: jax.nn.gelu(x, approximate=True)
gelu_exact = lambda x: jax.nn.gelu(x, approximate=False)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack_layers(make_block: Callable[[nnx.Rngs], nnx.Module], n: int,
                 rngs: nnx.Rngs) -> nnx.Module:
  """n blocks with parameters stacked on a leading 'layers' axis."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=n,
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(r):
    return make_block(r)

  return make(rngs)


def scan_layers(blocks: nnx.Module, x, *args, xs=None, remat: str = "none"):
  """Runs x through stacked blocks with one compiled body.

  block(x, *args[, xs_l]) -> (x, y_l): xs (optional) is sliced per layer along
  axis 0, and the y_l are stacked on axis 0. Returns (x, ys).

  A plain `lax.scan` over the split state (not `nnx.scan`), so the blocks can
  be called from inside any JAX transform (the sampler's scan and cond).
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; expected one of {list(REMAT_POLICIES)}")
  graphdef, state = nnx.split(blocks)

  def body(x, layer):
    state_l, xs_l = layer
    block = nnx.merge(graphdef, state_l)
    return block(x, *args) if xs_l is None else block(x, *args, xs_l)

  if remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return jax.lax.scan(body, x, (state, xs))
