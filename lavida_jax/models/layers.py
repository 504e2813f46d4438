"""Building blocks shared by the vision tower and the language models.

Axes: B batch, T query length, S key length, D model width, N query heads,
K kv heads, H head dim, F MLP width. Every parameter carries logical axis
names (`out_sharding` metadata); `lavida_jax.sharding` maps them to the mesh.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
import qwix
from jax.sharding import PartitionSpec as P

from lavida_jax.sharding import constrain

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
    self.kernel_scale = nnx.data(None)  # int8 weight-only: per-channel scales (quant.py)
    # LoRA (lora.py): y += scale · dropout(x) A B, A: [*in, r], B: [r, *out] (fp32 params).
    self.lora_a = self.lora_b = self.lora_key = nnx.data(None)
    self.lora_scale, self.lora_dropout = 0.0, 0.0
    self.out_major = False  # kernel stored [*out, *in] (`out_major_kernels`)

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    letters = "abcdefgh"
    ins, outs = letters[:n_in], letters[n_in:n_in + n_out]
    equation = f"...{ins},{ins}{outs}->...{outs}"
    if self.out_major:  # [out, in] kernel: a 2-D dot (XLA transposes a 3-D one first)
      x = x.reshape(x.shape[:x.ndim - n_in] + (-1,)).astype(dtype)
      y = jnp.einsum("...i,oi->...o", x, self.kernel[...].astype(dtype))
      y = y.reshape(y.shape[:-1] + self.out_shape)
    elif self.kernel_scale is not None:  # int8 kernel: qwix scales the output channels
      kernel = qwix.QArray(self.kernel[...], self.kernel_scale[...].astype(dtype),
                           qtype=jnp.int8)
      y = qwix.einsum(equation, x.astype(dtype), kernel)
    else:
      y = jnp.einsum(equation, x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    if self.lora_a is not None:
      y = y + self._lora(x.astype(dtype), ins, outs, dtype)
    return y

  def lora_delta(self):
    """scale · A B in the kernel's layout [L.., *in, *out] (fp32)."""
    a, b = self.lora_a[...], self.lora_b[...]
    n_lead = a.ndim - len(self.in_shape) - 1
    a2 = a.reshape(a.shape[:n_lead] + (-1, a.shape[-1]))  # [L.., in, r]
    b2 = b.reshape(b.shape[:n_lead + 1] + (-1,))  # [L.., r, out]
    d = jnp.einsum("...ir,...ro->...io", a2, b2, precision=jax.lax.Precision.HIGHEST)
    return (d * self.lora_scale).reshape(a.shape[:-1] + b.shape[n_lead + 1:])

  def dense_kernel(self, dtype=None):
    """W as the layer applies it, for callers that contract with W themselves (the
    chunked cross-entropy): int8 values times their scales, plus an adapter's
    scale · A B (without dropout); the stored kernel itself when neither is set."""
    w = self.kernel[...]
    if self.kernel_scale is None and self.lora_a is None:
      return w
    dtype = dtype or self.dtype or jnp.float32
    w = w.astype(jnp.float32)
    if self.kernel_scale is not None:
      w = w * self.kernel_scale[...].astype(jnp.float32)
    if self.lora_a is not None:
      w = w + self.lora_delta()
    return w.astype(dtype)

  def _lora(self, x, ins: str, outs: str, dtype):
    """scale · (dropout(x) A) B: the rank-r path, never the [in, out] product."""
    if self.lora_key is not None and self.lora_dropout > 0:  # set only in a train step
      keep = jax.random.bernoulli(jax.random.wrap_key_data(self.lora_key[...]),
                                  1.0 - self.lora_dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(dtype)
    h = jnp.einsum(f"...{ins},{ins}r->...r", x, self.lora_a[...].astype(dtype))
    y = jnp.einsum(f"...r,r{outs}->...{outs}", h, self.lora_b[...].astype(dtype))
    return y * jnp.asarray(self.lora_scale, dtype)


def out_major_kernels(module: nnx.Module) -> None:
  """Store the plain kernels of `module`'s Linears as [L.., prod(out), prod(in)], in
  place (new arrays; int8 and adapted kernels keep theirs). The same products:
  XLA:CPU's dots read a weight faster with the contracted axis minor, as PyTorch's
  nn.Linear stores it (the d512 layers' matmuls on a 32-row canvas 1.2x faster on
  2 cores; benchmarks/README). The Generator's copy of the weights, on CPUs."""
  for _, m in nnx.iter_modules(module):
    if not isinstance(m, Linear) or m.out_major or m.kernel_scale is not None \
        or m.lora_a is not None:
      continue
    w = m.kernel[...]
    n_in, n_out = len(m.in_shape), len(m.out_shape)
    lead = w.ndim - n_in - n_out
    names = m.kernel.get_metadata().get("out_sharding") or (None,) * w.ndim
    group = lambda ns: next((n for n in ns if n is not None), None)  # a merged axis
    w = jnp.transpose(w, (*range(lead), *range(lead + n_in, w.ndim), *range(lead, lead + n_in)))
    w = w.reshape(w.shape[:lead] + (math.prod(m.out_shape), math.prod(m.in_shape)))
    names = (*names[:lead], group(names[lead + n_in:]), group(names[lead:lead + n_in]))
    m.kernel = nnx.Param(w, out_sharding=names, eager_sharding=False)
    m.out_major = True


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


@functools.lru_cache(maxsize=None)
def rope_inv_freq(head_dim: int, theta: float):
  """[H/2] float32 numpy: 1 / θ^(2i/H) rounded as PyTorch's float32 CPU code rounds it.

  LLaDA and transformers compute `1.0 / (theta ** (arange(0, H, 2).float() / H))`:
  the exponent is exact in float32, the power is rounded to float32, then the
  reciprocal is rounded again. A correctly rounded 1/θ^e (what XLA computes)
  differs by 1 ulp at ~1 entry in 4 (SPEC §13), and that moves the float32 angles
  at long positions. Built on the host once, with two roundings like torch: the
  float64 power rounded to float32 is torch's scalar (glibc) `powf`; torch's
  AVX2/AVX-512 kernels use SLEEF's `powf` (1-ulp bound), which rounds a value
  lying within ~1e-9 of a float32 midpoint the other way at a few entries
  (head_dim 128, θ 1e6: entry 37 of 64; none for θ 1e4 / 5e5 at 64 or 128).
  """
  import numpy as np  # host side, once per (head_dim, theta)
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  power = (np.float64(np.float32(theta)) ** exponent.astype(np.float64)).astype(np.float32)
  table = np.float32(1.0) / power
  table.setflags(write=False)  # shared by the cache
  return table


def rope_angles(positions_BT, head_dim: int, theta: float):
  """cos, sin: [B, T, H/2]; angles = position × inv_freq in float32, like the reference."""
  inv_freq = jnp.asarray(rope_inv_freq(head_dim, float(theta)))
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTNH, cos_BTh, sin_BTh):
  """Rotate-half (NeoX) layout: pairs (i, i + H/2)."""
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=None, implementation=None):
  """Softmax attention, scale 1/sqrt(H), GQA when K < N.

  mask: None (attend to all), bool [B, S] key padding (True: a key every query
  may attend) or bool [B, T, S] (True where query t may attend key s).
  implementation: None/'xla' (any backend), 'xla_cpu' (`xla_attention`: the same
  values, arranged for XLA:CPU), 'cudnn' (GPU), 'splash' (TPU Pallas
  kernel, `splash_attention`) or 'splash_interpret' (the same kernel in Pallas
  interpret mode: CPU tests). The splash path expresses no mask and key padding
  (segment ids); an arbitrary [B, T, S] mask (none of the LM's own calls passes
  one) is not expressible with it and goes through XLA's attention instead.
  """
  if implementation in SPLASH and (mask is None or mask.ndim == 2):
    return splash_attention(q_BTNH, k_BSKH, v_BSKH, mask,
                            interpret=implementation == "splash_interpret")
  if implementation == "xla_cpu":
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, mask)
  impl = "cudnn" if implementation == "cudnn" else None
  if mask is not None:
    mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None, :, :]
    if impl == "cudnn":  # cuDNN checks the mask's query axis: [B, 1, T, S]
      mask = jnp.broadcast_to(mask, (mask.shape[0], 1, q_BTNH.shape[1], mask.shape[-1]))
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, implementation=impl)


def xla_attention(q_BTNH, k_BSKH, v_BSKH, mask=None):
  """`jax.nn.dot_product_attention`'s XLA path, arranged for XLA:CPU's matmuls.

  Heads-major operands with each contraction's axis minor (q, k [.., T|S, H],
  v [.., H, S]: small transposes) and the normalisation deferred (the
  unnormalised probabilities meet V; the [.., T, H] output is divided, not the
  [.., T, S] probabilities). Otherwise XLA:CPU transposes and copies the
  [T, S] probabilities twice per layer: the SigLIP tower's 729-token views ran
  1.8x slower. Masked scores take jax's large negative value, so a query with
  no visible key averages over all of them as there. Used by the Generator on CPUs
  (vision and prefill); training keeps jax's (this one's gradient was ~6% slower on
  the CPU demo's step).
  """
  b, t, n, h = q_BTNH.shape
  kh = k_BSKH.shape[2]
  q = q_BTNH.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  k = k_BSKH.transpose(0, 2, 1, 3)  # [B, K, S, H]
  v = v_BSKH.transpose(0, 2, 3, 1)  # [B, K, H, S]
  s = jnp.einsum("bkgth,bksh->bkgts", q, k,
                 preferred_element_type=jnp.float32) * jnp.float32(h ** -0.5)
  if mask is not None:
    mask = mask[:, None, None, None, :] if mask.ndim == 2 else mask[:, None, None, :, :]
    s = jnp.where(mask, s, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
  p = jnp.exp(s - s.max(-1, keepdims=True))
  out = jnp.einsum("bkgts,bkhs->bkgth", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = out / p.sum(-1)[..., None]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_BTNH.dtype)


def cached_attention(q_BTNH, k_BTKH, v_BTKH, ck_BKPH, cv_BKHP, cache_valid_BP=None,
                     per_head=False, groups: int = 1):
  """Attention of T queries over P cached keys and their own T keys (decoding).

  The softmax over [cache, own] is combined from two partial ones (shared max,
  summed normalisers), so the cache is read in place: concatenating it with the
  new keys would copy every layer's cache on every denoising step. GQA when
  K < N; scale 1/sqrt(H). The cache is stored in the layouts the two
  contractions read in place on XLA:CPU, the contracted axis minor: keys
  [B, K, P, H], values [B, K, H, P]; in any other layout XLA copies every
  layer's cache on every step (token-major: 15% of a d512 step; values
  [B, K, P, H]: 10%). At batch 1 the cache may also come split by head, tuples
  of K keys [1, P, H] and values [1, H, P] (`split_heads`). cache_valid_BP:
  bool, True where a cached key may be attended (prompt padding and, for the
  dual cache, the recomputed window are False); None: all. Always XLA's
  einsums: T is small (a canvas or a block). per_head (XLA:CPU, batch 1): the
  same values from 2-D matmuls, one kv head at a time (`_cached_attention_2d`).
  groups: the T queries are `groups` independent canvases of T / groups
  positions side by side (the fixed decoder's lookahead): each sees the whole
  cache but only its own group's keys.
  """
  b, t, n, h = q_BTNH.shape
  kh = k_BTKH.shape[2]
  if t % groups:
    raise ValueError(f"{t} queries do not split into {groups} groups")
  if isinstance(ck_BKPH, tuple) or (per_head and b == 1):
    return _cached_attention_2d(q_BTNH, k_BTKH, v_BTKH, ck_BKPH, cv_BKHP, cache_valid_BP,
                                groups)
  c, t = groups, t // groups
  q = (q_BTNH * jnp.asarray(h ** -0.5, q_BTNH.dtype)).reshape(b, c, t, kh, n // kh, h)
  k, v = k_BTKH.reshape(b, c, t, kh, h), v_BTKH.reshape(b, c, t, kh, h)
  ck, cv = ck_BKPH.astype(q.dtype), cv_BKHP.astype(q.dtype)
  s_cache = jnp.einsum("bctkgh,bkph->bkgctp", q, ck, preferred_element_type=jnp.float32)
  s_own = jnp.einsum("bctkgh,bcskh->bkgcts", q, k, preferred_element_type=jnp.float32)
  if cache_valid_BP is not None:
    s_cache = jnp.where(cache_valid_BP[:, None, None, None, None, :], s_cache, -jnp.inf)
  m = jnp.maximum(s_cache.max(-1, keepdims=True), s_own.max(-1, keepdims=True))
  p_cache, p_own = jnp.exp(s_cache - m), jnp.exp(s_own - m)
  denom = p_cache.sum(-1) + p_own.sum(-1)  # [B, K, G, C, T]
  out = (jnp.einsum("bkgctp,bkhp->bctkgh", p_cache.astype(cv.dtype), cv,
                    preferred_element_type=jnp.float32)
         + jnp.einsum("bkgcts,bcskh->bctkgh", p_own.astype(v.dtype), v,
                      preferred_element_type=jnp.float32))
  out = out / denom.transpose(0, 3, 4, 1, 2)[..., None]
  return out.reshape(b, c * t, n, h).astype(q_BTNH.dtype)


def _cached_attention_2d(q_1TNH, k_1TKH, v_1TKH, ck_1KPH, cv_1KHP, cache_valid_1P,
                         groups: int = 1):
  """`cached_attention` at batch 1 as 2-D matmuls per kv head, each operand with its
  contracted axis minor: XLA:CPU runs them without the transposes and copies it puts
  around the head-batched ones (8 layers of a d512 step's attention 10 -> 7.5 ms on
  2 cores); at batch > 1 the batched form is the faster one. A head's cache slice
  is a copy on XLA:CPU (64 per d512 step, ~12% of its op time): a cache already
  split by head (tuples) is read in place."""
  _, t, n, h = q_1TNH.shape
  kh = k_1TKH.shape[2]
  g, c = n // kh, groups
  q = (q_1TNH[0] * jnp.asarray(h ** -0.5, q_1TNH.dtype)).reshape(t, kh, g, h)
  split = isinstance(ck_1KPH, tuple)
  outs = []
  for j in range(kh):  # a group's queries as rows: [T * G, H]
    qj = q[:, j].reshape(t * g, h)
    ck, cv = (ck_1KPH[j][0], cv_1KHP[j][0]) if split else (ck_1KPH[0, j], cv_1KHP[0, j])
    ck, cv = ck.astype(qj.dtype), cv.astype(qj.dtype)
    s_cache = jnp.einsum("rh,ph->rp", qj, ck, preferred_element_type=jnp.float32)
    # own keys per canvas: [C, T / C * G, T / C]
    qc, kc = qj.reshape(c, -1, h), k_1TKH[0, :, j].reshape(c, -1, h)
    s_own = jnp.einsum("crh,csh->crs", qc, kc, preferred_element_type=jnp.float32)
    if cache_valid_1P is not None:
      s_cache = jnp.where(cache_valid_1P[0][None, :], s_cache, -jnp.inf)
    m = jnp.maximum(s_cache.max(-1, keepdims=True),
                    s_own.max(-1).reshape(t * g, 1))
    p_cache, p_own = jnp.exp(s_cache - m), jnp.exp(s_own - m.reshape(c, -1, 1))
    denom = p_cache.sum(-1) + p_own.sum(-1).reshape(t * g)  # [T * G]
    own = jnp.einsum("crs,csh->crh", p_own.astype(v_1TKH.dtype),
                     v_1TKH[0, :, j].reshape(c, -1, h), preferred_element_type=jnp.float32)
    out = (jnp.einsum("rp,hp->rh", p_cache.astype(cv.dtype), cv,
                      preferred_element_type=jnp.float32) + own.reshape(t * g, h))
    outs.append((out / denom[:, None]).reshape(t, g, h))
  return jnp.concatenate(outs, axis=1)[None].astype(q_1TNH.dtype)


def split_heads(ck_1KPH, cv_1KHP):
  """A batch-1 layer cache as per-head tuples (`cached_attention` reads them in place)."""
  return (tuple(ck_1KPH[:, j] for j in range(ck_1KPH.shape[1])),
          tuple(cv_1KHP[:, j] for j in range(cv_1KHP.shape[1])))


SPLASH = ("splash", "splash_interpret")
SPLASH_LANES = 128  # lengths are padded to a multiple of this (the kernel's lane width)
SPLASH_BLOCKS = (512, 256, 128)  # tile sizes tried, largest first


def splash_block(length: int) -> int:
  """The largest tile in SPLASH_BLOCKS that divides a (padded) sequence length."""
  for b in SPLASH_BLOCKS:
    if length % b == 0:
      return b
  raise ValueError(f"splash attention needs sequence lengths that are multiples of "
                   f"{SPLASH_BLOCKS[-1]}, got {length}")


def splash_attention(q_BTNH, k_BSKH, v_BSKH, kv_valid_BS=None, *, interpret=False):
  """`jax.experimental.pallas.ops.tpu.splash_attention` in our layout (no [T, S] scores in HBM).

  kv_valid_BS: bool key padding (None: every key is real). T and S are padded to a
  multiple of 128 and the padding is masked with splash `SegmentIds`: every query
  has segment 1, a real key 1, a padded key 0. So each query attends exactly to the
  real keys, as the XLA path's mask does (padded queries too: their outputs match
  XLA's and are sliced off or ignored; only a row with no real key at all differs,
  averaging over its padded keys). Under a mesh (`jax.set_mesh`) the kernel
  runs per shard in `jax.shard_map`: batch over the 'batch' rule's axes (data,
  fsdp), heads over 'tensor' when it divides both N and K.
  """
  b, t, n, h = q_BTNH.shape
  s, kh = k_BSKH.shape[1], k_BSKH.shape[2]
  if n % kh:
    raise ValueError(f"splash attention needs query heads ({n}) to be a multiple of kv "
                     f"heads ({kh})")
  tp, sp = _round_up(t, SPLASH_LANES), _round_up(s, SPLASH_LANES)
  # The kernel applies no scale: fold 1/sqrt(H) into q. Layout [B, heads, length, H].
  q = _pad_axis(q_BTNH * jnp.asarray(h ** -0.5, q_BTNH.dtype), 1, tp).transpose(0, 2, 1, 3)
  k = _pad_axis(k_BSKH, 1, sp).transpose(0, 2, 1, 3)
  v = _pad_axis(v_BSKH, 1, sp).transpose(0, 2, 1, 3)
  segments = None
  if kv_valid_BS is not None or sp != s:
    valid = jnp.ones((b, s), bool) if kv_valid_BS is None else kv_valid_BS
    segments = (jnp.ones((b, tp), jnp.int32), _pad_axis(valid.astype(jnp.int32), 1, sp))
  run = functools.partial(_splash_local, interpret=interpret)
  out = _shard_heads_and_batch(run, q, k, v, segments)
  return out.transpose(0, 2, 1, 3)[:, :t]


def _splash_local(q_BNTH, k_BKSH, v_BKSH, segments, *, interpret):
  """One shard: the kernel for its heads, vmapped over its examples."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  n, t, _ = q_BNTH.shape[1:]
  s = k_BKSH.shape[2]
  bq, bkv = splash_block(t), splash_block(s)
  blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                         block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                         block_q_dq=bq, block_kv_dq=bkv)
  mask = sa.MultiHeadMask([sa.FullMask((t, s))] * n)
  kernel = sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  if segments is None:
    return jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
  ids = sa.SegmentIds(q=segments[0], kv=segments[1])
  return jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=i))(q_BNTH, k_BKSH, v_BKSH,
                                                                      ids)


def _shard_heads_and_batch(fn, q_BNTH, k_BKSH, v_BKSH, segments):
  """fn per shard under the ambient mesh (none set: called directly)."""
  from lavida_jax import sharding
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(sharding.MESH_AXES) <= set(mesh.axis_names):
    return fn(q_BNTH, k_BKSH, v_BKSH, segments)
  b, n = q_BNTH.shape[:2]
  kh = k_BKSH.shape[1]
  batch = sharding.logical_to_spec(("batch",), (b,), mesh)[0]
  heads = "tensor" if n % mesh.shape["tensor"] == 0 and kh % mesh.shape["tensor"] == 0 else None
  qkv = P(batch, heads, None, None)
  seg = None if segments is None else (P(batch, None), P(batch, None))
  # check_vma=False: the Pallas call carries no varying-axes annotations.
  return jax.shard_map(fn, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                       check_vma=False)(q_BNTH, k_BKSH, v_BKSH, segments)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad_axis(x, axis: int, size: int):
  """Zero-pads x along axis up to size."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


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
    self.head_axes = (q, kv)

  def __call__(self, x_BTD, mask=None, rope=None, prefix_kv=None, groups: int = 1):
    """-> (out [B, T, D], (k, v) [B, T, K, H] of x's own positions, post-RoPE).

    mask: None, key padding [B, S] or [B, T, S] (`dot_product_attention`); with
      prefix_kv, the cached keys' validity [B, P] (own keys are always visible).
    prefix_kv: cached k [B, K, P, H], v [B, K, H, P] of other positions
      (`cached_attention`, as are groups).
    """
    q, k, v = self.q(x_BTD), self.k(x_BTD), self.v(x_BTD)
    q = constrain(q, ("batch", "length", self.head_axes[0], None))
    k = constrain(k, ("batch", "length", self.head_axes[1], None))
    v = constrain(v, ("batch", "length", self.head_axes[1], None))
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if prefix_kv is None:
      if groups != 1:
        raise ValueError("query groups need a prefix cache (cached_attention)")
      out = dot_product_attention(q, k, v, mask, self.implementation)
    else:
      out = cached_attention(q, k, v, prefix_kv[0], prefix_kv[1], mask,
                             per_head=self.implementation == "xla_cpu", groups=groups)
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
    h = constrain(jax.nn.silu(self.gate(x)) * self.up(x), ("batch", "length", "mlp"))
    return self.down(h)


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


def unstack_layers(blocks: nnx.Module) -> nnx.List:
  """Stacked blocks -> a list of per-layer blocks, each with its own arrays (a copy).

  For inference on CPU: `scan_layers` over stacked parameters slices every
  layer's weights out of the stack, and XLA:CPU materialises each slice (a copy
  of all the weights on every forward pass: 26% of a d512 denoising step). With
  per-layer arrays the layers run unrolled and read their weights in place.
  The 'layers' axis is dropped from each parameter's sharding names.
  """
  graphdef, state = nnx.split(blocks)
  n = jax.tree.leaves(state)[0].shape[0]

  def layer(i):
    def take(_, v):
      names = v.get_metadata().get("out_sharding")
      meta = {} if names is None else {"out_sharding": tuple(names)[1:]}
      return v.replace(v.get_value()[i], **meta)
    return nnx.merge(graphdef, nnx.map_state(take, state))

  return nnx.List([layer(i) for i in range(n)])


def scan_layers(blocks: nnx.Module, x, *args, xs=None, remat: str = "none"):
  """Runs x through stacked blocks with one compiled body.

  block(x, *args[, xs_l]) -> (x, y_l): xs (optional) is sliced per layer along
  axis 0, and the y_l are stacked on axis 0. Returns (x, ys).

  A plain `lax.scan` over the split state (not `nnx.scan`), so the blocks can
  be called from inside any JAX transform (the sampler's scan and cond).
  `blocks` may also be a list of per-layer blocks (`unstack_layers`): then the
  layers run unrolled, each on its own arrays (the same function), xs is a
  list of per-layer trees and ys comes back as one (XLA:CPU copies a layer's
  slice out of a stacked array on every pass, as it does the weights').
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; expected one of {list(REMAT_POLICIES)}")
  if isinstance(blocks, (nnx.List, list, tuple)):
    return _unrolled(blocks, x, args, xs, remat)
  graphdef, state = nnx.split(blocks)

  def body(x, layer):
    state_l, xs_l = layer
    block = nnx.merge(graphdef, state_l)
    return block(x, *args) if xs_l is None else block(x, *args, xs_l)

  if remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return jax.lax.scan(body, x, (state, xs))


def _unrolled(blocks, x, args, xs, remat):
  """`scan_layers` over a list of blocks: a Python loop, xs and ys per-layer lists."""
  def call(block, x, xs_l):
    return block(x, *args) if xs_l is None else block(x, *args, xs_l)

  if remat != "none":
    call = jax.checkpoint(call, policy=REMAT_POLICIES[remat], prevent_cse=False)
  ys = []
  for i, block in enumerate(blocks):
    x, y = call(block, x, None if xs is None else xs[i])
    ys.append(y)
  return x, ys
