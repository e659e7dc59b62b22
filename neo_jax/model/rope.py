"""Rotary position encodings of NEO.

Two kinds, both rotations computed in float32 and cast to the activation dtype:

* Native-RoPE in the decoder: HF "rotate_half" layout (channel i pairs with i + D/2),
  inv_freq_j = theta^(-2j/D). T sub-heads use theta_T and D = head_dim; H and W sub-heads share
  theta_HW and D = head_dim / 2 at different positions.
* The vision 2-D rotary on the 16-px patch features: interleaved pairs (2j, 2j+1); the first
  half of the channels rotates by the patch column, the second half by its row,
  omega_j = theta_v^(-2j / (C/2)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(dim: int, theta: float) -> np.ndarray:
  """float32 [dim // 2]: theta^(-2j/dim), computed in float64 then rounded once."""
  exponent = np.arange(0, dim, 2, dtype=np.float64) / dim
  return (1.0 / (theta**exponent)).astype(np.float32)


def rotate_half_cos_sin(
  positions: jax.Array, dim: int, theta: float, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
  """cos, sin [..., dim] for integer positions [...], rotate_half layout."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_frequencies(dim, theta)
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotate_half(x_blhd: jax.Array, cos_bld: jax.Array, sin_bld: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin, with cos/sin broadcast over heads."""
  half = x_blhd.shape[-1] // 2
  rotated = jnp.concatenate([-x_blhd[..., half:], x_blhd[..., :half]], axis=-1)
  cos, sin = cos_bld[..., None, :], sin_bld[..., None, :]
  return x_blhd * cos + rotated * sin


def apply_vision_rotary(
  features: jax.Array, col: jax.Array, row: jax.Array, theta: float
) -> jax.Array:
  """Rotates patch features [..., C] by their 16-px column (first C/2) and row (last C/2).

  Interleaved pairs: (f[2j], f[2j+1]) -> (f[2j] cos - f[2j+1] sin, f[2j] sin + f[2j+1] cos).
  """
  channels = features.shape[-1]
  part = channels // 2
  omega = inv_frequencies(part, theta)  # [part // 2]
  x = features.astype(jnp.float32)

  def rotate(chunk, pos):
    angle = pos.astype(jnp.float32)[..., None] * omega
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    even, odd = chunk[..., 0::2], chunk[..., 1::2]
    out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(chunk.shape)

  out = jnp.concatenate([rotate(x[..., :part], col), rotate(x[..., part:], row)], axis=-1)
  return out.astype(features.dtype)
