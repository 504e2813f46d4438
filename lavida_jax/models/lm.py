"""The bidirectional diffusion language model: LLaDA-8B and Dream-7B (SPEC §3.3-3.5).

One transformer parameterised by `LMConfig`: LLaDA is LLaMA-shaped with full
multi-head attention; Dream is Qwen2-shaped (GQA, q/k/v biases) and its logit
at position i predicts token i + 1 (`shifted_logits`). Attention is always
bidirectional; the only mask is an optional key-padding mask, passed down as
`valid` [B, S] (expressible by every attention implementation, splash included).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lavida_jax.models import layers
from lavida_jax.sharding import constrain

LM_AXES = {"embed": "embed", "q_heads": "q_heads", "kv_heads": "kv_heads",
           "head_dim": "head_dim"}


@dataclasses.dataclass(frozen=True)
class LMConfig:
  family: str  # "llada" | "dream"
  vocab_size: int  # LM head width
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float
  norm_eps: float
  qkv_bias: bool
  shifted_logits: bool
  mask_id: int
  eos_id: int
  embed_vocab_size: int | None = None  # input embedding rows, if != vocab_size
  # The context: prompt (text + image tokens) + canvas positions the model was trained
  # for (config.json max_sequence_length / max_position_embeddings); None: no limit.
  max_length: int | None = None
  remat: str = "none"
  attention_impl: str | None = None

  @property
  def n_embed(self) -> int:
    return self.embed_vocab_size or self.vocab_size

  @classmethod
  def llada_8b(cls, **kw) -> "LMConfig":
    return cls(**{**dict(family="llada", vocab_size=126464, d_model=4096, n_layers=32,
                         n_heads=32, n_kv_heads=32, head_dim=128, mlp_dim=12288,
                         rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
                         shifted_logits=False, mask_id=126336, eos_id=126081,
                         max_length=4096), **kw})

  @classmethod
  def dream_7b(cls, **kw) -> "LMConfig":
    return cls(**{**dict(family="dream", vocab_size=152064, d_model=3584, n_layers=28,
                         n_heads=28, n_kv_heads=4, head_dim=128, mlp_dim=18944,
                         rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
                         shifted_logits=True, mask_id=151666, eos_id=151643,
                         max_length=131072), **kw})

  @classmethod
  def tiny_llada(cls, **kw) -> "LMConfig":
    """LLaDA structure (MHA, no biases), tiny sizes; ids fit the tiny vocab."""
    return cls.llada_8b(**{**dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                  n_kv_heads=4, head_dim=16, mlp_dim=128, mask_id=255,
                                  eos_id=254), **kw})

  @classmethod
  def tiny_dream(cls, **kw) -> "LMConfig":
    """Dream structure (GQA 7:1 like 28/4, q/k/v biases), tiny sizes."""
    return cls.dream_7b(**{**dict(vocab_size=256, d_model=112, n_layers=2, n_heads=7,
                                  n_kv_heads=1, head_dim=16, mlp_dim=128, mask_id=255,
                                  eos_id=254), **kw})


class Block(nnx.Module):
  def __init__(self, cfg: LMConfig, *, rngs, param_dtype, dtype):
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.attn_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps, "embed", **kw)
    self.attn = layers.Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                 qkv_bias=cfg.qkv_bias, out_bias=False, axes=LM_AXES,
                                 dtype=dtype, implementation=cfg.attention_impl, **kw)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps, "embed", **kw)
    self.mlp = layers.GatedMLP(cfg.d_model, cfg.mlp_dim, dtype=dtype, **kw)

  def __call__(self, x_BTD, mask, rope, collect_kv=False, groups=1, prefix_kv=None):
    x_BTD = constrain(x_BTD, ("batch", "length", None))
    h, kv = self.attn(self.attn_norm(x_BTD), mask, rope, prefix_kv, groups)
    x_BTD = x_BTD + h
    return x_BTD + self.mlp(self.mlp_norm(x_BTD)), (kv if collect_kv else None)


class KVCache(NamedTuple):
  """Cached keys/values of every layer (post-RoPE) for decoding (SPEC §7.3, §14).

  k: [layers, B, K, S, H], v: [layers, B, K, H, S]: the layouts that
  `layers.cached_attention` reads in place; with layers run unrolled
  (`layers.unstack_layers`) each is a tuple of per-layer arrays instead, so no
  step slices a layer out of a stack (and at batch 1 on CPUs the Generator splits
  each layer's by head: `layers.split_heads`). S = P, the prompt's positions
  (Prefix-DLM), or the prompt's followed by the canvas's (the dual cache,
  S = P + L); valid: [B, S] keys that may be attended (not padding); length: [B]
  real prompt tokens (the canvas starts at this position).
  """
  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  valid: jax.Array
  length: jax.Array

  def layers(self):
    """`scan_layers`' xs: (k, v) stacked, or a list of per-layer (k, v)."""
    return list(zip(self.k, self.v)) if isinstance(self.k, tuple) else (self.k, self.v)

  def extend(self, k, v, valid_BT):
    """The cache followed by T more positions (k, v as `collect_kv` returns them)."""
    cat = lambda axis: lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=axis)
    return KVCache(jax.tree.map(cat(-2), self.k, k), jax.tree.map(cat(-1), self.v, v),
                   jnp.concatenate([self.valid, valid_BT], axis=1), self.length)

  @staticmethod
  def batch_axes(cache: "KVCache") -> "KVCache":
    """The batch axis of every leaf (1 in a stacked k/v, else 0)."""
    axis = lambda a: a.ndim - 4
    return KVCache(jax.tree.map(axis, cache.k), jax.tree.map(axis, cache.v), 0, 0)


def cache_layout(ys):
  """`scan_layers`' per-layer (k, v) [B, T, K, H] (stacked, or a list per layer) ->
  (k [..., B, K, T, H], v [..., B, K, H, T]): once per cache fill."""
  if isinstance(ys, list):
    return tuple(tuple(a) for a in zip(*(cache_layout(y) for y in ys)))
  k, v = ys
  return jnp.swapaxes(k, -3, -2), jnp.moveaxis(v, -3, -1)


class DiffusionLM(nnx.Module):
  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               dtype=jnp.float32):
    self.cfg, self.dtype = cfg, dtype
    self.embed = layers.param(rngs, layers.normal(0.02), (cfg.n_embed, cfg.d_model),
                              ("vocab", "embed"), param_dtype)
    self.blocks = layers.stack_layers(
        lambda r: Block(cfg, rngs=r, param_dtype=param_dtype, dtype=dtype),
        cfg.n_layers, rngs)
    self.final_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps, "embed", rngs=rngs,
                                     param_dtype=param_dtype)
    self.head = layers.Linear((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"),
                              bias=False, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

  def embed_tokens(self, ids_BT):
    """ids: [B, T] int -> [B, T, D]."""
    return self.embed[...].astype(self.dtype)[ids_BT]

  def hidden(self, x_BTD, valid_BT=None, positions_BT=None, mask_BTS=None):
    """Embeddings -> final-normed hidden states [B, T, D].

    valid_BT: bool key-padding mask (None: every position is a key).
    positions_BT: RoPE positions (default 0..T-1).
    mask_BTS: a full attention mask instead (e.g. Prefix-DLM's); overrides valid_BT
      (the splash kernel cannot express it: such calls run on XLA's attention).
    """
    h, _ = self._blocks(x_BTD, positions_BT, valid_BT if mask_BTS is None else mask_BTS)
    return self.final_norm(h)

  def prefill(self, x_BPD, valid_BP=None) -> tuple[KVCache, jax.Array]:
    """Runs the prefix alone (it never sees the canvas) and keeps every layer's K/V.

    Returns (cache, hidden [B, P, D]); the hidden states give Dream's first canvas
    logit (from the prompt's last position) without another pass.
    """
    b, p, _ = x_BPD.shape
    valid = jnp.ones((b, p), bool) if valid_BP is None else valid_BP
    # Real tokens take positions 0..n-1 even when the bucket pads the prefix.
    positions = jnp.cumsum(valid, axis=1) - 1
    h, kv = self._blocks(x_BPD, positions, valid, collect_kv=True)
    return KVCache(*cache_layout(kv), valid, valid.sum(axis=1)), self.final_norm(h)

  def canvas_rope(self, cache: KVCache, length: int):
    """(cos, sin) [B, length, H/2] of the canvas positions after the cached prompt,
    for `hidden_with_cache(rope=...)`: computed once per call, not every step."""
    positions = cache.length[:, None] + jnp.arange(length)[None, :]
    return layers.rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)

  def hidden_with_cache(self, x_BTD, cache: KVCache, start_B=None, collect_kv=False,
                        rope=None, groups: int = 1):
    """Canvas embeddings -> hidden [B, T, D], attending to the cache and to themselves.

    x_BTD: the canvas positions start..start+T-1 (start_B [B], default 0), i.e.
    positions length+start.. after the real prefix tokens. They see every cache
    key where `cache.valid` and every one of their own keys; the cache is read,
    never updated. Prefix-DLM passes the whole canvas over the prefix cache; the
    dual cache (SPEC §14) passes a block over prefix + canvas keys, its own
    window marked invalid. collect_kv: also return their (k, v) in the cache's
    layout (`KVCache.extend` appends them). rope: these positions' (cos, sin)
    [B, T, H/2] (`canvas_rope`), else computed here. groups: x holds that many
    canvases of T / groups positions side by side, each over the same cache and
    positions, none seeing another (the fixed decoder's lookahead).
    """
    b, t, _ = x_BTD.shape
    start = jnp.zeros((b,), jnp.int32) if start_B is None else start_B
    offsets = jnp.tile(jnp.arange(t // groups), groups)
    positions = (cache.length + start)[:, None] + offsets[None, :]
    h, kv = self._blocks(x_BTD, positions, cache.valid, collect_kv,
                         prefix_kv=cache.layers(), rope=rope, groups=groups)
    return (self.final_norm(h), cache_layout(kv)) if collect_kv else self.final_norm(h)

  def _blocks(self, x_BTD, positions_BT, mask, collect_kv=False, prefix_kv=None,
              rope=None, groups=1):
    """mask: None, key padding [B, S] or [B, T, S] (`layers.dot_product_attention`);
    with prefix_kv, the cached keys' validity [B, P] (`layers.cached_attention`)."""
    b, t, _ = x_BTD.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
    if rope is None:
      rope = layers.rope_angles(positions_BT, self.cfg.head_dim, self.cfg.rope_theta)
    x_BTD = constrain(x_BTD.astype(self.dtype), ("batch", "length", None))
    return layers.scan_layers(self.blocks, x_BTD, mask, rope,
                              collect_kv, groups, xs=prefix_kv, remat=self.cfg.remat)

  def logits_from_hidden(self, h_BTD):
    return self.head(h_BTD)

  def __call__(self, ids_BT, valid_BT=None):
    """ids: [B, T] -> logits [B, T, V] (bidirectional)."""
    return self.logits_from_hidden(self.hidden(self.embed_tokens(ids_BT), valid_BT))
