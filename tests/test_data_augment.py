"""Training-image augmentation: the specs, the transforms, and where they apply."""

import numpy as np
import pytest
from PIL import Image

from neo_jax.data import augment as A
from neo_jax.data.pipeline import DataConfig
from neo_jax.errors import UserError


def test_specs_parse_and_bad_ones_are_named():
  assert not A.parse_augment(())
  assert A.parse_augment(("flip",)) == A.Augment(flip=True)
  assert A.parse_augment(("flip", "shift:0.0625")) == A.Augment(flip=True, shift=0.0625)
  for bad in ("rotate", "flip:1", "shift", "shift:x", "shift:0", "shift:0.5"):
    with pytest.raises(ValueError, match=repr(bad)):
      A.parse_augment((bad,))
  with pytest.raises(UserError, match="'shift:2'"):
    DataConfig(augment=("shift:2",))


def test_shift_moves_the_content_and_repeats_the_edges():
  img = np.arange(4 * 5 * 1).reshape(4, 5, 1)
  np.testing.assert_array_equal(A.shift_edge(img, 0, 0), img)
  down_left = A.shift_edge(img, 1, -2)
  np.testing.assert_array_equal(down_left[1:, :3], img[:3, 2:])  # content moved
  np.testing.assert_array_equal(down_left[0, :3], img[0, 2:])  # top row repeats the edge
  np.testing.assert_array_equal(down_left[1:, 3], img[:3, 4])  # right columns repeat the edge
  np.testing.assert_array_equal(down_left[1:, 4], img[:3, 4])


def test_draws_cover_every_flip_and_shift_and_nothing_else():
  rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  aug = A.Augment(flip=True, shift=0.25)  # up to 2 pixels on each axis
  candidates = {
    (f, dy, dx): A.shift_edge(rgb[:, ::-1] if f else rgb, dy, dx)
    for f in (0, 1)
    for dy in range(-2, 3)
    for dx in range(-2, 3)
  }
  rng = np.random.default_rng(1)
  seen = set()
  for _ in range(600):
    out = np.asarray(A.augment_image(Image.fromarray(rgb), aug, rng))
    match = [k for k, c in candidates.items() if np.array_equal(out, c)]
    assert match, "an augmented image is no flip / shift of the input"
    seen.update(match)
  assert seen == set(candidates)
  flip_only = A.Augment(flip=True)
  image = Image.fromarray(rgb)
  outs = {np.asarray(A.augment_image(image, flip_only, rng)).tobytes() for _ in range(50)}
  assert outs == {rgb.tobytes(), np.ascontiguousarray(rgb[:, ::-1]).tobytes()}
