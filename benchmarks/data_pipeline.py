"""Throughput of the data pipeline on this machine, and what a neo_2b H100 step needs.

    .venv/bin/python benchmarks/data_pipeline.py [--batches 20] [--workers 0 2] [--out FILE]

Measures packed SFT batches of the embedded easy-vqa VQA data (built into $NEO_JAX_CACHE first,
not timed in the rates) in two layouts:

  demo   the tiny CPU demo: L = 1024, N = 256, B = 8, 64x64 images at 64..128^2 pixels
         (4 visual tokens per image)
  neo2b  NEO-2B pre-training rows: L = 16384, N = 16384 (any token may be visual, as in NEO's
         packing), B = 1, pixels 65,536..4,194,304 (each 64x64 image is upscaled to
         256x256 = 64 visual tokens; 48 MiB of uint8 pixels per row)

with `num_workers` = 0 (decode + pack in this process, 2 reader threads) and with grain worker
processes. Reports samples/s, tokens/s (non-padding), visual tokens/s and row fill, then the
arithmetic of what one neo_2b training step on one H100 consumes. The step time there is an
ASSUMPTION (FLOP count at an assumed MFU), not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neo_jax import config as neo_config  # noqa: E402
from neo_jax.data import embedded  # noqa: E402
from neo_jax.data.pipeline import DataConfig, build_train_iterator  # noqa: E402
from neo_jax.data.tokenizer import load_tokenizer  # noqa: E402

LAYOUTS = {
  "demo": dict(
    seq_len=1024, visual_budget=256, batch_size=8, min_pixels=64 * 64, max_pixels=128 * 128
  ),
  "neo2b": dict(
    seq_len=16384, visual_budget=16384, batch_size=1, min_pixels=65_536, max_pixels=4_194_304
  ),
}

# --- neo_2b step arithmetic -----------------------------------------------------------------
H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM dense BF16 peak
ASSUMED_MFU = 0.40  # ASSUMPTION: typical for a well-tuned 2B decoder step; not measured here
NEO_PT_SAMPLES_PER_ROW = 64  # NEO's scripts pack 64 samples per device into one 16k sequence


def neo2b_step_arithmetic(mean_sample_tokens: float) -> dict:
  """Tokens per step and the samples/s the pipeline must sustain for one H100."""
  cfg = neo_config.neo_2b()
  e, d, v, f = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
  heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  per_layer = (
    d * (heads * hd) * 2 + d * (kv * hd) * 2 + d * (heads * hd) + d * (kv * hd) + 3 * d * f
  )
  dense_params = e * per_layer + d * v  # layers (incl. the H/W projections) + lm_head
  tokens = 16384
  # matmuls: 6 N per token (forward + backward). Attention stays inside a packed sample: per
  # token and head, QK (2 * 256 dims) and PV (2 * 128) over ~S / 2 keys (causal); x3 for
  # forward + backward
  attn_forward_per_token = (2 * (2 * hd) + 2 * hd) * heads * e * (mean_sample_tokens / 2)
  flops_per_token = 6 * dense_params + 3 * attn_forward_per_token
  flops_step = flops_per_token * tokens
  step_s = flops_step / (H100_BF16_DENSE_FLOPS * ASSUMED_MFU)
  return {
    "tokens_per_step": tokens,
    "flops_per_step": flops_step,
    "assumed_mfu": ASSUMED_MFU,
    "assumed_step_time_s": step_s,
    "required_tokens_per_s": tokens / step_s,
    "required_samples_per_s_at_neo_packing": NEO_PT_SAMPLES_PER_ROW / step_s,
    "required_samples_per_s_at_measured_sample_length": tokens / mean_sample_tokens / step_s,
    "mean_sample_tokens": mean_sample_tokens,
  }


def image_cost_ms(height: int, width: int, repeats: int = 5) -> float:
  """ms to decode a JPEG photo-like image of this size, smart_resize it (PT pixel range, PIL
  bicubic) and patchify it: the per-image host cost of real data (easy-vqa's are tiny)."""
  import io

  import numpy as np
  from PIL import Image

  from neo_jax.data.image import preprocess_image

  y, x = np.mgrid[0:height, 0:width]
  rgb = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) % 256)], -1)
  noise = np.random.default_rng(0).integers(0, 32, rgb.shape)
  buf = io.BytesIO()
  Image.fromarray((rgb + noise).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
  data = buf.getvalue()
  preprocess_image(data, 65_536, 4_194_304)
  start = time.perf_counter()
  for _ in range(repeats):
    preprocess_image(data, 65_536, 4_194_304)
  return (time.perf_counter() - start) / repeats * 1e3


def measure(layout: str, workers: int, batches: int, warmup: int, tok) -> dict:
  cfg = DataConfig(
    kind="sft",
    sources=("easy_vqa/vqa",),
    num_workers=workers,
    read_threads=2,
    seed=0,
    **LAYOUTS[layout],
  )
  it = build_train_iterator(cfg, tok, neo_config.tiny())
  start = time.perf_counter()
  for _ in range(warmup):
    next(it)
  first = time.perf_counter() - start
  before = it.stats()
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  after = it.stats()
  it.close()
  d = {k: after[k] - before[k] for k in ("samples", "tokens", "visual_tokens", "rows")}
  capacity = d["rows"] * cfg.seq_len
  return {
    "layout": layout,
    "num_workers": workers,
    "batches": batches,
    "batch_shape": [cfg.batch_size, cfg.seq_len],
    "visual_budget": cfg.visual_budget,
    "seconds": round(seconds, 3),
    "startup_and_warmup_s": round(first, 2),
    "samples_per_s": round(d["samples"] / seconds, 1),
    "tokens_per_s": round(d["tokens"] / seconds, 0),
    "visual_tokens_per_s": round(d["visual_tokens"] / seconds, 0),
    "row_fill": round(d["tokens"] / capacity, 3),
    "mean_sample_tokens": round(d["tokens"] / max(d["samples"], 1), 1),
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
  parser.add_argument(
    "--workers",
    nargs="+",
    type=int,
    default=[0, 2],
    help="num_workers values to measure (grain worker processes)",
  )
  parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
  parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args()

  from absl import flags  # grain workers read absl flags; outside absl.app.run mark them parsed

  flags.FLAGS.mark_as_parsed()

  start = time.perf_counter()
  embedded.embedded_dir("easy_vqa/vqa")
  tok = load_tokenizer()
  setup_s = time.perf_counter() - start
  results = []
  for layout in args.layouts:
    for workers in args.workers:
      r = measure(layout, workers, args.batches, args.warmup, tok)
      results.append(r)
      print(json.dumps(r), flush=True)
  photo_ms = {f"{h}x{w}": round(image_cost_ms(h, w), 1) for h, w in ((500, 335), (1080, 1920))}
  print(json.dumps({"ms_per_jpeg_image (decode + resize + patchify)": photo_ms}))
  neo2b = [r for r in results if r["layout"] == "neo2b"]
  sample_tokens = neo2b[0]["mean_sample_tokens"] if neo2b else 100.0
  arithmetic = neo2b_step_arithmetic(sample_tokens)
  report = {
    "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
    f"Python {platform.python_version()}",
    "setup_s (embedded build if needed + tokenizer)": round(setup_s, 1),
    "results": results,
    "ms_per_jpeg_image (decode + resize + patchify, one core)": photo_ms,
    "neo_2b_h100_step (ASSUMED step time)": arithmetic,
  }
  cores_at_neo_packing = (
    arithmetic["required_samples_per_s_at_neo_packing"] * photo_ms["1080x1920"] / 1e3
  )
  report["cores_for_1080p_photos_at_neo_packing"] = round(cores_at_neo_packing, 1)
  print(json.dumps(report["neo_2b_h100_step (ASSUMED step time)"], indent=2))
  best = max((r for r in neo2b), key=lambda r: r["tokens_per_s"], default=None)
  if best:
    need = arithmetic["required_tokens_per_s"]
    print(
      f"neo2b layout: this machine delivers {best['tokens_per_s']:.0f} tokens/s "
      f"({best['num_workers']} workers); one H100 needs {need:.0f} tokens/s at the ASSUMED "
      f"step time: {best['tokens_per_s'] / need:.2f}x the need"
    )
  print(
    f"real photos: {photo_ms['1080x1920']:.0f} ms per 1080p JPEG on one core; at NEO's "
    f"{NEO_PT_SAMPLES_PER_ROW} samples per 16k row that is "
    f"{cores_at_neo_packing:.1f} cores per H100 for one such image per sample"
  )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
