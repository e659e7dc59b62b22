"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

The filters follow their usual definitions and run in this order (as in HF `generate`):

  temperature  logits / T (T > 0); T = 0 means greedy (argmax, first index on ties)
  top-k        keep the k highest logits (k = 0: keep all)
  top-p        keep the smallest set of highest-probability tokens whose probability mass
               reaches p: token i (by descending probability) stays when the mass of the tokens
               ranked above it is < p, so the most likely token always stays (p = 1: keep all)

Removed tokens get -inf and are never drawn. `Sampling` is a frozen dataclass: it is a static
argument of the jitted decoder, and filters that are off cost nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick tokens. The default is greedy decoding (what NEO's evaluation uses)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = Sampling()


def filter_logits(logits_bv: jax.Array, sampling: Sampling) -> jax.Array:
  """float32 [B, V]: temperature-scaled logits with the tokens top-k / top-p remove at -inf."""
  x = logits_bv.astype(jnp.float32)
  if not sampling.greedy:
    x = x / sampling.temperature
  neg_inf = jnp.float32(-jnp.inf)
  if 0 < sampling.top_k < x.shape[-1]:
    _, keep_idx = jax.lax.top_k(x, sampling.top_k)
    keep = jnp.zeros(x.shape, bool).at[jnp.arange(x.shape[0])[:, None], keep_idx].set(True)
    x = jnp.where(keep, x, neg_inf)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-x, axis=-1, stable=True)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_above < sampling.top_p
    keep_sorted = keep_sorted.at[:, 0].set(True)
    rows = jnp.arange(x.shape[0])[:, None]
    keep = jnp.zeros(x.shape, bool).at[rows, order].set(keep_sorted)
    x = jnp.where(keep, x, neg_inf)
  return x


def next_token(logits_bv: jax.Array, sampling: Sampling, rng: jax.Array) -> jax.Array:
  """int32 [B]: the chosen token of each row (rng is unused when greedy)."""
  if sampling.greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_bv, sampling)
  keys = jax.random.split(rng, logits_bv.shape[0])  # one stream per row
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
