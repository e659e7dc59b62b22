"""One attention entry point for the model: `attention(q, k, v, q_ids, kv_ids, impl=...)`.

Every implementation computes the same function: the rule of `neo_jax.ops.masks`, GQA, and
query/key width different from value width. `impl` picks how:

  xla          dense reference (ops/reference.py)
  xla_chunked  reference computed one query block at a time (O(block * L) memory)
  auto         the best implementation registered for the current backend

Kernels register themselves with `register(name, fn, backends=...)`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax

from neo_jax.ops import reference
from neo_jax.ops.masks import AttnIds

AttentionFn = Callable[..., jax.Array]

_IMPLS: dict[str, AttentionFn] = {}
_AUTO_PREFERENCE: dict[str, list[str]] = {"cpu": [], "gpu": [], "tpu": []}


def register(name: str, fn: AttentionFn, auto_backends: Sequence[str] = ()) -> None:
  """Adds an implementation; `auto_backends` makes it the `auto` choice on those backends."""
  _IMPLS[name] = fn
  for backend in auto_backends:
    _AUTO_PREFERENCE.setdefault(backend, []).insert(0, name)


def available() -> list[str]:
  return sorted(_IMPLS) + ["auto"]


def resolve(impl: str, backend: Optional[str] = None) -> str:
  """The concrete implementation name that `impl` stands for on `backend`."""
  if impl != "auto":
    if impl not in _IMPLS:
      raise ValueError(f"attention impl {impl!r} is not available here; choose one of "
                       f"{available()}")
    return impl
  backend = backend or jax.default_backend()
  for name in _AUTO_PREFERENCE.get(backend, []):
    if name in _IMPLS:
      return name
  return "xla_chunked"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: AttnIds,
              kv_ids: Optional[AttnIds] = None, *, impl: str = "xla",
              scale: Optional[float] = None, q_chunk: int = 512) -> jax.Array:
  """q [B, Lq, Hq, Dqk], k [B, Lk, Hkv, Dqk], v [B, Lk, Hkv, Dv] -> [B, Lq, Hq, Dv].

  `q_ids` / `kv_ids` carry the segment, image, branch and sequence-position ids of the query
  and key tokens; `kv_ids=None` means self-attention over the same tokens.
  """
  if scale is None:
    scale = q.shape[-1] ** -0.5
  if k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f"attention: incompatible shapes q{q.shape} k{k.shape} v{v.shape}")
  fn = _IMPLS[resolve(impl)]
  return fn(q, k, v, q_ids, kv_ids, scale=scale, q_chunk=q_chunk)


def _xla(q, k, v, q_ids, kv_ids, *, scale, q_chunk):
  del q_chunk
  return reference.attention_dense(q, k, v, q_ids, kv_ids, scale=scale)


def _xla_chunked(q, k, v, q_ids, kv_ids, *, scale, q_chunk):
  return reference.attention_chunked(q, k, v, q_ids, kv_ids, scale=scale, q_chunk=q_chunk)


register("xla", _xla)
register("xla_chunked", _xla_chunked)
