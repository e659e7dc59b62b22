"""Image preprocessing: NEO's token counts, patch layout, HF layout, bad images."""

import io

import numpy as np
import pytest
from PIL import Image

from neo_jax.data import image as image_lib

EVAL = (1280 * 32 * 32, 4096 * 32 * 32)
PT = (65_536, 4_194_304)
SFT = (65_536, 16_777_216)
# docs/reference/neo.md#token-counts: (H, W) -> [(h, w, tokens) for eval SFT, PT, MT/SFT-train]
TABLE = {
  (500, 335): [(1408, 960, 1320), (512, 320, 160), (512, 320, 160)],
  (480, 640): [(992, 1344, 1302), (480, 640, 300), (480, 640, 300)],
  (1080, 1920): [(1088, 1920, 2040), (1088, 1920, 2040), (1088, 1920, 2040)],
  (224, 224): [(1152, 1152, 1296), (256, 256, 64), (256, 256, 64)],
  (2000, 3000): [(1664, 2496, 4056), (1664, 2496, 4056), (1984, 3008, 5828)],
}


@pytest.mark.parametrize("size", list(TABLE))
def test_spec_token_count_table(size):
  for (lo, hi), (h, w, tokens) in zip((EVAL, PT, SFT), TABLE[size]):
    assert image_lib.smart_resize(*size, lo, hi) == (h, w)
    assert image_lib.num_visual_tokens(*size, lo, hi) == tokens


def test_smart_resize_errors_and_multi_image_budget():
  with pytest.raises(image_lib.ImageError) as e:
    image_lib.smart_resize(10, 2010, *PT)
  assert e.value.reason == "bad_aspect_ratio"
  assert image_lib.smart_resize(10, 2000, 32, 10**9)[0] == 32  # ratio 200 is allowed
  with pytest.raises(image_lib.ImageError) as e:
    image_lib.smart_resize(0, 10, *PT)
  assert e.value.reason == "empty_image"
  assert image_lib.per_image_max_pixels(1000, 100, 1) == 1000
  assert image_lib.per_image_max_pixels(1000, 100, 4) == 500
  assert image_lib.per_image_max_pixels(1000, 400, 8) == 400


def test_patch_layout_matches_pixel_crops():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
  tokens = image_lib.patchify_tokens(rgb)
  assert tokens.shape == (2 * 3, 4, 768) and tokens.dtype == np.uint8
  for k in range(6):
    row, col = divmod(k, 3)
    for sub in range(4):
      dy, dx = divmod(sub, 2)
      y, x = row * 32 + dy * 16, col * 32 + dx * 16
      crop = rgb[y : y + 16, x : x + 16].transpose(2, 0, 1).reshape(-1)  # (c, py, px)
      np.testing.assert_array_equal(tokens[k, sub], crop)
  processed = image_lib.ProcessedImage(tokens, (2, 3))
  np.testing.assert_array_equal(processed.rc, [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])


def test_hf_layout_round_trip_and_normalisation():
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (96, 64, 3), dtype=np.uint8)
  processed = image_lib.ProcessedImage(image_lib.patchify_tokens(rgb), (3, 2))
  patches = image_lib.tokens_to_hf_patches(processed.pixels, processed.grid)
  assert patches.shape == (6 * 4, 768)
  w16 = 4
  for k in range(24):  # HF: row-major over the 16-px grid, each (c, py, px)
    y, x = (k // w16) * 16, (k % w16) * 16
    np.testing.assert_array_equal(
      patches[k], rgb[y : y + 16, x : x + 16].transpose(2, 0, 1).ravel()
    )
  np.testing.assert_array_equal(image_lib.hf_patches_to_tokens(patches, (6, 4)), processed.pixels)
  values, grid_hw = image_lib.hf_pixel_values(processed)
  np.testing.assert_array_equal(grid_hw, [[6, 4]])
  mean = np.repeat(np.asarray(image_lib.IMAGENET_MEAN, np.float32), 256)
  std = np.repeat(np.asarray(image_lib.IMAGENET_STD, np.float32), 256)
  np.testing.assert_allclose(values, (patches / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)
  # the model normalises the uint8 tokens on device to the same values
  vision = pytest.importorskip("neo_jax.model.vision")
  on_device = np.asarray(vision.normalize_pixels(processed.pixels, 16, np.float32))
  np.testing.assert_allclose(
    image_lib.tokens_to_hf_patches(on_device, (3, 2)), values, rtol=1e-5, atol=1e-5
  )


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, "PNG")
  return buf.getvalue()


def test_preprocess_resizes_with_pil_bicubic():
  rng = np.random.default_rng(2)
  rgb = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
  out = image_lib.preprocess_image(_png(rgb), 64 * 64, 128 * 128)
  h, w = image_lib.smart_resize(50, 70, 64 * 64, 128 * 128)
  expected = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BICUBIC))
  assert out.grid == (h // 32, w // 32)
  np.testing.assert_array_equal(out.pixels, image_lib.patchify_tokens(expected))
  # a path, a PIL image and an array give the same result
  same = image_lib.preprocess_image(Image.fromarray(rgb), 64 * 64, 128 * 128)
  np.testing.assert_array_equal(same.pixels, out.pixels)


def test_rgba_rule_inference_white_background_training_plain_convert():
  rgba = np.zeros((32, 32, 4), np.uint8)
  rgba[..., 0] = 200  # red, fully transparent except one opaque pixel
  rgba[0, 0, 3] = 255
  image = Image.fromarray(rgba, "RGBA")
  inference = np.asarray(image_lib.to_rgb(image, inference=True))
  assert tuple(inference[5, 5]) == (255, 255, 255)
  assert tuple(inference[0, 0]) == (200, 0, 0)
  training = np.asarray(image_lib.to_rgb(image, inference=False))
  assert tuple(training[5, 5]) == (200, 0, 0)
  opaque = rgba.copy()
  opaque[..., 3] = 255
  np.testing.assert_array_equal(
    image_lib.to_rgb(Image.fromarray(opaque, "RGBA"), True), opaque[..., :3]
  )


def test_bad_images_raise_with_reasons(tmp_path):
  good = _png(np.full((40, 40, 3), 9, np.uint8))
  cases = {
    "corrupt_image": good[: len(good) // 2],  # truncated
    "empty_image": b"",
  }
  for reason, data in cases.items():
    with pytest.raises(image_lib.ImageError) as e:
      image_lib.preprocess_image(data, 1024, 4096)
    assert e.value.reason == reason
  with pytest.raises(image_lib.ImageError) as e:
    image_lib.preprocess_image(b"not an image at all", 1024, 4096)
  assert e.value.reason == "corrupt_image"
  with pytest.raises(image_lib.ImageError) as e:
    image_lib.preprocess_image(str(tmp_path / "missing.png"), 1024, 4096)
  assert e.value.reason == "missing_file"
  (tmp_path / "zero.png").write_bytes(b"")
  with pytest.raises(image_lib.ImageError) as e:
    image_lib.preprocess_image(str(tmp_path / "zero.png"), 1024, 4096)
  assert e.value.reason == "empty_image"
  with pytest.raises(image_lib.ImageError) as e:
    image_lib.preprocess_image(_png(np.zeros((1, 300, 3), np.uint8)), 1024, 4096)
  assert e.value.reason == "bad_aspect_ratio"
