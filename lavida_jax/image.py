"""Host-side anyres image preprocessing (numpy/PIL only, no JAX).

An image becomes `V` views of `size`×`size` pixels, channels last:

  view 0      the whole image resized to size×size (aspect not preserved);
  views 1..   the crops, row-major, of the image resized (aspect kept) into
              the best-fitting pinpoint and centred on a black canvas.

So `V = 1 + rows·cols` (SPEC §4). Pinpoints and image sizes are always
(width, height), as in PIL; grid shapes are (rows, cols), as in numpy.
Pixel values are `(x / 255 − mean) / std`, i.e. in [−1, 1] for mean = std =
0.5, so the black padding becomes −1.

All resizes are PIL bicubic on RGB images, which is what LaViDa's pipeline
does (PIL's default filter for RGB plus the SigLIP processor's resample).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Sequence, Union

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (width, height)
ImageSource = Union[str, os.PathLike, bytes, bytearray]

# LaViDa's `image_grid_pinpoints`, (width, height).
PINPOINTS_LAVIDA: tuple[Size, ...] = (
    (384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))


def anyres_max_pinpoints(max_grid: int = 6, size: int = 384) -> tuple[Size, ...]:
  """LLaDA-V's "(1x1),...,(6x6)" pinpoints, (width, height).

  Same order as LLaVA-OneVision expands the string: the width factor is the
  outer loop, so (384, 384), (384, 768), ..., (384, 2304), (768, 384), ...
  The order matters: it breaks ties in `select_best_resolution`.
  """
  return tuple((i * size, j * size)
               for i in range(1, max_grid + 1) for j in range(1, max_grid + 1))


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """How images become views.

  size: side of every view (SigLIP input), pixels.
  pinpoints: candidate canvas sizes (width, height), multiples of `size`.
  anyres: False = stage-1 mode, one global view and no crops.
  mean, std: per-channel normalisation after scaling to [0, 1].
  max_pixels: images with more pixels than this are refused before decoding
    (decompression-bomb guard). Pillow's own guard (2 × MAX_IMAGE_PIXELS)
    still applies on top.
  """
  size: int = 384
  pinpoints: tuple[Size, ...] = PINPOINTS_LAVIDA
  anyres: bool = True
  mean: float = 0.5
  std: float = 0.5
  max_pixels: int = 100_000_000

  def __post_init__(self):
    # Normalise lists (e.g. from JSON) to tuples so the config stays hashable.
    pinpoints = tuple((int(w), int(h)) for w, h in self.pinpoints)
    object.__setattr__(self, "pinpoints", pinpoints)
    if self.size <= 0:
      raise ValueError(f"ImageConfig.size must be positive, got {self.size}")
    if self.anyres and not pinpoints:
      raise ValueError("ImageConfig.pinpoints is empty but anyres=True")
    for w, h in pinpoints:
      if w <= 0 or h <= 0 or w % self.size or h % self.size:
        raise ValueError(f"pinpoint {(w, h)} is not a positive multiple of "
                         f"size {self.size} in both width and height")
    if self.std == 0:
      raise ValueError("ImageConfig.std must be non-zero")
    if self.max_pixels <= 0:
      raise ValueError(f"ImageConfig.max_pixels must be positive, "
                       f"got {self.max_pixels}")

  @classmethod
  def lavida(cls) -> ImageConfig:
    return cls()

  @classmethod
  def llada_v(cls) -> ImageConfig:
    return cls(pinpoints=anyres_max_pinpoints(6, 384))

  @classmethod
  def single_view(cls) -> ImageConfig:
    return cls(anyres=False)

  @property
  def max_views(self) -> int:
    """Most views any image can produce: the static view count for padding."""
    if not self.anyres:
      return 1
    return 1 + max((w // self.size) * (h // self.size) for w, h in self.pinpoints)


class ImageError(ValueError):
  """An input that cannot be turned into an image (message names the input)."""


# ----------------------------------------------------------------------------
# Loading.


def _describe(source: ImageSource) -> str:
  if isinstance(source, (bytes, bytearray)):
    return f"<{len(source)} bytes>"
  return os.fspath(source)


def _to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode → 8-bit RGB. Alpha is dropped (not composited), as in LaViDa."""
  if image.mode.startswith("I"):
    # 16-bit greyscale ("I;16*", or "I" from older Pillow / PNG): PIL's own
    # conversion clips at 255, turning almost every pixel white. Rescale the
    # 0..65535 range to 0..255 instead.
    grey = np.asarray(image).astype(np.float64) / 257.0
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
  return image.convert("RGB")


def load_image(source: ImageSource, *,
               max_pixels: int = ImageConfig.max_pixels) -> Image.Image:
  """Decodes a file path or encoded bytes into a fully loaded RGB image.

  Truncated files are errors: this never sets ImageFile.LOAD_TRUNCATED_IMAGES
  (a global that, if someone else sets it, makes truncated files load grey).
  EXIF orientation is not applied, matching the reference pipeline.

  Raises:
    ImageError: naming the input, if it is missing, empty, not an image,
      truncated or corrupt, zero-sized, or over `max_pixels`.
  """
  name = _describe(source)
  if isinstance(source, (bytes, bytearray)):
    if not source:
      raise ImageError(f"{name}: empty input (0 bytes), expected an image")
    fp = io.BytesIO(bytes(source))
  else:
    if not os.path.exists(name):
      raise ImageError(f"{name}: no such file")
    if not os.path.isfile(name):
      raise ImageError(f"{name}: not a regular file")
    if os.path.getsize(name) == 0:
      raise ImageError(f"{name}: empty file (0 bytes), expected an image")
    fp = name

  try:
    with Image.open(fp) as image:
      # Image.open reads only the header, so the size checks run before any
      # pixel memory is allocated.
      w, h = image.size
      if w <= 0 or h <= 0:
        raise ImageError(f"{name}: image has zero size {w}x{h}")
      if w * h > max_pixels:
        raise ImageError(f"{name}: image is {w}x{h} = {w * h} pixels, over "
                         f"the limit of {max_pixels}")
      image.load()
      return _to_rgb(image)
  except ImageError:
    raise
  except Image.DecompressionBombError as e:
    raise ImageError(f"{name}: refused as a decompression bomb: {e}") from e
  except Image.UnidentifiedImageError as e:
    raise ImageError(f"{name}: not an image file Pillow can read") from e
  except Exception as e:  # Decoders raise OSError, SyntaxError, ValueError...
    raise ImageError(f"{name}: cannot decode image, truncated or corrupt "
                     f"({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------
# Geometry.


def select_best_resolution(image_size: Size, pinpoints: Sequence[Size]) -> Size:
  """The pinpoint (w, h) that keeps most of the image's pixels (SPEC §4.1).

  For an image (W, H) scaled by s = min(w/W, h/H) to fit the pinpoint, the
  effective resolution is min(int(W·s)·int(H·s), W·H): upscaling adds no
  information. Ties go to the least wasted canvas area w·h − effective, then
  to the earlier pinpoint. Float arithmetic is the reference's, so boundary
  cases truncate identically.
  """
  width, height = image_size
  if width <= 0 or height <= 0:
    raise ImageError(f"image size {image_size} must be positive")
  best, best_key = None, None
  for w, h in pinpoints:
    s = min(w / width, h / height)
    effective = min(int(width * s) * int(height * s), width * height)
    key = (effective, -(w * h - effective))
    if best_key is None or key > best_key:  # Strict: earlier wins ties.
      best, best_key = (w, h), key
  if best is None:
    raise ValueError("select_best_resolution: no pinpoints given")
  return best


def grid_shape(image_size: Size, config: ImageConfig = ImageConfig()) -> tuple[int, int]:
  """(rows, cols) of crops for an image of size (W, H).

  (0, 0) in single-view mode: there are no crops, only the global view, so
  `1 + rows·cols` is the view count in both modes.
  """
  if not config.anyres:
    return 0, 0
  w, h = select_best_resolution(image_size, config.pinpoints)
  return h // config.size, w // config.size


def num_views(image_size: Size, config: ImageConfig = ImageConfig()) -> int:
  """V for an image of size (W, H): the global view plus rows·cols crops."""
  rows, cols = grid_shape(image_size, config)
  return 1 + rows * cols


def resize_and_pad(image: Image.Image, target: Size) -> Image.Image:
  """Fits `image` inside target (w, h), aspect kept, centred on black.

  The side with the smaller scale fills the target exactly; the other is
  min(ceil(orig·scale), target), so it never loses a pixel to rounding down.
  Offsets are (target − new) // 2, i.e. an odd remainder goes right/bottom.
  """
  tw, th = target
  width, height = image.size
  scale_w, scale_h = tw / width, th / height
  if scale_w < scale_h:
    new_w, new_h = tw, min(math.ceil(height * scale_w), th)
  else:
    new_w, new_h = min(math.ceil(width * scale_h), tw), th
  resized = image.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
  canvas = Image.new("RGB", (tw, th), (0, 0, 0))
  canvas.paste(resized, ((tw - new_w) // 2, (th - new_h) // 2))
  return canvas


# ----------------------------------------------------------------------------
# Views.


def _normalise(pixels: np.ndarray, config: ImageConfig) -> np.ndarray:
  """uint8 [..., 3] → float32 (x/255 − mean)/std; 0 → −1, 255 → 1 at 0.5/0.5."""
  x = pixels.astype(np.float32) / np.float32(255.0)
  return ((x - np.float32(config.mean)) / np.float32(config.std)).astype(np.float32)


def _crops(canvas: Image.Image, size: int) -> np.ndarray:
  """RGB canvas (rows·size × cols·size) → uint8 [rows·cols, size, size, 3], row-major."""
  arr = np.asarray(canvas)  # [H, W, 3]
  rows, cols = arr.shape[0] // size, arr.shape[1] // size
  arr = arr.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4)
  return arr.reshape(rows * cols, size, size, 3)


def process_anyres(image: Image.Image | ImageSource,
                   config: ImageConfig = ImageConfig()
                   ) -> tuple[np.ndarray, Size]:
  """An image → (pixel_values float32 [V, size, size, 3], original (W, H)).

  `image` is a PIL image (any mode) or anything `load_image` takes. View 0 is
  the global view; in anyres mode views 1..V−1 are the crops, row-major
  (V = 1 + rows·cols, see `grid_shape`). The original size is returned
  because the model's unpad step needs it to drop the padding tokens.
  """
  if isinstance(image, Image.Image):
    w, h = image.size
    if w <= 0 or h <= 0:
      raise ImageError(f"image has zero size {w}x{h}")
    if w * h > config.max_pixels:
      raise ImageError(f"image is {w}x{h} = {w * h} pixels, over the limit "
                       f"of {config.max_pixels}")
    image = _to_rgb(image)
  else:
    image = load_image(image, max_pixels=config.max_pixels)

  size = config.size
  # Bicubic to size×size; PIL returns a copy when the size already matches,
  # so this is also the "resize each view if needed" step of the reference.
  views = [np.asarray(image.resize((size, size), Image.BICUBIC))[None]]
  if config.anyres:
    target = select_best_resolution(image.size, config.pinpoints)
    # Pinpoints are multiples of `size` (checked by ImageConfig), so every
    # crop is already size×size and needs no further resize.
    views.append(_crops(resize_and_pad(image, target), size))
  return _normalise(np.concatenate(views), config), image.size


def pad_views(pixel_values: np.ndarray, max_views: int) -> tuple[np.ndarray, np.ndarray]:
  """[V, ...] → ([max_views, ...] zero-padded, bool mask [max_views]).

  Gives every image the same static view count for a jitted model; the mask
  says which views are real.
  """
  v = pixel_values.shape[0]
  if v > max_views:
    raise ValueError(f"image has {v} views, more than max_views={max_views}")
  padded = np.zeros((max_views,) + pixel_values.shape[1:], pixel_values.dtype)
  padded[:v] = pixel_values
  mask = np.arange(max_views) < v
  return padded, mask
