"""Images from chat messages: base64 data URLs, or local files inside one folder.

The server never fetches http(s) URLs (a server that does is an SSRF hole and
blocks its workers on the network), and reads a local path only inside
`--allow_media_dir` (symlinks resolved first). Encoded size and pixel count are
capped before decoding (`image.load_image` refuses a decompression bomb from
its header).
"""
from __future__ import annotations

import base64
import binascii
import os
import urllib.parse

from PIL import Image

from lavida_jax import image as image_lib


class MediaError(ValueError):
  """The client's image is refused or unreadable: answer 400 with this message."""


def load(url: str, *, max_bytes: int, max_pixels: int,
         media_dir: str | None = None) -> Image.Image:
  """An `image_url.url` -> an RGB PIL image, or MediaError naming the problem."""
  if url.startswith("data:"):
    data = _data_url(url, max_bytes)
  elif url.startswith(("http://", "https://")):
    raise MediaError("image URLs over http(s) are not fetched by this server; send the "
                     "image inline as a data:image/...;base64 URL")
  else:
    data = _local(url, max_bytes, media_dir)
  try:
    return image_lib.load_image(data, max_pixels=max_pixels)
  except image_lib.ImageError as e:
    raise MediaError(f"image: {e}") from None


def _data_url(url: str, max_bytes: int) -> bytes:
  head, sep, payload = url.partition(",")
  if not sep or ";base64" not in head:
    raise MediaError("image data URL must look like data:image/png;base64,<base64 bytes>")
  if len(payload) * 3 // 4 > max_bytes:
    raise MediaError(f"image of ~{len(payload) * 3 // 4} bytes exceeds the server's limit "
                     f"of {max_bytes} bytes")
  try:
    return base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError):
    raise MediaError("image data URL: the payload is not valid base64") from None


def _local(url: str, max_bytes: int, media_dir: str | None) -> bytes:
  path = urllib.parse.urlparse(url).path if url.startswith("file://") else url
  if media_dir is None:
    raise MediaError("local image paths are refused (the server was started without "
                     "--allow_media_dir); send the image as a base64 data URL")
  root = os.path.realpath(media_dir)
  real = os.path.realpath(os.path.join(root, path))
  if os.path.commonpath([root, real]) != root:
    raise MediaError(f"image path {path!r} is outside the allowed media folder")
  if not os.path.isfile(real):
    raise MediaError(f"image path {path!r}: no such file in the media folder")
  if os.path.getsize(real) > max_bytes:
    raise MediaError(f"image of {os.path.getsize(real)} bytes exceeds the server's limit "
                     f"of {max_bytes} bytes")
  with open(real, "rb") as f:
    return f.read()
