"""Label-preserving image augmentation for training: random horizontal flips and shifts.

Only for data whose answers survive these transforms (easy-vqa's colours and shapes do; text
in images or "left of" questions do not), so it is off unless `data.augment` names it. It
acts on the decoded image before smart_resize, with a generator that grain derives from the
pipeline's seed and the sample's index: the same run sees the same images, also after a
resume. Evaluation and inference never augment.

Specs: "flip" (mirror left-right with probability 1/2) and "shift:F" (move the content by a
whole number of pixels, uniform in [-F, F] x side on each axis independently; the uncovered
border repeats the edge pixels, which for a plain background is the background).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

AUGMENTATIONS = ("flip", "shift:F")
MAX_SHIFT = 0.25  # a larger shift pushes a centred object off the image


@dataclasses.dataclass(frozen=True)
class Augment:
  """Which augmentations a pipeline applies; falsy when none."""

  flip: bool = False
  shift: float = 0.0  # largest shift, as a fraction of the image's height / width

  def __bool__(self) -> bool:
    return self.flip or self.shift > 0


def parse_augment(specs: Sequence[str]) -> Augment:
  """("flip", "shift:0.0625") -> Augment(flip=True, shift=0.0625); ValueError names a bad spec."""
  flip, shift = False, 0.0
  for spec in specs:
    name, _, arg = str(spec).partition(":")
    if name == "flip" and not arg:
      flip = True
    elif name == "shift" and arg:
      try:
        shift = float(arg)
      except ValueError:
        shift = -1.0
      if not 0.0 < shift <= MAX_SHIFT:
        raise ValueError(f"augment {spec!r}: the shift must be a fraction in (0, {MAX_SHIFT}]")
    else:
      raise ValueError(f"augment {spec!r} is not one of {AUGMENTATIONS}")
  return Augment(flip=flip, shift=shift)


def shift_edge(rgb_hwc: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """The image moved down by dy and right by dx pixels (negative: up / left); the uncovered
  rows and columns repeat the nearest edge pixels. Same shape as the input."""
  h, w = rgb_hwc.shape[:2]
  rows = np.clip(np.arange(h) - dy, 0, h - 1)
  cols = np.clip(np.arange(w) - dx, 0, w - 1)
  return rgb_hwc[rows][:, cols]


def augment_image(image: Image.Image, augment: Augment, rng: np.random.Generator) -> Image.Image:
  """One random draw of `augment` applied to an RGB image. Draws the same number of values
  from `rng` whatever the outcome, so a sample's draws do not depend on its image."""
  rgb = np.asarray(image)
  flip = bool(rng.integers(2))
  h, w = rgb.shape[:2]
  max_dy, max_dx = round(augment.shift * h), round(augment.shift * w)
  dy, dx = int(rng.integers(-max_dy, max_dy + 1)), int(rng.integers(-max_dx, max_dx + 1))
  if augment.flip and flip:
    rgb = rgb[:, ::-1]
  if dy or dx:
    rgb = shift_edge(rgb, dy, dx)
  return Image.fromarray(np.ascontiguousarray(rgb))
