"""Generation throughput: prefill and decode tokens/s of the KV-cache decoder.

    .venv/bin/python benchmarks/generate.py [--preset tiny] [--batch 1 8] [--text-tokens 32]
        [--images 1] [--image-tokens 64] [--new-tokens 64] [--dtype float32] [--out FILE]

A model of the preset with random weights (or --checkpoint DIR) answers synthetic prompts of
`text-tokens` text tokens and `images` images of `image-tokens` visual tokens each (random
pixels), with stop tokens disabled so every row decodes exactly `new-tokens` tokens.

  prefill tokens/s  = batch * prompt tokens (without padding) / prefill time
  decode tokens/s   = batch * (new-tokens - 1) / decode-loop time  (the first new token comes
                      out of the prefill)

Each phase is compiled and run once before timing; the median of --repeat runs is reported.
Compile times are printed as well.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from neo_jax import config as neo_config  # noqa: E402
from neo_jax.inference.generation import batch_prompts, decode, prefill, prompt_arrays  # noqa: E402
from neo_jax.model import abstract_params  # noqa: E402
from neo_jax.positions import grid_rc, native_rope_positions  # noqa: E402


def random_params(config: neo_config.NeoConfig, seed: int = 0) -> dict:
  """N(0, 0.02) weights and unit norms, drawn on the device in one jitted call (the values
  don't matter for timing; a 2B model builds in seconds without a host copy)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(config))

  @jax.jit
  def build(key):
    keys = jax.random.split(key, len(leaves))
    out = []
    for key_i, (path, spec) in zip(keys, leaves):
      name = "/".join(str(getattr(p, "key", p)) for p in path)
      if name.endswith("scale"):
        out.append(jnp.ones(spec.shape, spec.dtype))
      else:
        out.append((0.02 * jax.random.normal(key_i, spec.shape, jnp.float32)).astype(spec.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

  return build(jax.random.key(seed))


def synthetic_prompt(
  config: neo_config.NeoConfig, text_tokens: int, images: int, image_tokens: int, seed: int
) -> dict:
  """`<|im_start|>` + images as `<img> C..C </img>` + random text ids, NEO positions."""
  rng = np.random.default_rng(seed)
  side = max(1, int(round(image_tokens**0.5)))
  grid = (side, max(1, image_tokens // side))
  ids = [151644]
  for _ in range(images):
    ids += [config.img_start_token_id] + [config.img_context_token_id] * (grid[0] * grid[1])
    ids += [config.img_end_token_id]
  ids += rng.integers(0, 150_000, text_tokens).tolist()
  ids = np.asarray(ids, np.int32)
  rc = np.concatenate([grid_rc(*grid)] * images) if images else np.zeros((0, 2), np.int32)
  positions = native_rope_positions(
    ids[None],
    np.ones_like(ids)[None],
    rc[None],
    img_context_id=config.img_context_token_id,
    img_start_id=config.img_start_token_id,
  )
  pixels = rng.integers(0, 256, (1, len(rc), 4, config.patch_dim), dtype=np.uint8)
  return {
    "input_ids": ids[None],
    "positions": positions,
    "pixels": pixels,
    "pixel_rc": rc[None].astype(np.int32),
  }


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def bench(
  params,
  config,
  batch: int,
  *,
  text_tokens: int = 32,
  images: int = 1,
  image_tokens: int = 64,
  new_tokens: int = 64,
  repeat: int = 3,
) -> dict:
  prompts = [synthetic_prompt(config, text_tokens, images, image_tokens, s) for s in range(batch)]
  pb = batch_prompts(prompts, config)
  arrays = prompt_arrays(pb)
  static = dict(
    config=config,
    cache_len=pb.input_ids.shape[1] + new_tokens,
    max_new_tokens=new_tokens,
    stop_ids=(-1,),
  )
  key = jax.random.key(0)
  run_prefill = lambda: prefill(params, arrays, key, **static)
  run_decode = lambda state: decode(params, state, key, config=config, stop_ids=(-1,))

  state, prefill_compile = _timed(run_prefill)
  _, decode_compile = _timed(lambda: run_decode(state))
  prefill_times, decode_times = [], []
  for _ in range(repeat):
    state, t = _timed(run_prefill)
    prefill_times.append(t)
    final, t = _timed(lambda state=state: run_decode(state))
    decode_times.append(t)
    assert int(final.step) == new_tokens
  prompt_tokens = int(pb.prompt_lengths.sum())
  t_prefill, t_decode = statistics.median(prefill_times), statistics.median(decode_times)
  return {
    "batch": batch,
    "prompt_tokens_per_row": int(pb.prompt_lengths[0]),
    "padded_prompt_len": int(pb.input_ids.shape[1]),
    "visual_tokens_per_row": len(prompts[0]["pixel_rc"][0]),
    "new_tokens": new_tokens,
    "prefill_s": t_prefill,
    "prefill_tokens_per_s": prompt_tokens / t_prefill,
    "decode_s": t_decode,
    "decode_tokens_per_s": batch * (new_tokens - 1) / t_decode,
    "decode_ms_per_step": 1000 * t_decode / (new_tokens - 1),
    "compile_prefill_s": prefill_compile,
    "compile_decode_s": decode_compile,
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="tiny", choices=sorted(neo_config.PRESETS))
  parser.add_argument("--checkpoint", default=None, help="time a real checkpoint instead")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--text-tokens", type=int, default=32)
  parser.add_argument("--images", type=int, default=1)
  parser.add_argument("--image-tokens", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--dtype", default="float32", choices=neo_config.DTYPES)
  parser.add_argument("--repeat", type=int, default=3)
  parser.add_argument("--out", default=None, help="append the results as JSON lines")
  args = parser.parse_args()
  if args.new_tokens < 2:
    parser.error("--new-tokens must be >= 2")

  if args.checkpoint:
    from neo_jax.convert import load_checkpoint

    params, config = load_checkpoint(args.checkpoint, dtype=args.dtype, attention_impl="auto")
    name = args.checkpoint
  else:
    config = neo_config.preset(
      args.preset, dtype=args.dtype, param_dtype=args.dtype, attention_impl="auto"
    )
    params = random_params(config)
    name = f"{args.preset} (random weights)"
  device = jax.devices()[0]
  header = {
    "benchmark": "generate",
    "model": name,
    "dtype": args.dtype,
    "backend": jax.default_backend(),
    "device": device.device_kind,
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "date": datetime.date.today().isoformat(),
    "jax": jax.__version__,
  }
  print(json.dumps(header))
  print(
    f"{'batch':>5} {'prompt':>6} {'padded':>6} {'prefill tok/s':>14} {'decode tok/s':>13} "
    f"{'ms/step':>8} {'compile s (prefill/decode)':>27}"
  )
  rows = []
  for batch in args.batch:
    r = bench(
      params,
      config,
      batch,
      text_tokens=args.text_tokens,
      images=args.images,
      image_tokens=args.image_tokens,
      new_tokens=args.new_tokens,
      repeat=args.repeat,
    )
    rows.append({**header, **r})
    print(
      f"{r['batch']:>5} {r['prompt_tokens_per_row']:>6} {r['padded_prompt_len']:>6} "
      f"{r['prefill_tokens_per_s']:>14.1f} {r['decode_tokens_per_s']:>13.1f} "
      f"{r['decode_ms_per_step']:>8.2f} "
      f"{r['compile_prefill_s']:>13.1f} / {r['compile_decode_s']:.1f}"
    )
  if args.out:
    with open(args.out, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
