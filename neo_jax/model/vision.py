"""NEO's patch embedding: the whole "vision model" (no attention, no norm).

Per 16-px patch: linear 768 -> C (the 16x16 stride-16 conv) with bias, exact GELU, then the
2-D rotary rotation of the C features by the patch's column and row. Each 2x2 block of
patches (one 32-px block) is then merged to the LLM width by the 2x2 stride-2 conv, a linear
map of the 4*C concatenated features in (dy, dx, c) order. One output per LLM visual token.

Input layout (batch contract): pixels [B, N, 4, 3*16*16] holding, for each visual token, its
four patches in (dy, dx) row-major order, each flattened channel-major (c, py, px); uint8
pixels are normalised here (ImageNet mean/std), float pixels are taken as normalised.
pixel_rc [B, N, 2] is the (row, column) of the token on its image's 32-px grid.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.model.layers import Linear, dtype_of
from neo_jax.model.rope import apply_vision_rotary

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torch_default_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch's Conv/Linear default: kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default_bias_init(fan_in: int):
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normalize_pixels(pixels_u8: jax.Array, patch_size: int, dtype: jnp.dtype) -> jax.Array:
  """uint8 (c, py, px)-flattened patches -> ImageNet-normalised float, computed in float32."""
  per_channel = patch_size * patch_size
  mean = np.repeat(np.asarray(IMAGENET_MEAN, np.float32), per_channel)
  std = np.repeat(np.asarray(IMAGENET_STD, np.float32), per_channel)
  x = pixels_u8.astype(jnp.float32) / 255.0
  return ((x - mean) / std).astype(dtype)


class PatchEmbedding(nn.Module):
  config: NeoConfig

  @nn.compact
  def __call__(self, pixels_bnsp: jax.Array, pixel_rc_bn2: jax.Array) -> jax.Array:
    cfg = self.config
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    if pixels_bnsp.dtype == jnp.uint8:
      pixels_bnsp = normalize_pixels(pixels_bnsp, cfg.patch_size, dtype)
    b, n, sub, patch_dim = pixels_bnsp.shape
    if sub != cfg.merge_size**2 or patch_dim != cfg.patch_dim:
      raise ValueError(
        f"pixels: expected [B, N, {cfg.merge_size**2}, {cfg.patch_dim}], got {pixels_bnsp.shape}"
      )
    c = cfg.vision_hidden_size
    feats = Linear(
      c,
      ("patch", "vision"),
      use_bias=True,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(patch_dim),
      name="patch_embedding",
    )(pixels_bnsp.astype(dtype))
    feats = jax.nn.gelu(feats, approximate=False)
    # 16-px coordinates of each sub-patch: (2*row + dy, 2*col + dx).
    dy, dx = np.divmod(np.arange(sub), cfg.merge_size)
    row = pixel_rc_bn2[..., 0:1] * cfg.merge_size + dy
    col = pixel_rc_bn2[..., 1:2] * cfg.merge_size + dx
    feats = apply_vision_rotary(feats, col, row, cfg.rope_theta_vision)
    merged = feats.reshape(b, n, sub * c)
    return Linear(
      cfg.hidden_size,
      ("vision_merge", "embed"),
      use_bias=True,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(sub * c),
      name="dense_embedding",
    )(merged)
