"""Native-RoPE T/H/W positions: NEO's worked example, packing restarts, branches.

The example: docs/reference/neo.md#worked-example.
"""

import jax.numpy as jnp
import numpy as np

from neo_jax.config import IMG_CONTEXT_TOKEN_ID as C
from neo_jax.config import IMG_END_TOKEN_ID as E
from neo_jax.config import IMG_START_TOKEN_ID as I
from neo_jax.positions import grid_rc, image_ids, native_rope_positions

X = 9707  # any text token


def positions(ids, rc, seg=None, branch=None, xp=np):
  ids = np.asarray(ids)
  seg = np.ones_like(ids) if seg is None else np.asarray(seg)
  args = [xp.asarray(ids), xp.asarray(seg), xp.asarray(rc)]
  return np.asarray(
    native_rope_positions(
      *args, None if branch is None else xp.asarray(branch), img_context_id=C, img_start_id=I
    )
  )


def test_worked_example_two_images():
  # a 2x3 image, then a 1x2 image (docs/reference/neo.md#worked-example)
  ids = [X, X, X, I] + [C] * 6 + [E, X, X, I, C, C, E, X]
  rc = np.concatenate([grid_rc(2, 3), grid_rc(1, 2)])
  expected = np.array(
    [
      [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 5, 6, 7, 8, 9, 9, 10, 11],
      [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 1, 2, 0, 1, 2, 0, 0, 0, 0, 0, 1, 0, 0],
    ]
  )
  np.testing.assert_array_equal(positions(ids, rc), expected)
  np.testing.assert_array_equal(positions(ids, rc, xp=jnp), expected)


def test_restart_per_segment_and_padding_zero():
  one = [X, I, C, C, C, C, E, X]
  rc = np.concatenate([grid_rc(2, 2), grid_rc(2, 2)])
  ids = one + one + [0, 0]
  seg = [1] * 8 + [2] * 8 + [0, 0]
  got = positions(ids, rc, seg)
  single = positions(one, grid_rc(2, 2))
  np.testing.assert_array_equal(got[:, :8], single)
  np.testing.assert_array_equal(got[:, 8:16], single)
  np.testing.assert_array_equal(got[:, 16:], 0)


def test_segment_starting_right_after_img_token_of_previous_segment():
  # a segment boundary must not carry the "previous token is <img>" step across
  ids = [X, I, X, X]
  seg = [1, 1, 2, 2]
  got = positions(ids, np.zeros((1, 2), np.int32), seg)
  np.testing.assert_array_equal(got[0], [0, 1, 0, 1])


def test_rejected_branch_restarts_where_chosen_started():
  prompt = [X, I, C, C, C, C, E, X]
  chosen, rejected = [X, X, X], [X, X]
  ids = prompt + chosen + rejected
  branch = [0] * 8 + [1] * 3 + [2] * 2
  got = positions(ids, grid_rc(2, 2), branch=branch)
  np.testing.assert_array_equal(got[0], [0, 1, 2, 2, 2, 2, 3, 4, 5, 6, 7, 5, 6])
  np.testing.assert_array_equal(got, positions(ids, grid_rc(2, 2), branch=branch, xp=jnp))


def test_batched_rows_equal_single_rows():
  rng = np.random.default_rng(0)
  rows, rcs = [], []
  for _ in range(3):
    h, w = rng.integers(1, 4, size=2)
    ids = [X] * int(rng.integers(0, 4)) + [I] + [C] * int(h * w) + [E] + [X] * 3
    ids = (ids + [0] * 20)[:20]
    rows.append(ids)
    rcs.append(np.concatenate([grid_rc(h, w), np.zeros((16 - h * w, 2), np.int32)]))
  seg = (np.asarray(rows) != 0).astype(np.int32)
  batched = positions(rows, np.stack(rcs), seg)
  for b in range(3):
    np.testing.assert_array_equal(batched[b], positions(rows[b], rcs[b], seg[b]))


def test_image_ids_mark_each_image():
  ids = [X, I, C, C, E, I, C, E]
  pos = positions(ids, np.concatenate([grid_rc(1, 2), grid_rc(1, 1)]))
  np.testing.assert_array_equal(image_ids(np.asarray(ids), pos[0], C), [0, 0, 3, 3, 0, 0, 6, 0])
