"""The raw record every source yields, before images are decoded and text is tokenised.

A record is a dict with `kind` and the fields of that kind; images are encoded bytes or file
paths (decoded later, in the pipeline's worker, where bad ones are counted):

    caption       {"kind": "caption", "images": [...], "caption": str}
    conversation  {"kind": "conversation", "images": [...], "conversations": [turn, ...],
                   "system": str}                      turns as LLaVA {"from", "value"}
    preference    {"kind": "preference", "images": [...], "prompt": [turn, ...],
                   "chosen": str, "rejected": str}
    text          {"kind": "text", "text": str}

A record may carry `"error": "<reason>: <detail>"` when the source already knows it is bad (a
JSON line that does not parse, an image file missing at build time); it is then skipped and
counted under that reason. `"id"` names the record in warnings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

KINDS = ("caption", "conversation", "preference", "text")


def error_record(reason: str, detail: str, record_id: str = "") -> dict:
  return {"kind": "error", "error": f"{reason}: {detail}", "id": record_id}


def split_error(error: str) -> tuple[str, str]:
  reason, _, detail = error.partition(": ")
  return reason, detail


def _image_list(obj: Mapping[str, Any], image_root: str | None) -> list:
  images = obj.get("images", obj.get("image"))
  if images is None:
    return []
  if isinstance(images, (str, bytes)):
    images = [images]
  if not isinstance(images, (list, tuple)):
    raise TypeError(f"image field must be a path or a list of paths, got {type(images).__name__}")
  out = []
  for im in images:
    if isinstance(im, str):
      if image_root and not os.path.isabs(im):
        im = os.path.join(image_root, im)
    elif not isinstance(im, bytes):
      raise TypeError(f"image entries must be paths, got {type(im).__name__}")
    out.append(im)
  return out


def record_from_json(obj: Any, image_root: str | None = None, record_id: str = "") -> dict:
  """A user's JSON object -> record. The kind follows from the keys:

  `conversations` / `messages` (LLaVA or OpenAI turns) -> conversation; `chosen` + `rejected`
  (with `question` / `prompt` text or a `conversations` prompt) -> preference; `caption` ->
  caption; `text` -> text. `image` / `images` hold paths relative to `image_root`.
  """
  if not isinstance(obj, Mapping):
    return error_record("bad_record", f"{record_id}: not a JSON object", record_id)
  try:
    images = _image_list(obj, image_root)
  except TypeError as e:
    return error_record("bad_record", f"{record_id}: {e}", record_id)
  rid = str(obj.get("id", record_id))
  if "chosen" in obj and "rejected" in obj:
    prompt = obj.get("prompt", obj.get("question", obj.get("conversations")))
    if isinstance(prompt, str):
      prompt = [{"from": "human", "value": prompt}]
    if not isinstance(prompt, list):
      return error_record(
        "bad_record", f"{record_id}: preference record without a prompt", record_id
      )
    return {
      "kind": "preference",
      "images": images,
      "prompt": prompt,
      "chosen": obj["chosen"],
      "rejected": obj["rejected"],
      "id": rid,
    }
  turns = obj.get("conversations", obj.get("messages"))
  if turns is not None:
    if not isinstance(turns, list):
      return error_record("bad_record", f"{record_id}: conversations is not a list", record_id)
    return {
      "kind": "conversation",
      "images": images,
      "conversations": turns,
      "system": str(obj.get("system", "")),
      "id": rid,
    }
  if "caption" in obj:
    return {"kind": "caption", "images": images, "caption": obj["caption"], "id": rid}
  if "text" in obj:
    return {"kind": "text", "text": obj["text"], "id": rid}
  return error_record(
    "bad_record",
    f"{record_id}: no conversations / caption / chosen+rejected "
    f"/ text field (keys: {sorted(obj)[:8]})",
    record_id,
  )


def record_from_json_line(
  line: str | bytes, image_root: str | None = None, record_id: str = ""
) -> dict:
  try:
    obj = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    return error_record("invalid_json", f"{record_id}: {e}", record_id)
  return record_from_json(obj, image_root, record_id)
