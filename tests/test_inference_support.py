"""Shared pieces of the inference tests: a tiny random NEO whose greedy answers vary, prompts
with images of different sizes, and the full-recomputation reference. The tests here check
that the fixture model is not degenerate (otherwise cache-vs-recompute tests prove little)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.config import tiny
from neo_jax.data.inputs import prepare_generation_inputs
from neo_jax.data.tokenizer import load_tokenizer
from neo_jax.model import abstract_params
from neo_jax.model.neo import NeoModel
from neo_jax.positions import native_rope_positions


def random_model(seed: int = 0, **overrides):
  """Tiny NEO with random weights larger than the init's (numpy, so it takes a second): logits
  spread out and the greedy choice changes from step to step."""
  config = tiny(**overrides)
  rng = np.random.default_rng(seed)

  def leaf(path, spec):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if name.endswith("scale"):
      x = 1.0 + 0.3 * rng.standard_normal(spec.shape)
    elif name.startswith("vision"):
      fan_in = spec.shape[-2] if name.endswith("kernel") else spec.shape[-1]
      x = rng.uniform(-1, 1, spec.shape) / np.sqrt(fan_in)
    else:  # embedding and projections
      x = (0.1 if "embedding" in name else 0.06) * rng.standard_normal(spec.shape)
    return jnp.asarray(x, spec.dtype)

  params = jax.tree_util.tree_map_with_path(leaf, abstract_params(config))
  return params, config


@functools.cache
def tokenizer():
  return load_tokenizer()


def image(h: int, w: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def prompts(config):
  """Three prompts: one image, two images of different grids, text only."""
  tok = tokenizer()
  return [
    prepare_generation_inputs(tok, config, "What is this?", [image(70, 90, 1)]),
    prepare_generation_inputs(
      tok, config, "Compare the two pictures, please.", [image(40, 120, 2), image(128, 64, 3)]
    ),
    prepare_generation_inputs(tok, config, "Hello"),
  ]


@functools.partial(jax.jit, static_argnames="config")
def _forward(params, ids, positions, segment_ids, pixels, pixel_rc, config):
  return NeoModel(config).apply({"params": params}, ids, positions, segment_ids, pixels, pixel_rc)


def recompute_logits(params, config, prompt, new_ids) -> np.ndarray:
  """float32 [len(new_ids), V]: logits that choose each new token, from one forward pass
  without a cache over prompt + new tokens, positions from the one positions function."""
  ids = np.concatenate([prompt["input_ids"][0], np.asarray(new_ids, np.int32)])
  seg = np.ones_like(ids)
  rc = prompt["pixel_rc"][0]
  positions = native_rope_positions(
    ids[None],
    seg[None],
    rc[None],
    img_context_id=config.img_context_token_id,
    img_start_id=config.img_start_token_id,
  )
  pixels = prompt["pixels"] if rc.size else None
  pixel_rc = prompt["pixel_rc"] if rc.size else None
  logits = _forward(
    params,
    jnp.asarray(ids[None]),
    jnp.asarray(positions),
    jnp.asarray(seg[None]),
    pixels,
    pixel_rc,
    config,
  )
  n = prompt["input_ids"].shape[1]
  return np.asarray(logits[0, n - 1 : n - 1 + len(new_ids)])


def test_fixture_model_answers_vary():
  params, config = random_model()
  p = prompts(config)[0]
  ids = [int(x) for x in p["input_ids"][0]]
  # teacher-forced next-token choices along the prompt are not all the same token
  full = recompute_logits(params, config, {**p, "input_ids": p["input_ids"][:, :1]}, ids[1:])
  choices = full.argmax(-1)
  assert len(set(choices.tolist())) > len(choices) // 2
  top2 = np.sort(full, axis=-1)[:, -2:]
  assert np.median(top2[:, 1] - top2[:, 0]) > 1e-2  # clear winners: argmax is stable


def test_prompts_have_images_of_different_grids():
  _, config = random_model()
  p1, p2, p3 = prompts(config)
  ctx = config.img_context_token_id
  counts = [int((p["input_ids"] == ctx).sum()) for p in (p1, p2, p3)]
  assert counts[0] > 0 and counts[1] > counts[0] and counts[2] == 0
  assert len({tuple(p["pixel_rc"][0].max(0)) for p in (p1, p2) if p["pixel_rc"].size}) == 2
  assert len({p["input_ids"].shape[1] for p in (p1, p2, p3)}) == 3
