"""Anyres preprocessing: pinpoint choice, crop placement, pixel values, errors.

Expected values are worked out by hand from SPEC §4 (comments show the sums),
and expected pixels are built here with plain PIL calls at hand-computed
sizes and offsets, independently of lavida_jax.image.
"""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lavida_jax import image as im

S = 384
LAVIDA = im.ImageConfig.lavida()
LLADA_V = im.ImageConfig.llada_v()


def norm(pil):
  """Independent normalisation: uint8 → (x/255 − 0.5)/0.5."""
  return (np.asarray(pil, np.float64) / 255.0 - 0.5) / 0.5


def noise(w, h, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def gradient(w, h):
  x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
  y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
  return Image.fromarray(np.stack([x, y, 255 - x], -1).round().astype(np.uint8))


def solid(w, h, rgb=(200, 30, 90)):
  return Image.new("RGB", (w, h), rgb)


# ----------------------------------------------------------------------------
# Pinpoints and grids.


def test_anyres_max_pinpoints_order():
  pp = im.anyres_max_pinpoints()
  assert len(pp) == 36
  # Width factor is the outer loop, as LLaVA-OneVision expands "(1x1)..(6x6)".
  assert pp[:7] == ((384, 384), (384, 768), (384, 1152), (384, 1536),
                    (384, 1920), (384, 2304), (768, 384))
  assert pp[-1] == (2304, 2304)
  assert im.anyres_max_pinpoints(2, 10) == ((10, 10), (10, 20), (20, 10), (20, 20))
  assert LLADA_V.pinpoints == pp
  assert im.PINPOINTS_LAVIDA == ((384, 768), (768, 384), (768, 768),
                                 (1152, 384), (384, 1152))


@pytest.mark.parametrize("size, best, grid", [
    # 384x768 / 768x384 / 1152x384 keep 384² (s=.375); 768² keeps 768² (s=.75).
    ((1024, 1024), (768, 768), (2, 2)),
    # effective: 384·288, 512·384, min(768·576, 640·480)=307200 (768²), ...
    ((640, 480), (768, 768), (2, 2)),
    ((480, 640), (768, 768), (2, 2)),
    # 768x384: s=1.024 → all 187500 px kept with the least waste (vs 768², 1152x384).
    ((500, 375), (768, 384), (1, 2)),
    # 384x1152: s=.96 → 288·1152 = 331776, the most of any pinpoint.
    ((300, 1200), (384, 1152), (3, 1)),
    # Every pinpoint keeps all 336² px; 384x768 and 768x384 tie on waste → first.
    ((336, 336), (384, 768), (2, 1)),
])
def test_lavida_pinpoints(size, best, grid):
  assert im.select_best_resolution(size, im.PINPOINTS_LAVIDA) == best
  assert im.grid_shape(size, LAVIDA) == grid
  assert im.num_views(size, LAVIDA) == 1 + grid[0] * grid[1]


@pytest.mark.parametrize("size, best, grid", [
    # 384² already keeps all 336² px with the least waste.
    ((336, 336), (384, 384), (1, 1)),
    # 1152² (s=1.125) keeps all 1024² px; 768² only 589824; 1152x1536 wastes more.
    ((1024, 1024), (1152, 1152), (3, 3)),
    # Keeping all 640·480 px needs w ≥ 768 and h ≥ 768 (h=384 < 480): 768².
    ((640, 480), (768, 768), (2, 2)),
    # All 800000 px need w=2304, h ≥ 768; 2304x384 keeps only 1920·384=737280.
    ((2000, 400), (2304, 768), (2, 6)),
])
def test_llada_v_pinpoints(size, best, grid):
  assert im.select_best_resolution(size, LLADA_V.pinpoints) == best
  assert im.grid_shape(size, LLADA_V) == grid


def test_tie_break_least_waste_then_order():
  # Both keep all 100² px: (200, 200) wastes less than (300, 300) → chosen even
  # though listed second; equal waste → the first listed.
  assert im.select_best_resolution((100, 100), [(300, 300), (200, 200)]) == (200, 200)
  assert im.select_best_resolution((100, 100), [(200, 400), (400, 200)]) == (200, 400)
  assert im.select_best_resolution((100, 100), [(400, 200), (200, 400)]) == (400, 200)


def test_effective_resolution_truncates():
  # 10x4 into 8x3: s=.75 → int(7.5)·int(3.0) = 21; into 8x4: s=.8 → 8·int(3.2)
  # = 24 wins. Rounding would give 8x3 24 px with less waste instead.
  assert im.select_best_resolution((10, 4), [(8, 3), (8, 4)]) == (8, 4)


def test_single_view_grid_and_max_views():
  cfg = im.ImageConfig.single_view()
  assert im.grid_shape((1024, 1024), cfg) == (0, 0)
  assert im.num_views((1024, 1024), cfg) == 1
  assert cfg.max_views == 1
  assert LAVIDA.max_views == 5
  assert LLADA_V.max_views == 37


def test_config_validation():
  with pytest.raises(ValueError, match="multiple"):
    im.ImageConfig(pinpoints=((384, 700),))
  cfg = im.ImageConfig(pinpoints=[[384, 768]])  # Lists from JSON → tuples.
  assert cfg.pinpoints == ((384, 768),)
  hash(cfg)


# ----------------------------------------------------------------------------
# Pixels.


def test_resize_and_pad_bands():
  # 500x375 → 768x384: height fills (s=1.024), width ceil(512) → x offset 128.
  canvas = np.asarray(im.resize_and_pad(solid(500, 375), (768, 384)))
  assert canvas.shape == (384, 768, 3)
  assert (canvas[:, :128] == 0).all() and (canvas[:, 640:] == 0).all()
  assert (canvas[:, 128:640] == (200, 30, 90)).all()
  # 336² → 384x768: width fills, height 384 → y offset 192.
  canvas = np.asarray(im.resize_and_pad(solid(336, 336), (384, 768)))
  assert (canvas[:192] == 0).all() and (canvas[576:] == 0).all()
  assert (canvas[192:576] == (200, 30, 90)).all()
  # 1000x333 → 768x384: width fills (s=.768), height ceil(255.744) = 256 → y 64.
  canvas = np.asarray(im.resize_and_pad(solid(1000, 333), (768, 384)))
  assert (canvas[:64] == 0).all() and (canvas[320:] == 0).all()
  assert (canvas[64:320] == (200, 30, 90)).all()
  # Transposed: 333x1000 → 384x768, width ceil(255.744) = 256 → x 64.
  canvas = np.asarray(im.resize_and_pad(solid(333, 1000), (384, 768)))
  assert (canvas[:, :64] == 0).all() and (canvas[:, 320:] == 0).all()
  assert (canvas[:, 64:320] == (200, 30, 90)).all()
  # Odd remainder goes right: 3 px wide into 4, new width ceil(3·1)=3, x=0.
  canvas = np.asarray(im.resize_and_pad(solid(3, 4, (9, 9, 9)), (4, 4)))
  assert (canvas[:, :3] == 9).all() and (canvas[:, 3] == 0).all()


def test_solid_image_crops_have_black_bands_at_computed_columns():
  px, size = im.process_anyres(solid(500, 375), LAVIDA)
  assert size == (500, 375)
  assert px.shape == (3, S, S, 3) and px.dtype == np.float32
  colour = (np.array([200, 30, 90]) / 255 - 0.5) / 0.5
  np.testing.assert_allclose(px[0], np.broadcast_to(colour, (S, S, 3)), atol=1e-6)
  # Canvas columns [0,128) and [640,768) are black → −1.0 exactly.
  assert (px[1, :, :128] == -1.0).all()
  np.testing.assert_allclose(px[1, :, 128:], np.broadcast_to(colour, (S, 256, 3)), atol=1e-6)
  np.testing.assert_allclose(px[2, :, :256], np.broadcast_to(colour, (S, 256, 3)), atol=1e-6)
  assert (px[2, :, 256:] == -1.0).all()


def test_solid_tall_image_three_crops_with_side_bands():
  # 300x1200 → 384x1152: height fills (s=.96), width 288 → x offset 48.
  px, _ = im.process_anyres(solid(300, 1200, (255, 255, 255)), LAVIDA)
  assert px.shape == (4, S, S, 3)
  for k in (1, 2, 3):
    assert (px[k, :, :48] == -1.0).all() and (px[k, :, 336:] == -1.0).all()
    assert (px[k, :, 48:336] == 1.0).all()


def expected_views(image, target, new_size):
  """Global view + row-major crops of a canvas built by hand with PIL."""
  tw, th = target
  nw, nh = new_size
  canvas = Image.new("RGB", target, (0, 0, 0))
  canvas.paste(image.resize(new_size, Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
  views = [norm(image.resize((S, S), Image.BICUBIC))]
  for y in range(0, th, S):
    for x in range(0, tw, S):
      views.append(norm(canvas.crop((x, y, x + S, y + S))))
  return np.stack(views)


@pytest.mark.parametrize("make, size, target, new_size", [
    (gradient, (500, 375), (768, 384), (512, 384)),
    (noise, (336, 336), (384, 768), (384, 384)),
    (gradient, (300, 1200), (384, 1152), (288, 1152)),
    (noise, (640, 480), (768, 768), (768, 576)),
    (noise, (1024, 1024), (768, 768), (768, 768)),
    # 1152x384 keeps all 333000 px (s=1.152); height ceil(383.616) = 384.
    (gradient, (1000, 333), (1152, 384), (1152, 384)),
    (noise, (333, 1000), (384, 1152), (384, 1152)),
])
def test_views_match_independent_pil(make, size, target, new_size):
  image = make(*size)
  px, got_size = im.process_anyres(image, LAVIDA)
  assert got_size == size
  want = expected_views(image, target, new_size)
  assert px.shape == want.shape
  np.testing.assert_allclose(px, want, atol=1e-6)


def test_crops_are_row_major():
  # Four quadrants; 1024² → 768² canvas with no padding, so each crop's
  # centre is its quadrant's colour.
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
  a = np.zeros((1024, 1024, 3), np.uint8)
  a[:512, :512], a[:512, 512:], a[512:, :512], a[512:, 512:] = colours
  px, _ = im.process_anyres(Image.fromarray(a), LAVIDA)
  for k, c in enumerate(colours):
    np.testing.assert_array_equal(px[1 + k, 150:230, 150:230], np.broadcast_to(
        (np.array(c) / 255 - 0.5) / 0.5, (80, 80, 3)))


def test_single_view_mode_is_plain_resize():
  image = gradient(500, 375)
  px, size = im.process_anyres(image, im.ImageConfig.single_view())
  assert px.shape == (1, S, S, 3) and size == (500, 375)
  np.testing.assert_allclose(px[0], norm(image.resize((S, S), Image.BICUBIC)), atol=1e-6)


def test_range_and_extremes():
  px, _ = im.process_anyres(noise(700, 300), LAVIDA)
  assert px.dtype == np.float32 and px.ndim == 4 and px.shape[1:] == (S, S, 3)
  assert px.min() >= -1.0 and px.max() <= 1.0
  assert px.min() == -1.0 and px.max() == 1.0  # 0 and 255 both occur in noise.


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "1"])
def test_non_rgb_modes_become_rgb(mode, tmp_path):
  src = noise(50, 40).convert(mode)
  path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
  src.save(path)
  loaded = im.load_image(path)
  assert loaded.mode == "RGB" and loaded.size == (50, 40)
  px, _ = im.process_anyres(str(path), LAVIDA)
  assert px.shape[-1] == 3
  px2, _ = im.process_anyres(src, LAVIDA)  # A PIL image in that mode.
  assert px2.shape == px.shape


def test_grayscale_and_rgba_values(tmp_path):
  Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
  assert (np.asarray(im.load_image(tmp_path / "g.png")) == 77).all()
  Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "a.png")
  # Alpha is dropped, not composited (LaViDa's convert("RGB")).
  assert (np.asarray(im.load_image(tmp_path / "a.png")) == (10, 20, 30)).all()


def test_16bit_grayscale_is_rescaled(tmp_path):
  a = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
  Image.fromarray(a).save(tmp_path / "g16.png")
  got = np.asarray(im.load_image(tmp_path / "g16.png"))
  np.testing.assert_array_equal(got[0, :, 0], [0, 128, 255, 4])
  assert (got[..., 0] == got[..., 2]).all()


def test_load_from_bytes():
  buf = io.BytesIO()
  gradient(20, 10).save(buf, "PNG")
  image = im.load_image(buf.getvalue())
  np.testing.assert_array_equal(np.asarray(image), np.asarray(gradient(20, 10)))
  px, size = im.process_anyres(buf.getvalue(), LAVIDA)
  assert size == (20, 10)


# ----------------------------------------------------------------------------
# Errors.


def encoded(fmt, w=200, h=150):
  buf = io.BytesIO()
  noise(w, h).save(buf, fmt)
  return buf.getvalue()


def png_header_only(w, h):
  """A PNG whose IHDR claims w×h and that has no pixel data."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name, data, msg", [
    ("text.png", b"this is not an image\n" * 10, "not an image"),
    ("half.png", encoded("PNG")[: len(encoded("PNG")) // 2], "truncated"),
    ("half.jpg", encoded("JPEG")[: len(encoded("JPEG")) // 2], "truncated"),
    ("empty.png", b"", "empty"),
    ("nopixels.png", png_header_only(64, 64), "truncated"),
    ("bomb.png", png_header_only(20000, 10000), "decompression bomb"),
])
def test_bad_files(tmp_path, name, data, msg):
  path = tmp_path / name
  path.write_bytes(data)
  with pytest.raises(im.ImageError, match=msg) as e:
    im.load_image(path)
  assert str(path) in str(e.value)
  with pytest.raises(im.ImageError):
    im.process_anyres(path, LAVIDA)


def test_truncated_bytes_named():
  with pytest.raises(im.ImageError, match="bytes.*truncated"):
    im.load_image(encoded("PNG")[:300])


def test_missing_file(tmp_path):
  path = tmp_path / "nope.jpg"
  with pytest.raises(im.ImageError, match="no such file") as e:
    im.load_image(path)
  assert str(path) in str(e.value)


def test_over_max_pixels(tmp_path):
  path = tmp_path / "big.png"
  solid(20, 10).save(path)
  with pytest.raises(im.ImageError, match="200 pixels") as e:
    im.load_image(path, max_pixels=199)
  assert str(path) in str(e.value)
  assert im.load_image(path, max_pixels=200).size == (20, 10)
  with pytest.raises(im.ImageError, match="over the limit"):
    im.process_anyres(path, im.ImageConfig(max_pixels=100))
  with pytest.raises(im.ImageError, match="over the limit"):
    im.process_anyres(solid(20, 10), im.ImageConfig(max_pixels=100))


def test_image_error_is_value_error():
  assert issubclass(im.ImageError, ValueError)


# ----------------------------------------------------------------------------
# pad_views.


def test_pad_views():
  px = np.ones((3, 4, 4, 3), np.float32)
  padded, mask = im.pad_views(px, 5)
  assert padded.shape == (5, 4, 4, 3) and padded.dtype == np.float32
  np.testing.assert_array_equal(mask, [True, True, True, False, False])
  assert mask.dtype == bool
  assert (padded[:3] == 1).all() and (padded[3:] == 0).all()
  padded, mask = im.pad_views(px, 3)
  assert mask.all() and padded.shape == (3, 4, 4, 3)
  with pytest.raises(ValueError, match="3 views.*max_views=2"):
    im.pad_views(px, 2)
