"""KV-cache generation for NEO: batched prompts with images, one prefill, a jitted decode loop.

Positions follow NEO's decoding rule (docs/reference/neo.md#decoding): the prompt keeps its
Native-RoPE T/H/W positions, and the k-th generated token (k = 1, 2, ...) of a row takes
T = (that row's largest prompt T) + k with H = W = 0. The prompt is written to the cache in one
call under the mixed mask (causal text, bidirectional images); every later token attends to all
filled slots.

Batching: prompts are left-padded to a common length P so that every row writes its next token
to the same cache slot. Padding slots carry segment id 0 and are never attended to, so each
row computes exactly what it would alone. P and the visual-token count are rounded up to
buckets (64 by default) and the cache holds P + max_new_tokens slots, so prompts of similar
sizes share one compilation of the prefill and of the decode loop.

Stopping: a row stops at its first stop token (config.eos_token_id, `<|im_end|>`, by default);
the slots after it hold config.pad_token_id. The loop ends when every row has stopped or after
max_new_tokens tokens; it runs inside `lax.while_loop`, so a whole answer is one device call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.data.inputs import prepare_generation_inputs
from neo_jax.inference.sampling import GREEDY, Sampling, next_token
from neo_jax.model.neo import KVCache, NeoModel, init_cache

LENGTH_BUCKET = 64  # prompt lengths are rounded up to a multiple of this
VISUAL_BUCKET = 64  # visual-token counts likewise

Prompt = Mapping[str, np.ndarray]  # neo_jax.data.inputs.prepare_generation_inputs output


def round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


class PromptBatch(NamedTuple):
  """Left-padded prompts (numpy). P = padded length, N = visual-token slots (0: no images)."""

  input_ids: np.ndarray  # int32 [B, P]
  segment_ids: np.ndarray  # int32 [B, P]; 1 on prompt tokens, 0 on padding
  positions: np.ndarray  # int32 [B, 3, P]
  pixels: np.ndarray | None  # [B, N, 4, 768] (uint8 or normalised float), None if N = 0
  pixel_rc: np.ndarray | None  # int32 [B, N, 2]
  rows: np.ndarray  # bool [B]: real prompt (False: a filler row that pads the batch)
  prompt_lengths: np.ndarray  # int32 [B]


def _row(prompt: Prompt, key: str, ndim: int) -> np.ndarray:
  if key not in prompt:
    raise ValueError(
      f"generation prompt is missing {key!r} (expected the output of "
      "neo_jax.data.inputs.prepare_generation_inputs)"
    )
  x = np.asarray(prompt[key])
  if x.ndim == ndim + 1:
    if x.shape[0] != 1:
      raise ValueError(
        f"generation prompt {key!r} holds {x.shape[0]} rows; give one prompt per list entry"
      )
    x = x[0]
  if x.ndim != ndim:
    raise ValueError(f"generation prompt {key!r} has shape {x.shape}, expected {ndim} axes")
  return x


def batch_prompts(
  prompts: Sequence[Prompt],
  config: NeoConfig,
  *,
  batch_size: int | None = None,
  length_bucket: int = LENGTH_BUCKET,
  visual_bucket: int = VISUAL_BUCKET,
) -> PromptBatch:
  """Left-pads prompts into one batch; `batch_size` adds filler rows up to that many."""
  if not prompts:
    raise ValueError("generate: no prompts")
  n_rows = len(prompts) if batch_size is None else batch_size
  if n_rows < len(prompts):
    raise ValueError(f"{len(prompts)} prompts do not fit batch_size={batch_size}")
  rows = []
  for i, p in enumerate(prompts):
    ids = _row(p, "input_ids", 1).astype(np.int32)
    pos = _row(p, "positions", 2).astype(np.int32)
    if pos.shape != (3, ids.size):
      raise ValueError(f"prompt {i}: positions {pos.shape} do not match {ids.size} tokens")
    n_ctx = int((ids == config.img_context_token_id).sum())
    if "pixels" in p and np.asarray(p["pixels"]).size:
      pix, rc = _row(p, "pixels", 3), _row(p, "pixel_rc", 2).astype(np.int32)
    else:
      pix, rc = None, np.zeros((0, 2), np.int32)
    if len(rc) != n_ctx or (pix is not None and len(pix) != n_ctx):
      raise ValueError(
        f"prompt {i}: {n_ctx} <IMG_CONTEXT> tokens but "
        f"{0 if pix is None else len(pix)} visual tokens"
      )
    if ids.size == 0:
      raise ValueError(f"prompt {i} is empty")
    rows.append((ids, pos, pix, rc))

  length = round_up(max(r[0].size for r in rows), length_bucket)
  n_visual = max(len(r[3]) for r in rows)
  n_slots = round_up(n_visual, visual_bucket) if n_visual else 0
  pix_example = next((r[2] for r in rows if r[2] is not None), None)

  input_ids = np.full((n_rows, length), config.pad_token_id, np.int32)
  segment_ids = np.zeros((n_rows, length), np.int32)
  positions = np.zeros((n_rows, 3, length), np.int32)
  pixels = pixel_rc = None
  if n_slots:
    pixels = np.zeros((n_rows, n_slots) + pix_example.shape[1:], pix_example.dtype)
    pixel_rc = np.zeros((n_rows, n_slots, 2), np.int32)
  for r, (ids, pos, pix, rc) in enumerate(rows):
    start = length - ids.size
    input_ids[r, start:] = ids
    segment_ids[r, start:] = 1
    positions[r, :, start:] = pos
    if pix is not None:
      pixels[r, : len(pix)] = pix
      pixel_rc[r, : len(rc)] = rc
  valid = np.zeros(n_rows, bool)
  valid[: len(rows)] = True
  lengths = np.zeros(n_rows, np.int32)
  lengths[: len(rows)] = [r[0].size for r in rows]
  return PromptBatch(input_ids, segment_ids, positions, pixels, pixel_rc, valid, lengths)


class DecodeState(NamedTuple):
  """The decode loop's carry (a pytree of device arrays)."""

  cache: KVCache
  token: jax.Array  # int32 [B]: the last chosen token, fed at the next step
  next_t: jax.Array  # int32 [B]: T position of `token`
  done: jax.Array  # bool [B]: stopped (or a filler row)
  rows: jax.Array  # bool [B]: real rows
  step: jax.Array  # int32 scalar: tokens chosen so far
  tokens: jax.Array  # int32 [B, max_new]: chosen tokens, pad after the stop
  logits: jax.Array | None  # float32 [B, max_new, V] when kept (tests, diagnostics)


class GenerationOutput(NamedTuple):
  """New tokens of each row. Rows appear in prompt order; filler rows are dropped."""

  tokens: np.ndarray  # int32 [B, max_new]: pad_token_id after a row's stop token
  lengths: np.ndarray  # int32 [B]: new tokens of each row, the stop token included
  finished: np.ndarray  # bool [B]: the row produced a stop token
  logits: np.ndarray | None  # float32 [B, max_new, V] with `return_logits`

  def token_lists(self) -> list[list[int]]:
    """Each row's new tokens up to and including its stop token."""
    return [self.tokens[r, : int(n)].tolist() for r, n in enumerate(self.lengths)]


def _choose(logits_bv, state_done, rows, sampling, rng, step, config, stop_ids):
  stops = jnp.asarray(stop_ids or (config.eos_token_id,), jnp.int32)
  token = next_token(logits_bv, sampling, jax.random.fold_in(rng, step))
  token = jnp.where(state_done, config.pad_token_id, token)
  done = state_done | jnp.isin(token, stops) | ~rows
  return token, done


def _record(state_tokens, state_logits, token, logits_bv, step):
  tokens = jax.lax.dynamic_update_slice_in_dim(state_tokens, token[:, None], step, axis=1)
  if state_logits is not None:
    state_logits = jax.lax.dynamic_update_slice_in_dim(
      state_logits, logits_bv[:, None], step, axis=1
    )
  return tokens, state_logits


@functools.partial(
  jax.jit,
  static_argnames=(
    "config",
    "cache_len",
    "max_new_tokens",
    "sampling",
    "stop_ids",
    "return_logits",
  ),
)
def prefill(
  params: Any,
  batch: Mapping[str, jax.Array],
  rng: jax.Array,
  *,
  config: NeoConfig,
  cache_len: int,
  max_new_tokens: int,
  sampling: Sampling = GREEDY,
  stop_ids: tuple[int, ...] = (),
  return_logits: bool = False,
) -> DecodeState:
  """Runs the padded prompts through the model into a fresh cache and picks the first token.

  `batch` holds the PromptBatch arrays (input_ids, segment_ids, positions, pixels, pixel_rc,
  rows). Only the last position's logits are computed, so the [B, P, vocab] tensor never exists.
  """
  model = NeoModel(config)
  ids, positions = batch["input_ids"], batch["positions"]
  b = ids.shape[0]
  cache = init_cache(config, b, cache_len)
  hidden, cache = model.apply(
    {"params": params},
    ids,
    positions,
    batch["segment_ids"],
    batch.get("pixels"),
    batch.get("pixel_rc"),
    cache=cache,
    return_hidden=True,
  )
  logits_bv = model.apply({"params": params}, hidden[:, -1:], method=NeoModel.logits)[:, 0]
  rows = batch["rows"]
  token, done = _choose(logits_bv, ~rows, rows, sampling, rng, 0, config, stop_ids)
  tokens = jnp.full((b, max_new_tokens), config.pad_token_id, jnp.int32)
  logits = (
    jnp.zeros((b, max_new_tokens, logits_bv.shape[-1]), jnp.float32) if return_logits else None
  )
  tokens, logits = _record(tokens, logits, token, logits_bv, 0)
  next_t = jnp.max(jnp.where(batch["segment_ids"] > 0, positions[:, 0], 0), axis=-1) + 1
  return DecodeState(
    cache, token, next_t.astype(jnp.int32), done, rows, jnp.ones((), jnp.int32), tokens, logits
  )


@functools.partial(
  jax.jit, static_argnames=("config", "sampling", "stop_ids"), donate_argnames=("state",)
)
def decode(
  params: Any,
  state: DecodeState,
  rng: jax.Array,
  *,
  config: NeoConfig,
  sampling: Sampling = GREEDY,
  stop_ids: tuple[int, ...] = (),
) -> DecodeState:
  """Feeds one token per row and picks the next, until every row stopped or the buffer is full."""
  model = NeoModel(config)
  max_new = state.tokens.shape[1]

  def cond(s: DecodeState):
    return (s.step < max_new) & ~jnp.all(s.done)

  def body(s: DecodeState) -> DecodeState:
    zeros = jnp.zeros_like(s.next_t)
    positions = jnp.stack([s.next_t, zeros, zeros], axis=1)[:, :, None]  # [B, 3, 1]
    segment_ids = s.rows.astype(jnp.int32)[:, None]
    logits, cache = model.apply(
      {"params": params}, s.token[:, None], positions, segment_ids, cache=s.cache
    )
    logits_bv = logits[:, 0]
    token, done = _choose(logits_bv, s.done, s.rows, sampling, rng, s.step, config, stop_ids)
    tokens, kept = _record(s.tokens, s.logits, token, logits_bv, s.step)
    return DecodeState(cache, token, s.next_t + 1, done, s.rows, s.step + 1, tokens, kept)

  return jax.lax.while_loop(cond, body, state)


def prompt_arrays(batch: PromptBatch) -> dict[str, np.ndarray]:
  """The arrays `prefill` takes (pixels only when some prompt has images)."""
  out = {
    "input_ids": batch.input_ids,
    "segment_ids": batch.segment_ids,
    "positions": batch.positions,
    "rows": batch.rows,
  }
  if batch.pixels is not None:
    out["pixels"], out["pixel_rc"] = batch.pixels, batch.pixel_rc
  return out


def _finish(state: DecodeState, n_prompts: int, stop_ids: tuple[int, ...]) -> GenerationOutput:
  tokens = np.asarray(state.tokens)[:n_prompts]
  is_stop = np.isin(tokens, stop_ids)
  finished = is_stop.any(axis=1)
  lengths = np.where(finished, is_stop.argmax(axis=1) + 1, int(state.step)).astype(np.int32)
  logits = None if state.logits is None else np.asarray(state.logits)[:n_prompts]
  return GenerationOutput(tokens, lengths, finished, logits)


def generate(
  params: Any,
  config: NeoConfig,
  prompts: Sequence[Prompt],
  max_new_tokens: int,
  sampling: Sampling = GREEDY,
  rng: jax.Array | None = None,
  *,
  batch_size: int | None = None,
  stop_ids: Sequence[int] | None = None,
  return_logits: bool = False,
  length_bucket: int = LENGTH_BUCKET,
  visual_bucket: int = VISUAL_BUCKET,
) -> GenerationOutput:
  """Generates up to `max_new_tokens` new tokens for each prompt.

  Args:
    params: the model's parameter tree (`{"params": ...}` contents, as load_checkpoint gives).
    config: its NeoConfig (dtype, attention_impl, eos/pad ids are read from it).
    prompts: one dict per prompt, as `neo_jax.data.inputs.prepare_generation_inputs` returns
      (input_ids, positions, pixels, pixel_rc; a leading batch axis of 1 is allowed).
    sampling: GREEDY (default) or Sampling(temperature, top_k, top_p).
    rng: a jax PRNG key; the same key, prompts and batch_size give the same tokens. Defaults to
      jax.random.key(0).
    batch_size: rows per device call. Prompts are processed in chunks of this size, the last
      chunk padded with filler rows, so every call has the same shape. Default: all at once.
    stop_ids: tokens that end a row (default: config.eos_token_id).
    return_logits: also return the float32 logits that chose every token (tests).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  stops = tuple(int(s) for s in (stop_ids if stop_ids is not None else (config.eos_token_id,)))
  rng = jax.random.key(0) if rng is None else rng
  chunk = len(prompts) if batch_size is None else batch_size
  outputs = []
  for start in range(0, len(prompts), max(chunk, 1)):
    part = prompts[start : start + chunk]
    batch = batch_prompts(
      part, config, batch_size=batch_size, length_bucket=length_bucket, visual_bucket=visual_bucket
    )
    key = jax.random.fold_in(rng, start)
    state = prefill(
      params,
      prompt_arrays(batch),
      key,
      config=config,
      cache_len=batch.input_ids.shape[1] + max_new_tokens,
      max_new_tokens=max_new_tokens,
      sampling=sampling,
      stop_ids=stops,
      return_logits=return_logits,
    )
    state = decode(params, state, key, config=config, sampling=sampling, stop_ids=stops)
    outputs.append(_finish(state, len(part), stops))
  if len(outputs) == 1:
    return outputs[0]
  logits = None if not return_logits else np.concatenate([o.logits for o in outputs])
  return GenerationOutput(
    np.concatenate([o.tokens for o in outputs]),
    np.concatenate([o.lengths for o in outputs]),
    np.concatenate([o.finished for o in outputs]),
    logits,
  )


def decode_text(tokenizer: Any, token_ids: Sequence[int], stop_ids: Sequence[int]) -> str:
  """The answer text: tokens before the first stop token, special tokens dropped, stripped
  (what NEO's `chat` returns)."""
  ids = []
  for t in token_ids:
    if int(t) in stop_ids:
      break
    ids.append(int(t))
  return tokenizer.decode(ids, skip_special_tokens=True).strip()


AnswerFn = Callable[[Any, Sequence[Any]], list[str]]


def vqa_answer_fn(
  config: NeoConfig,
  tokenizer: Any,
  *,
  max_new_tokens: int = 16,
  batch_size: int = 8,
  min_pixels: int | None = None,
  max_pixels: int | None = None,
) -> AnswerFn:
  """`answer(params, examples) -> [text]` by greedy decoding, for the training loop's VQA hook.

  Examples need `.image` (anything `preprocess_image` takes) and `.question`, like
  `neo_jax.data.pipeline.read_vqa_eval` returns. Prompts are built once per example object and
  reused on later calls; every call runs chunks of `batch_size`, so it compiles once.
  """

  prepared: dict[int, tuple[Any, Prompt]] = {}
  stops = (config.eos_token_id,)

  def prompt_of(example: Any) -> Prompt:
    hit = prepared.get(id(example))
    if hit is None or hit[0] is not example:
      hit = (
        example,
        prepare_generation_inputs(
          tokenizer,
          config,
          example.question,
          [example.image],
          min_pixels=min_pixels,
          max_pixels=max_pixels,
        ),
      )
      prepared[id(example)] = hit
    return hit[1]

  def answer(params: Any, examples: Sequence[Any]) -> list[str]:
    if not examples:
      return []
    out = generate(
      params, config, [prompt_of(e) for e in examples], max_new_tokens, batch_size=batch_size
    )
    return [decode_text(tokenizer, ids, stops) for ids in out.token_lists()]

  return answer
