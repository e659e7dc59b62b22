"""Record -> packable sample: decode and patchify images, apply the chat template.

Runs inside the grain pipeline (threads or worker processes). A record that cannot be used
becomes `{"skip": reason}` (counted by the packer; named in a warning; strict mode raises
instead), so no bad input stops a run and none disappears without a count.

A sample is a dict of numpy arrays:

    input_ids   int32 [n]          tokens
    supervised  bool [n]           token is a label (predicted from the previous token)
    branch_ids  int32 [n]          preference samples only: 0 prompt, 1 chosen, 2 rejected
    pixels      uint8 [v, 4, 768]  visual tokens of all its images, in `<IMG_CONTEXT>` order
    pixel_rc    int32 [v, 2]       (row, column) of each visual token on its image's grid
    splittable  bool []            plain text: may be cut into several rows
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from neo_jax.data import image as image_lib
from neo_jax.data import template
from neo_jax.data.augment import Augment, augment_image
from neo_jax.data.records import split_error
from neo_jax.data.stats import SKIP_REASONS, report_skip
from neo_jax.data.tokenizer import NeoTokenizer

# which record kinds each pipeline kind accepts
ACCEPTED = {
  "sft": ("conversation", "caption", "text"),
  "pretrain": ("caption", "conversation", "text"),
  "text": ("text",),
  "preference": ("preference",),
}


def skip(reason: str) -> dict:
  return {"skip": reason}


def is_skip(sample: Mapping) -> bool:
  return "skip" in sample


@dataclasses.dataclass
class SampleEncoder:
  """Callable record -> sample (or skip marker) for one pipeline kind."""

  tokenizer: NeoTokenizer
  kind: str  # "sft" | "pretrain" | "preference" | "text"
  min_pixels: int
  max_pixels: int
  system: str = ""
  strict: bool = False
  augment: Augment = Augment()  # training images only; needs the `rng` argument

  def __post_init__(self):
    if self.kind not in ACCEPTED:
      raise ValueError(f"unknown data kind {self.kind!r}; one of {sorted(ACCEPTED)}")

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
    """The sample of one record; `rng` (grain's per-sample generator) draws the augmentation."""
    if self.augment and rng is None:
      raise ValueError("a SampleEncoder that augments needs a generator (grain's random_map)")
    record_id = record.get("id", "")
    try:
      sample = self._encode(record, rng)
      if record_id and not is_skip(sample):
        sample["id"] = str(record_id)  # names the sample if the packer has to drop it
      return sample
    except (image_lib.ImageError, template.TemplateError) as e:
      return self._skip(e.reason, f"{record_id}: {e}" if record_id else str(e))
    except (TypeError, ValueError, KeyError, AttributeError, OSError) as e:
      # a record of an unexpected shape (e.g. a list where text belongs): skipped and named,
      # like any other bad input, rather than stopping the run
      return self._skip("bad_record", f"{record_id}: {type(e).__name__}: {e}")

  def _skip(self, reason: str, detail: str) -> dict:
    if reason not in SKIP_REASONS:
      detail, reason = f"({reason}) {detail}", "bad_record"
    report_skip(reason, detail, self.strict)
    return skip(reason)

  def _images(
    self, images: list, rng: np.random.Generator | None
  ) -> list[image_lib.ProcessedImage]:
    max_pixels = image_lib.per_image_max_pixels(self.max_pixels, self.min_pixels, len(images))
    if self.augment:
      rgb = [image_lib.to_rgb(image_lib.open_image(im)) for im in images]
      images = [augment_image(im, self.augment, rng) for im in rgb]
    return [image_lib.preprocess_image(im, self.min_pixels, max_pixels) for im in images]

  def _encode(self, record: Mapping[str, Any], rng: np.random.Generator | None) -> dict:
    kind = record.get("kind")
    if kind == "error":
      reason, detail = split_error(record.get("error", "bad_record: ?"))
      return self._skip(reason, detail)
    if kind not in ACCEPTED[self.kind]:
      return self._skip(
        "wrong_kind",
        f"{record.get('id', '')}: a {kind!r} record in a "
        f"{self.kind!r} pipeline (accepts {ACCEPTED[self.kind]})",
      )
    tok = self.tokenizer
    if kind == "text":
      text = record.get("text")
      if not isinstance(text, str):
        raise template.TemplateError("bad_record", "text is not a string")
      encoded = template.encode_text(tok, text)
      return _sample(encoded, [], splittable=True)
    images = self._images(list(record.get("images") or []), rng)
    counts = [im.num_tokens for im in images]
    if kind == "caption":
      caption = record.get("caption")
      if not isinstance(caption, str):
        raise template.TemplateError("bad_record", "caption is not a string")
      encoded = template.encode_caption(tok, caption, counts)
    elif kind == "conversation":
      encoded = template.encode_conversation(
        tok,
        record.get("conversations") or [],
        counts,
        system=record.get("system", "") or self.system,
      )
    else:
      chosen, rejected = record.get("chosen"), record.get("rejected")
      if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise template.TemplateError("bad_record", "chosen / rejected are not strings")
      encoded = template.encode_preference(
        tok, record.get("prompt") or [], chosen, rejected, counts, system=self.system
      )
    return _sample(encoded, images, splittable=False)


def _sample(
  encoded: template.TokenizedSample, images: list[image_lib.ProcessedImage], splittable: bool
) -> dict:
  if images:
    pixels = np.concatenate([im.pixels for im in images], axis=0)
    rc = np.concatenate([im.rc for im in images], axis=0).astype(np.int32)
  else:
    pixels = np.zeros((0, 4, image_lib.PATCH_DIM), np.uint8)
    rc = np.zeros((0, 2), np.int32)
  sample = {
    "input_ids": encoded.input_ids,
    "supervised": encoded.supervised,
    "pixels": pixels,
    "pixel_rc": rc,
    "splittable": np.asarray(splittable),
  }
  if encoded.branch_ids is not None:
    sample["branch_ids"] = encoded.branch_ids
  return sample
