"""One example -> fixed-length arrays with the image tokens laid out (host side).

The `<image>` marker (-200) in the token ids is expanded into one -200 per image
token, and each image-token position records which rows of the example's
feature table [V_max*s*s pooled view features, image_newline] it is made of
(`connector.token_sources`). The device then splices with one gather
(`LaViDa.embed_packed`): static shapes, whatever the image's aspect ratio.
"""
from __future__ import annotations

import numpy as np

from lavida_jax.models import connector
from lavida_jax.models.lavida import IMAGE_TOKEN_ID, LaViDaConfig, image_layout
from lavida_jax.text import IGNORE_ID


def table_size(cfg: LaViDaConfig, max_views: int) -> int:
  """Rows of an example's feature table: the pooled views, then the newline."""
  side = cfg.connector.pooled_side(cfg.vision.grid)
  return max_views * side * side + 1


def pack_example(input_ids, labels, image_size, cfg: LaViDaConfig, length: int,
                 pad_id: int, max_views: int) -> dict[str, np.ndarray]:
  """-> input_ids/labels [length] int32, image_index [length, 4] int32,
  image_weight [length, 4] float32.

  input_ids hold at most one -200 marker (LLaVA data: one image per example);
  image_size is its (W, H), or None for a text-only example. Image positions
  are ignored by the loss; padding is `pad_id` (EOS) and *is* a label (SPEC §5).
  Raises ValueError when the expanded example is longer than `length`.
  """
  ids, labs = np.asarray(input_ids, np.int64), np.asarray(labels, np.int64)
  if ids.shape != labs.shape or ids.ndim != 1:
    raise ValueError(f"input_ids {ids.shape} and labels {labs.shape} must be equal 1-D shapes")
  markers = np.flatnonzero(ids == IMAGE_TOKEN_ID)
  if len(markers) > 1:
    raise ValueError(f"an example may hold one <image>, this one has {len(markers)}")
  if (len(markers) == 1) != (image_size is not None):
    raise ValueError("an example's <image> marker and its image must come together "
                     f"(markers: {len(markers)}, image: {image_size is not None})")
  index = np.zeros((len(ids), 4), np.int32)
  weight = np.zeros((len(ids), 4), np.float32)
  if image_size is not None:
    layout = image_layout(cfg, image_size)
    index, weight = connector.token_sources(layout, table_size(cfg, max_views) - 1)
    n, at = len(index), markers[0]
    ids = np.concatenate([ids[:at], np.full(n, IMAGE_TOKEN_ID), ids[at + 1:]])
    labs = np.concatenate([labs[:at], np.full(n, IGNORE_ID), labs[at + 1:]])
    index = np.pad(index, ((at, len(ids) - at - n), (0, 0)))
    weight = np.pad(weight, ((at, len(ids) - at - n), (0, 0)))
  if len(ids) > length:
    raise ValueError(f"example of {len(ids)} tokens (images expanded) exceeds length {length}")
  pad = length - len(ids)
  return dict(
      input_ids=np.concatenate([ids, np.full(pad, pad_id)]).astype(np.int32),
      labels=np.concatenate([labs, np.full(pad, pad_id)]).astype(np.int32),
      image_index=np.pad(index, ((0, pad), (0, 0))).astype(np.int32),
      image_weight=np.pad(weight, ((0, pad), (0, 0))).astype(np.float32),
  )
