"""SigLIP vision tower as LaViDa uses it (SPEC §3.1).

The last encoder layer of SigLIP-so400m is deleted (26 of 27 remain) and the
output is the last remaining layer's hidden state *before* post_layernorm.
post_layernorm is kept as a parameter so that export is lossless.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from lavida_jax.models import layers
from lavida_jax.sharding import constrain

VISION_AXES = {"embed": "vision_embed", "q_heads": "vision_heads",
               "kv_heads": "vision_heads", "head_dim": "head_dim"}


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  image_size: int = 384
  patch_size: int = 14
  width: int = 1152
  depth: int = 26  # layers present (LaViDa drops the 27th)
  mlp_dim: int = 4304
  num_heads: int = 16
  eps: float = 1e-6
  remat: str = "none"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size  # 27: 378 of 384 pixels are seen

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @classmethod
  def so400m(cls) -> "SiglipConfig":
    return cls()

  @classmethod
  def tiny(cls) -> "SiglipConfig":
    """Real 384/14 geometry (27x27 grid), tiny width and depth."""
    return cls(width=32, depth=2, mlp_dim=64, num_heads=2)


class EncoderBlock(nnx.Module):
  def __init__(self, cfg: SiglipConfig, *, rngs, param_dtype, dtype, attention_impl=None):
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.norm1 = layers.LayerNorm(cfg.width, cfg.eps, "vision_embed", **kw)
    self.attn = layers.Attention(cfg.width, cfg.num_heads, cfg.num_heads,
                                 cfg.width // cfg.num_heads, qkv_bias=True, out_bias=True,
                                 axes=VISION_AXES, dtype=dtype,
                                 implementation=attention_impl, **kw)
    self.norm2 = layers.LayerNorm(cfg.width, cfg.eps, "vision_embed", **kw)
    self.mlp = layers.MLP(cfg.width, cfg.mlp_dim, cfg.width, layers.gelu_tanh,
                          ("vision_embed", "vision_mlp", "vision_embed"), dtype=dtype, **kw)

  def __call__(self, x_BTD):
    x_BTD = constrain(x_BTD, ("batch", None, None))
    x_BTD = x_BTD + self.attn(self.norm1(x_BTD))[0]
    return x_BTD + self.mlp(self.norm2(x_BTD)), None


class SiglipVisionTower(nnx.Module):
  def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               dtype=jnp.float32, attention_impl=None):
    self.cfg, self.dtype = cfg, dtype
    p, w = cfg.patch_size, cfg.width
    # Conv2d(3, W, 14, stride 14) as a linear map over flattened [kh, kw, C] patches.
    self.patch = layers.Linear((p, p, 3), (w,), (None, None, None, "vision_embed"),
                               bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    # std 1/sqrt(W) as in HF's SiglipPreTrainedModel._init_weights (released weights
    # overwrite it; trained from scratch, positions start on the patches' scale).
    self.pos_embed = layers.param(rngs, layers.normal(w ** -0.5), (cfg.num_patches, w),
                                  ("vision_patches", "vision_embed"), param_dtype)
    self.blocks = layers.stack_layers(
        lambda r: EncoderBlock(cfg, rngs=r, param_dtype=param_dtype, dtype=dtype,
                               attention_impl=attention_impl), cfg.depth, rngs)
    self.post_norm = layers.LayerNorm(w, cfg.eps, "vision_embed", rngs=rngs,
                                      param_dtype=param_dtype)  # unused (SPEC §3.1)

  def __call__(self, pixels_NHWC):
    """pixels: [N, 384, 384, 3] in [-1, 1] -> features [N, 729, W] (pre post-norm)."""
    n, h, w, c = pixels_NHWC.shape
    cfg = self.cfg
    if (h, w, c) != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"pixel_values must be [N, {cfg.image_size}, {cfg.image_size}, 3], "
                       f"got {pixels_NHWC.shape}")
    g, p = cfg.grid, cfg.patch_size
    # The stride-14 conv without padding ignores the last 384 - 27*14 = 6 rows/cols.
    x = constrain(pixels_NHWC[:, :g * p, :g * p, :].astype(self.dtype),
                  ("batch", None, None, None))
    x = x.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, p, p, 3)
    x = self.patch(x) + self.pos_embed[...].astype(self.dtype)
    return layers.scan_layers(self.blocks, x, remat=cfg.remat)[0]
