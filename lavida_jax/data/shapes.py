"""Synthetic scenes of coloured shapes: the demo data, generated from a seed.

No download: every image, question and caption comes from a numpy Generator,
so the CPU demo and the tests are reproducible anywhere.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 170), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  colour: str
  box: tuple[int, int, int, int]  # x0, y0, x1, y1


def sample_scene(rng: np.random.Generator, size=(640, 480), max_shapes: int = 3,
                 side_fraction: tuple[float, float] | None = None,
                 grid: int | None = None, one_row: bool = False) -> list[Shape]:
  """1..max_shapes shapes of distinct colours in distinct columns.

  grid=None: max_shapes columns across the image, shapes at any height.
  grid=g: a g x g grid of square cells (side min(w, h) // g); each shape sits inside
    one cell of its own column (random row). With cells the size of a vision patch,
    every shape is seen whole by one patch: what makes the 2-core demo learnable.
  one_row: with a grid, every shape sits in the same (random) row, so left to right
    is also the order of the shapes' patches in the row-major image-token sequence.
  side_fraction: (lo, hi) bounds of a shape's side as fractions of its column (cell)
    width (default: about 1/3 to 0.8); larger shapes suit small demo images.
  """
  w, h = size
  n = int(rng.integers(1, max_shapes + 1))
  colours = rng.choice(list(COLOURS), size=n, replace=False)
  if grid is None:
    cols, slot, col_h = rng.permutation(max_shapes)[:n], w // max_shapes, h
  else:
    if grid < max_shapes:
      raise ValueError(f"grid {grid} has fewer columns than max_shapes {max_shapes}")
    cols, slot = rng.permutation(grid)[:n], min(w, h) // grid
    col_h = slot
  if side_fraction is None:
    lo, hi = slot // 3, int(slot * 0.8)
  else:
    lo, hi = int(slot * side_fraction[0]), int(slot * side_fraction[1])
  if not 1 <= lo < hi <= min(slot, col_h):
    raise ValueError(f"side_fraction {side_fraction} gives sides [{lo}, {hi}) for "
                     f"cells {slot} px wide in a {w}x{h} image")
  row = int(rng.integers(grid)) if grid is not None and one_row else None
  shapes = []
  for colour, col in zip(colours, cols):
    side = int(rng.integers(lo, hi))
    if grid is None:
      x0 = int(col * slot + rng.integers(0, slot - side + 1))
      y0 = int(rng.integers(0, h - side + 1))
    else:  # The far edge is drawn inclusive: offsets keep it inside the cell.
      x0 = int(col * slot + rng.integers(0, slot - side))
      y0 = int((rng.integers(grid) if row is None else row) * slot
               + rng.integers(0, slot - side))
    shapes.append(Shape(str(rng.choice(SHAPES)), str(colour), (x0, y0, x0 + side, y0 + side)))
  return sorted(shapes, key=lambda s: s.box[0])


def render(shapes: list[Shape], size=(640, 480), background=(90, 90, 90)) -> Image.Image:
  image = Image.new("RGB", size, background)
  draw = ImageDraw.Draw(image)
  for s in shapes:
    fill = COLOURS[s.colour]
    x0, y0, x1, y1 = s.box
    if s.kind == "circle":
      draw.ellipse(s.box, fill=fill)
    elif s.kind == "square":
      draw.rectangle(s.box, fill=fill)
    else:
      draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
  return image


def caption(shapes: list[Shape]) -> str:
  """Left to right, e.g. 'a red circle and a blue square'."""
  return " and ".join(f"a {s.colour} {s.kind}" for s in shapes)
