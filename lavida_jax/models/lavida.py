"""LaViDa / LLaDA-V: vision tower + connector + diffusion LM (SPEC §3).

Pixels [V, 384, 384, 3] -> `vision_features` [V, 729, Dv] -> projector, pool
[V, s*s, H] -> anyres layout + newline -> `image_tokens` [n, H] -> spliced
into the prompt at each `<image>` (id -200) -> LM -> logits [B, T', V].
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lavida_jax import image as image_lib
from lavida_jax.models import connector, layers
from lavida_jax.models.lm import DiffusionLM, LMConfig
from lavida_jax.models.siglip import SiglipConfig, SiglipVisionTower
from lavida_jax.sharding import constrain

IMAGE_TOKEN_ID = -200
FAMILIES = ("lavida-llada", "lavida-dream", "llada-v")


@dataclasses.dataclass(frozen=True)
class LaViDaConfig:
  family: str
  vision: SiglipConfig
  connector: connector.ConnectorConfig
  lm: LMConfig
  image: image_lib.ImageConfig
  # Reproduce the PyTorch reference's quirks (SPEC §13): attend to zero padding.
  reference_compat: bool = False

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")

  @classmethod
  def create(cls, family: str, size: str = "full", image_size: int = 384,
             **kw) -> "LaViDaConfig":
    """Named setups: family in FAMILIES, size 'full' (released sizes) or 'tiny'.

    image_size != 384 scales the view size, the pinpoints and the pooled grid
    together (patch 14 kept): small CPU demos and fast tests.
    """
    if family not in FAMILIES:
      raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if size not in ("full", "tiny"):
      raise ValueError(f"unknown size {size!r}; expected 'full' or 'tiny'")
    tiny = size == "tiny"
    vision = SiglipConfig.tiny() if tiny else SiglipConfig.so400m()
    vision = dataclasses.replace(vision, image_size=image_size)
    if family == "lavida-dream":
      lm = LMConfig.tiny_dream() if tiny else LMConfig.dream_7b()
    else:
      lm = LMConfig.tiny_llada() if tiny else LMConfig.llada_8b()
    if family == "llada-v":
      conn = connector.ConnectorConfig(vision.width, lm.d_model, pool_mode=None, max_tiles=4)
      img = image_lib.ImageConfig.llada_v()
    else:
      conn = connector.ConnectorConfig(vision.width, lm.d_model, pool_mode="bilinear",
                                       pool_size=math.ceil(vision.grid / 2))
      img = image_lib.ImageConfig.lavida()
    scale = lambda p: tuple((w * image_size // img.size, h * image_size // img.size)
                            for w, h in p)
    img = dataclasses.replace(img, size=image_size, pinpoints=scale(img.pinpoints))
    return cls(family=family, vision=vision, connector=conn, lm=lm, image=img, **kw)


class LaViDa(nnx.Module):
  def __init__(self, cfg: LaViDaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               dtype=jnp.float32):
    self.cfg = cfg
    self.vision = SiglipVisionTower(cfg.vision, rngs=rngs, param_dtype=param_dtype,
                                    dtype=dtype, attention_impl=cfg.lm.attention_impl)
    c = cfg.connector
    self.projector = layers.MLP(c.vision_dim, c.lm_dim, c.lm_dim, layers.gelu_exact,
                                ("vision_embed", "mlp", "embed"), rngs=rngs,
                                param_dtype=param_dtype, dtype=dtype)
    self.image_newline = layers.param(rngs, layers.normal(c.lm_dim ** -0.5), (c.lm_dim,),
                                      ("embed",), param_dtype)
    self.lm = DiffusionLM(cfg.lm, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

  # --- public API (SPEC / README) -------------------------------------------------

  def vision_features(self, pixel_values):
    """[N, 384, 384, 3] in [-1, 1] -> [N, 729, Dv], before post_layernorm."""
    return _vision_features(self, jnp.asarray(pixel_values))

  def image_tokens(self, pixel_values, image_size):
    """One image, all its views [V, 384, 384, 3] -> image tokens [n_tokens, H]."""
    layout = self.layout(pixel_values, image_size)
    canvas = None if layout.canvas is None else jnp.asarray(layout.canvas)
    return _image_tokens(self, jnp.asarray(pixel_values), jnp.asarray(layout.base), canvas,
                         layout.out_hw)

  def text_logits(self, input_ids, valid=None):
    """[B, T] token ids -> [B, T, V], the LM alone, bidirectional."""
    return _lm_logits(self.lm, self.lm.embed_tokens(jnp.asarray(input_ids)),
                      None if valid is None else jnp.asarray(valid))

  def logits(self, input_ids, images):
    """Multimodal logits [B, T', V]; `input_ids` [B, T] hold -200 where images go.

    images: list of (pixel_values [V, 384, 384, 3], image_size (W, H)), one per
    `<image>` marker in row-major order. Rows are right-padded to the longest
    spliced row; padding is masked out of attention (unless reference_compat).
    """
    x, valid = self.embed_multimodal(input_ids, images)
    return _lm_logits(self.lm, x, None if self.cfg.reference_compat else valid)

  # --- pieces ----------------------------------------------------------------------

  def layout(self, pixel_values, image_size) -> connector.Layout:
    """Host-side token layout for one image; checks views against the image size."""
    if np.ndim(pixel_values) != 4:
      raise ValueError("pixel_values of one image must be [V, H, W, 3] with all its views, "
                       f"got shape {np.shape(pixel_values)}")
    return image_layout(self.cfg, image_size, len(pixel_values))

  def project(self, feats_VPD):
    """Projector then pooling (the reference's order): [V, 729, Dv] -> [V, s*s, H]."""
    return connector.pool(self.projector(feats_VPD), self.cfg.connector)

  def embed_packed(self, input_ids_BT, pixels_BVHWC, image_index_BTK, image_weight_BTK):
    """Static-shape splice (training, batched serving) -> x [B, T, H].

    input_ids hold -200 at every image-token position (already expanded); for
    those positions image_index/weight [B, T, 4] pick rows of the example's
    table [V*s*s pooled view features, image_newline] (`data/packing.py`).
    Padded views are encoded but never indexed.
    """
    b, v = pixels_BVHWC.shape[:2]
    feats = self.project(self.vision(pixels_BVHWC.reshape(b * v, *pixels_BVHWC.shape[2:])))
    feats = constrain(feats.reshape(b, -1, feats.shape[-1]), ("batch", None, None))
    newline = jnp.broadcast_to(self.image_newline[...].astype(feats.dtype), (b, 1, feats.shape[-1]))
    table = jnp.concatenate([feats, newline], axis=1)
    t, k = image_index_BTK.shape[1:]
    rows = jnp.take_along_axis(table, image_index_BTK.reshape(b, t * k, 1), axis=1)
    image = jnp.einsum("btk,btkd->btd", image_weight_BTK.astype(feats.dtype),
                       rows.reshape(b, t, k, -1))
    text = constrain(self.lm.embed_tokens(jnp.where(input_ids_BT < 0, 0, input_ids_BT)),
                     ("batch", "length", None))
    return jnp.where((input_ids_BT == IMAGE_TOKEN_ID)[..., None], image.astype(text.dtype), text)

  def embed_multimodal(self, input_ids, images):
    """Splice image tokens into the embedded prompt -> (x [B, T', H], valid [B, T'])."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    markers = int((ids == IMAGE_TOKEN_ID).sum())
    if markers != len(images):
      raise ValueError(f"the prompt has {markers} <image> marker(s) but {len(images)} "
                       "image(s) were given; pass one (pixel_values, image_size) per marker")
    if ((ids < 0) & (ids != IMAGE_TOKEN_ID)).any() or (ids >= self.cfg.lm.n_embed).any():
      raise ValueError(f"input_ids must be in [0, {self.cfg.lm.n_embed}) or {IMAGE_TOKEN_ID}")
    tokens = [self.image_tokens(pv, size) for pv, size in images]
    text = self.lm.embed_tokens(jnp.asarray(np.where(ids < 0, 0, ids)))
    rows, it = [], iter(tokens)
    for b in range(ids.shape[0]):
      pieces, start = [], 0
      for pos in np.flatnonzero(ids[b] == IMAGE_TOKEN_ID):
        pieces += [text[b, start:pos], next(it).astype(text.dtype)]
        start = pos + 1
      pieces.append(text[b, start:])
      rows.append(jnp.concatenate(pieces, axis=0))
    length = max(r.shape[0] for r in rows)
    valid = np.zeros((len(rows), length), bool)
    for b, r in enumerate(rows):
      valid[b, :r.shape[0]] = True
    x = jnp.stack([jnp.pad(r, ((0, length - r.shape[0]), (0, 0))) for r in rows])
    return x, jnp.asarray(valid)


def image_layout(cfg: LaViDaConfig, image_size, n_views: int | None = None) -> connector.Layout:
  """Token layout of one image of size (W, H); n_views, if given, is checked."""
  w, h = image_size
  if w < 1 or h < 1:
    raise ValueError(f"image_size must be (width, height) >= 1, got {image_size}")
  grid = image_lib.grid_shape(tuple(image_size), cfg.image)
  expected = 1 + grid[0] * grid[1] if cfg.connector.anyres else 1
  if n_views is not None and n_views != expected:
    raise ValueError(f"an image of size {tuple(image_size)} needs {expected} views "
                     f"(global + {grid[0]}x{grid[1]} crops), got {n_views}")
  side = cfg.connector.pooled_side(cfg.vision.grid)
  return connector.anyres_layout(tuple(image_size), grid, side, cfg.connector)


@nnx.jit
def _vision_features(model: LaViDa, pixel_values):
  return model.vision(pixel_values)


@functools.partial(nnx.jit, static_argnums=(4,))
def _image_tokens(model: LaViDa, pixel_values, base, canvas, out_hw):
  feats = model.project(model.vision(pixel_values))
  layout = connector.Layout(base, canvas, out_hw)
  return connector.assemble(feats, model.image_newline[...], layout)


@nnx.jit
def _lm_logits(lm: DiffusionLM, x, valid):
  return lm.logits_from_hidden(lm.hidden(x, valid))


def param_count(cfg: LaViDaConfig) -> int:
  """Parameters of a model, from shapes only (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: LaViDa(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
