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
  n, at, rest = 0, len(ids), len(ids)  # image tokens; marker position; text after it
  if image_size is not None:
    index, weight = connector.token_sources(image_layout(cfg, image_size),
                                            table_size(cfg, max_views) - 1)
    n, at, rest = len(index), int(markers[0]), int(markers[0]) + 1
  total = at + n + len(ids) - rest
  if total > length:
    raise ValueError(f"example of {total} tokens (images expanded) exceeds length {length}")
  # Written into preallocated [length] arrays: the host pipeline packs every example.
  out_ids = np.full(length, pad_id, np.int32)
  out_labels = np.full(length, pad_id, np.int32)
  out_index = np.zeros((length, 4), np.int32)
  out_weight = np.zeros((length, 4), np.float32)
  out_ids[:at], out_labels[:at] = ids[:at], labs[:at]
  out_ids[at + n:total], out_labels[at + n:total] = ids[rest:], labs[rest:]
  if n:
    out_ids[at:at + n], out_labels[at:at + n] = IMAGE_TOKEN_ID, IGNORE_ID
    out_index[at:at + n], out_weight[at:at + n] = index, weight
  return dict(input_ids=out_ids, labels=out_labels, image_index=out_index,
              image_weight=out_weight)
