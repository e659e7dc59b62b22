"""The XLA flash attention (ops/xla_flash.py) against the reference: values and gradients."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_kernels import LAYOUT, TOL, check_against_reference, make_inputs

from neo_jax.ops import xla_flash
from neo_jax.ops.layouts import Span, ids_from_arrays, row_ids


@pytest.mark.parametrize("block", [8, 32, 64])
def test_random_layouts_float32(block):
  """Packed rows with images, preference pairs and padding; GQA 4/2; widths 64 / 32."""
  q, k, v, d_out, ids = make_inputs(0, 2, 256, 4, 2, 64, 32, jnp.float32, **LAYOUT)
  fn = functools.partial(xla_flash.flash_attention, block=block)
  check_against_reference(fn, q, k, v, d_out, ids, 0.125, TOL[jnp.float32])


def test_bfloat16_neo_widths_unaligned_length():
  """NEO's widths (256 / 128) in bf16 on a row of 200 tokens (padded to the blocks)."""
  q, k, v, d_out, ids = make_inputs(1, 1, 200, 4, 2, 256, 128, jnp.bfloat16, **LAYOUT)
  fn = functools.partial(xla_flash.flash_attention, block=64)
  check_against_reference(fn, q, k, v, d_out, ids, 128**-0.5, TOL[jnp.bfloat16])


def test_image_straddling_blocks_and_empty_row():
  """An image that crosses block edges sees itself both ways; an all-padding row gives 0."""
  rows = [row_ids([[Span(5), Span(40, image=True), Span(20)]], 96), row_ids([], 96)]
  ids = ids_from_arrays(*(np.stack(x) for x in zip(*rows)))
  q, k, v, d_out, _ = make_inputs(2, 2, 96, 2, 1, 16, 8, jnp.float32)
  fn = functools.partial(xla_flash.flash_attention, block=16)
  out, grads = check_against_reference(fn, q, k, v, d_out, ids, 0.25, TOL[jnp.float32])
  assert float(jnp.abs(out[1]).max()) == 0.0
  assert all(float(jnp.abs(g[1]).max()) == 0.0 for g in grads)
