"""Image preprocessing (docs/reference/neo.md#image-preprocessing): RGB, smart_resize, patchify.

The model takes, per visual token (one 32-px block), its 2x2 block of 16-px patches in
(dy, dx) order, each patch flattened (c, py, px), as uint8: `[n_tokens, 4, 768]`. ImageNet
normalisation happens on device (`neo_jax.model.vision.normalize_pixels`), so the host sends
4x fewer bytes. The HF layout (`pixel_values [n_patches, 768]` row-major over the 16-px grid,
normalised float, plus `grid_hw` = (h16, w16)) is provided for golden files and parity checks,
with exact maps between the two layouts.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os

import numpy as np
from PIL import Image

from neo_jax.positions import grid_rc

PATCH = 16
MERGE = 2
FACTOR = PATCH * MERGE  # 32: one visual token per 32x32 block
PATCH_DIM = 3 * PATCH * PATCH  # 768
MAX_ASPECT_RATIO = 200
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Image.Image | np.ndarray | bytes | str


class ImageError(ValueError):
  """An image that cannot be used (corrupt, empty, absurd aspect ratio); `reason` names why."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def smart_resize(
  height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR
) -> tuple[int, int]:
  """(h, w) rounded to multiples of `factor` with h*w in [min_pixels, max_pixels] (Qwen2-VL's
  rule, as NEO uses it); aspect ratio kept approximately."""
  if height <= 0 or width <= 0:
    raise ImageError("empty_image", f"image has zero size ({height}x{width})")
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ImageError(
      "bad_aspect_ratio",
      f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got "
      f"{max(height, width) / min(height, width):.1f} ({height}x{width})",
    )
  h_bar = max(factor, round(height / factor) * factor)
  w_bar = max(factor, round(width / factor) * factor)
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def num_visual_tokens(height: int, width: int, min_pixels: int, max_pixels: int) -> int:
  """Visual tokens of an image of this size: (h/32) * (w/32) after smart_resize."""
  h, w = smart_resize(height, width, min_pixels, max_pixels)
  return (h // FACTOR) * (w // FACTOR)


def per_image_max_pixels(max_pixels: int, min_pixels: int, n_images: int) -> int:
  """NEO's training budget per image when one sample has several images."""
  if n_images <= 1:
    return max_pixels
  return max(max_pixels * 2 // n_images, min_pixels)


def open_image(source: ImageLike) -> Image.Image:
  """A loaded PIL image from a PIL image, an HxWxC uint8 array, encoded bytes or a path.

  Raises ImageError (reason `missing_file`, `corrupt_image`, `empty_image`) so that the data
  pipeline can skip and count bad inputs.
  """
  if isinstance(source, Image.Image):
    image = source
  elif isinstance(source, np.ndarray):
    if source.size == 0:
      raise ImageError("empty_image", f"image array has zero size {source.shape}")
    image = Image.fromarray(np.ascontiguousarray(source))
  else:
    try:
      if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
          raise ImageError("empty_image", "image bytes are empty")
        image = Image.open(io.BytesIO(bytes(source)))
      else:
        if os.path.isfile(source) and os.path.getsize(source) == 0:
          raise ImageError("empty_image", f"image file is empty: {source}")
        image = Image.open(source)
      image.load()  # decode now: truncated files fail here, not later
    except ImageError:
      raise
    except FileNotFoundError:
      raise ImageError("missing_file", f"image file not found: {source}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      name = source if isinstance(source, str) else f"{len(source)} bytes"
      raise ImageError("corrupt_image", f"cannot decode image ({name}): {e}") from None
  if image.width == 0 or image.height == 0:
    raise ImageError("empty_image", f"image has zero size ({image.height}x{image.width})")
  return image


def to_rgb(image: Image.Image, inference: bool = False) -> Image.Image:
  """RGB conversion. Training: plain `.convert("RGB")`. Inference (NEO's eval wrapper): an
  RGBA image with any transparent pixel is composited onto black if the mean of its opaque
  RGB values exceeds 382.5, else onto white; as that mean is at most 255, effectively white."""
  if inference and image.mode == "RGBA":
    rgba = np.asarray(image)
    alpha = rgba[..., 3]
    if (alpha < 255).any():
      opaque = rgba[..., :3][alpha == 255]
      mean = float(opaque.mean()) if opaque.size else 0.0
      background = (0, 0, 0) if mean > 382.5 else (255, 255, 255)
      canvas = Image.new("RGBA", image.size, background + (255,))
      return Image.alpha_composite(canvas, image).convert("RGB")
  return image if image.mode == "RGB" else image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
  """One image in the batch layout.

  pixels: uint8 [n_tokens, 4, 768], per visual token its 2x2 16-px patches (dy, dx), each
    flattened (c, py, px).
  grid: (h32, w32), the 32-px token grid; n_tokens = h32 * w32.
  """

  pixels: np.ndarray
  grid: tuple[int, int]

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def rc(self) -> np.ndarray:
    """int32 [n_tokens, 2]: (row, column) of each visual token on the 32-px grid."""
    return grid_rc(*self.grid)


def resize_to_grid(image: Image.Image, min_pixels: int, max_pixels: int) -> np.ndarray:
  """uint8 [h, w, 3]: the RGB image resized by smart_resize with PIL's default (bicubic)."""
  h, w = smart_resize(image.height, image.width, min_pixels, max_pixels)
  if (image.height, image.width) != (h, w):
    image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def patchify_tokens(rgb_hw3: np.ndarray) -> np.ndarray:
  """uint8 [h, w, 3] with h, w multiples of 32 -> [h32*w32, 4, 768]: (token, (dy, dx),
  (c, py, px))."""
  h, w, c = rgb_hw3.shape
  if h % FACTOR or w % FACTOR or c != 3:
    raise ValueError(
      f"image must be [h, w, 3] with h, w multiples of {FACTOR}, got {rgb_hw3.shape}"
    )
  x = rgb_hw3.reshape(h // FACTOR, MERGE, PATCH, w // FACTOR, MERGE, PATCH, 3)
  # (h32, dy, py, w32, dx, px, c) -> (h32, w32, dy, dx, c, py, px)
  x = x.transpose(0, 3, 1, 4, 6, 2, 5)
  return np.ascontiguousarray(x).reshape(-1, MERGE * MERGE, PATCH_DIM)


def preprocess_image(
  source: ImageLike, min_pixels: int, max_pixels: int, inference: bool = False
) -> ProcessedImage:
  """Decode, convert to RGB, smart_resize and patchify one image into the batch layout.

  `inference=True` applies the eval wrapper's RGBA rule; training uses a plain RGB convert.
  """
  image = to_rgb(open_image(source), inference=inference)
  rgb = resize_to_grid(image, min_pixels, max_pixels)
  grid = (rgb.shape[0] // FACTOR, rgb.shape[1] // FACTOR)
  return ProcessedImage(pixels=patchify_tokens(rgb), grid=grid)


# --- HF layout: pixel_values [n_patches, 768] row-major over the 16-px grid, grid_hw (h16, w16)


def tokens_to_hf_patches(pixels_n4p: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """[h32*w32, 4, 768] -> [h16*w16, 768] in HF order (row-major over the 16-px grid)."""
  h32, w32 = grid
  x = np.asarray(pixels_n4p).reshape(h32, w32, MERGE, MERGE, PATCH_DIM)
  return x.transpose(0, 2, 1, 3, 4).reshape(h32 * MERGE * w32 * MERGE, PATCH_DIM)


def hf_patches_to_tokens(patches_np: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
  """[h16*w16, 768] (HF order, grid_hw = (h16, w16)) -> [h16*w16/4, 4, 768]."""
  h16, w16 = grid_hw
  if h16 % MERGE or w16 % MERGE:
    raise ValueError(f"grid_hw {grid_hw} must be even")
  x = np.asarray(patches_np).reshape(h16 // MERGE, MERGE, w16 // MERGE, MERGE, PATCH_DIM)
  return x.transpose(0, 2, 1, 3, 4).reshape(-1, MERGE * MERGE, PATCH_DIM)


def normalize(pixels_u8: np.ndarray) -> np.ndarray:
  """float32 ImageNet normalisation of uint8 (c, py, px)-flattened patches (last axis 768)."""
  per_channel = PATCH * PATCH
  mean = np.repeat(np.asarray(IMAGENET_MEAN, np.float32), per_channel)
  std = np.repeat(np.asarray(IMAGENET_STD, np.float32), per_channel)
  return (np.asarray(pixels_u8, np.float32) / 255.0 - mean) / std


def hf_pixel_values(image: ProcessedImage) -> tuple[np.ndarray, np.ndarray]:
  """(pixel_values float32 [h16*w16, 768] normalised, grid_hw int64 [1, 2] = (h16, w16)), the
  inputs NEO's HF vision model takes for this image."""
  patches = tokens_to_hf_patches(image.pixels, image.grid)
  grid_hw = np.asarray([[image.grid[0] * MERGE, image.grid[1] * MERGE]], np.int64)
  return normalize(patches), grid_hw
