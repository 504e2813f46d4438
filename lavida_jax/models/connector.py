"""Vision features -> LM image tokens (SPEC §3.2, §3.5).

Per view: project (MLP, exact GELU) then pool the 27x27 grid (LaViDa: bilinear
to 14x14). Per image (anyres): the global view's tokens first, then the crops
stitched into one canvas, padding rows/cols removed (`spatial_unpad`), a
learned `image_newline` appended to every canvas row, flattened row-major.

The layout depends only on host-known integers (image size, crop grid), so it
is computed on the host as gather indices (`anyres_layout`) and applied on the
device with one `take` — static shapes, no data-dependent slicing.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
  vision_dim: int = 1152
  lm_dim: int = 4096
  pool_mode: str | None = "bilinear"  # "bilinear" | "average" | None (no pooling)
  pool_size: int = 14  # side after bilinear pooling
  pool_stride: int = 2  # kernel/stride of average pooling
  anyres: bool = True  # False: stage-1 single view, no newline
  max_tiles: int | None = None  # anyres_max_N (LLaDA-V): downsample bigger canvases

  def pooled_side(self, grid: int) -> int:
    if self.pool_mode is None:
      return grid
    if self.pool_mode == "bilinear":
      return self.pool_size
    if self.pool_mode == "average":
      return grid // self.pool_stride
    raise ValueError(f"unknown mm_spatial_pool_mode {self.pool_mode!r}; "
                     "expected 'bilinear', 'average' or None")


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch bilinear resize, align_corners=False, no antialias."""
  scale = n_in / n_out
  src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  w = np.zeros((n_out, n_in), np.float64)
  np.add.at(w, (np.arange(n_out), i0), 1.0 - frac)
  np.add.at(w, (np.arange(n_out), i1), frac)
  return w.astype(np.float32)


def resize_bilinear(x_HWD, out_h: int, out_w: int):
  """PyTorch-semantics bilinear resize of a [h, w, D] grid (separable matmuls)."""
  wh = jnp.asarray(bilinear_matrix(x_HWD.shape[0], out_h))
  ww = jnp.asarray(bilinear_matrix(x_HWD.shape[1], out_w))
  return jnp.einsum("ph,hwd,qw->pqd", wh, x_HWD.astype(jnp.float32), ww).astype(x_HWD.dtype)


def pool(x_VPD, cfg: ConnectorConfig):
  """[V, g*g, D] -> [V, s*s, D] with s = cfg.pooled_side(g)."""
  v, p, d = x_VPD.shape
  g = math.isqrt(p)
  if cfg.pool_mode is None:
    return x_VPD
  grid = x_VPD.reshape(v, g, g, d)
  if cfg.pool_mode == "bilinear":
    w = jnp.asarray(bilinear_matrix(g, cfg.pool_size))
    out = jnp.einsum("ph,vhwd,qw->vpqd", w, grid.astype(jnp.float32), w).astype(x_VPD.dtype)
  else:  # average: non-overlapping k x k windows, remainder dropped (avg_pool2d)
    k = cfg.pool_stride
    s = g // k
    out = grid[:, :s * k, :s * k].reshape(v, s, k, s, k, d).mean(axis=(2, 4))
  s = cfg.pooled_side(g)
  return out.reshape(v, s * s, d)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each image token comes from, for one image.

  base: [s*s] indices of the global view's tokens into the flat [V*s*s] features.
  canvas: [h, w] indices of the unpadded crop canvas (None in single-view mode).
  out_hw: canvas size after anyres_max downsampling (== (h, w) when none).
  """
  base: np.ndarray
  canvas: np.ndarray | None
  out_hw: tuple[int, int] | None

  @property
  def num_tokens(self) -> int:
    if self.canvas is None:
      return len(self.base)
    h, w = self.out_hw
    return len(self.base) + h * (w + 1)


def unpad_bounds(image_size: tuple[int, int], h: int, w: int) -> tuple[slice, slice]:
  """Rows/cols of an [h, w] canvas that hold the image, not the black padding.

  image_size is (W, H) of the original. Matches LLaVA-NeXT's `unpad_image`,
  including `int()` truncation and the symmetric `padding:size - padding` slice.
  """
  orig_w, orig_h = image_size
  if orig_w / orig_h > w / h:
    new_h = int(orig_h * (w / orig_w))
    pad = (h - new_h) // 2
    return slice(pad, h - pad), slice(0, w)
  new_w = int(orig_w * (h / orig_h))
  pad = (w - new_w) // 2
  return slice(0, h), slice(pad, w - pad)


def anyres_layout(image_size: tuple[int, int], grid_rc: tuple[int, int], side: int,
                  cfg: ConnectorConfig) -> Layout:
  """Token layout of one image with a (rows, cols) crop grid and s x s tokens per view."""
  base = np.arange(side * side)
  if not cfg.anyres:
    return Layout(base, None, None)
  rows, cols = grid_rc
  if rows < 1 or cols < 1:
    raise ValueError(f"anyres needs a crop grid of at least 1x1, got {grid_rc}")
  r = np.arange(rows * side)[:, None]
  c = np.arange(cols * side)[None, :]
  view = 1 + (r // side) * cols + (c // side)  # view 0 is the global view
  canvas = view * side * side + (r % side) * side + (c % side)
  rs, cs = unpad_bounds(image_size, rows * side, cols * side)
  canvas = canvas[rs, cs]
  h, w = canvas.shape
  out_hw = (h, w)
  if cfg.max_tiles is not None:
    times = math.sqrt(h * w / (cfg.max_tiles * side * side))
    if times > 1.1:  # LLaVA-OneVision anyres_max: shrink canvases above ~max_tiles crops
      out_hw = (int(h // times), int(w // times))
  return Layout(base, canvas, out_hw)


def assemble(feats_VPD, newline_D, layout: Layout):
  """Pooled, projected view features [V, s*s, D] -> image tokens [n_tokens, D]."""
  d = feats_VPD.shape[-1]
  flat = feats_VPD.reshape(-1, d)
  base = jnp.take(flat, jnp.asarray(layout.base), axis=0)
  if layout.canvas is None:
    return base
  canvas = jnp.take(flat, jnp.asarray(layout.canvas), axis=0)  # [h, w, D]
  if layout.out_hw != canvas.shape[:2]:
    canvas = resize_bilinear(canvas, *layout.out_hw)
  h = canvas.shape[0]
  newline = jnp.broadcast_to(newline_D.astype(canvas.dtype), (h, 1, d))
  canvas = jnp.concatenate([canvas, newline], axis=1).reshape(-1, d)
  return jnp.concatenate([base, canvas], axis=0)


def token_sources(layout: Layout, newline_index: int) -> tuple[np.ndarray, np.ndarray]:
  """Each image token as a weighted sum of at most 4 table rows (static-shape form).

  The table is the flat [V*s*s] pooled view features followed by the newline
  at `newline_index`. A plain gather has weights (1, 0, 0, 0); anyres_max
  downsampling is bilinear, so each output mixes a 2x2 neighbourhood.
  Returns (index [n_tokens, 4] int32, weight [n_tokens, 4] float32).
  """
  rows = [(np.stack([layout.base, *[np.zeros_like(layout.base)] * 3], -1),
           np.eye(4, dtype=np.float32)[np.zeros(len(layout.base), int)])]
  if layout.canvas is not None:
    h, w = layout.canvas.shape
    oh, ow = layout.out_hw
    wh, ww = bilinear_matrix(h, oh), bilinear_matrix(w, ow)
    idx = np.zeros((oh, ow + 1, 4), np.int64)
    wgt = np.zeros((oh, ow + 1, 4), np.float32)
    for p in range(oh):
      hs = np.flatnonzero(wh[p])
      for q in range(ow):
        ws = np.flatnonzero(ww[q])
        pairs = [(a, b) for a in hs for b in ws]
        idx[p, q, :len(pairs)] = [layout.canvas[a, b] for a, b in pairs]
        wgt[p, q, :len(pairs)] = [wh[p, a] * ww[q, b] for a, b in pairs]
    idx[:, ow, 0], wgt[:, ow, 0] = newline_index, 1.0
    rows.append((idx.reshape(-1, 4), wgt.reshape(-1, 4)))
  index = np.concatenate([r[0] for r in rows]).astype(np.int32)
  weight = np.concatenate([r[1] for r in rows]).astype(np.float32)
  return index, weight
