"""Model inputs for one generation prompt (inference, evaluation, the demo).

The same pieces as training (tokenizer, neo1_0 template, image preprocessing, positions), with
the inference rules: RGBA images composited onto white, NEO's eval image prefix, a prompt
ending with "<|im_start|>assistant\\n". Batch size 1, unpadded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.data.image import PATCH_DIM, ImageLike, preprocess_image
from neo_jax.data.template import Message, build_generation_prompt
from neo_jax.data.tokenizer import NeoTokenizer
from neo_jax.positions import native_rope_positions


def prepare_generation_inputs(
  tokenizer: NeoTokenizer,
  model_config: NeoConfig,
  question: str | Sequence[Mapping | Message],
  images: Sequence[ImageLike] = (),
  system: str = "",
  min_pixels: int | None = None,
  max_pixels: int | None = None,
) -> dict[str, np.ndarray]:
  """Prompt arrays with a leading batch axis of 1:

      input_ids int32 [1, n], segment_ids int32 [1, n] (all 1), positions int32 [1, 3, n],
      pixels uint8 [1, v, 4, 768], pixel_rc int32 [1, v, 2]

  `question` is the user text or a history ending with a user turn; `images` are PIL images,
  arrays, encoded bytes or paths. Each image uses the model config's pixel range unless given.
  Generated tokens continue at T = positions[0, 0].max() + 1, + 2, ... with H = W = 0.
  """
  lo = model_config.min_pixels if min_pixels is None else min_pixels
  hi = model_config.max_pixels if max_pixels is None else max_pixels
  processed = [preprocess_image(im, lo, hi, inference=True) for im in images]
  ids = build_generation_prompt(
    tokenizer, question, [p.num_tokens for p in processed], system=system
  )
  if processed:
    pixels = np.concatenate([p.pixels for p in processed])
    rc = np.concatenate([p.rc for p in processed]).astype(np.int32)
  else:
    pixels = np.zeros((0, 4, PATCH_DIM), np.uint8)
    rc = np.zeros((0, 2), np.int32)
  segment_ids = np.ones_like(ids)
  positions = native_rope_positions(
    ids[None],
    segment_ids[None],
    rc[None],
    img_context_id=tokenizer.img_context_id,
    img_start_id=tokenizer.img_start_id,
  )
  return {
    "input_ids": ids[None].astype(np.int32),
    "segment_ids": segment_ids[None],
    "positions": positions,
    "pixels": pixels[None],
    "pixel_rc": rc[None],
  }
