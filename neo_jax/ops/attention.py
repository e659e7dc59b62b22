"""One attention entry point for the model: `attention(q, k, v, q_ids, kv_ids, impl=...)`.

Every implementation computes the same function: the rule of `neo_jax.ops.masks`, GQA, and
query/key width different from value width. `impl` picks how:

  xla          dense reference (ops/reference.py)
  xla_chunked  reference computed one query block at a time (O(block * L) memory)
  xla_flash    online-softmax attention in XLA loops that visits only the allowed key blocks
               (ops/xla_flash.py; self-attention, like the kernels); blocks of min(q_chunk, 128)
  pallas_tpu   Pallas TPU flash kernel with block skipping (ops/pallas_tpu.py)
  pallas_gpu   Pallas GPU (Triton) flash kernel with block skipping (ops/pallas_gpu.py)
  auto         the best implementation registered for the current backend:
               cpu -> xla_flash, tpu -> pallas_tpu, gpu -> pallas_gpu

Kernels register themselves with `register(name, fn, auto_backends=..., kernel=True)`. A
kernel runs compiled on its own backend and in interpret mode on CPU (slow, exact: how the
kernels are tested). Kernels handle self-attention of a packed row set (`kv_ids is None`);
cross-attention against a KV cache (`kv_ids` given, or explicit positions) goes to the
chunked reference, which is what decoding needs (one or a few queries per step).

Under a mesh (`jax.set_mesh`, Auto axes) a kernel runs inside `jax.shard_map`: batch split
over the mesh axes named in `MeshAxes.batch` (default `data`, `fsdp`), query and kv heads
over `MeshAxes.heads` (default `tensor`), each shard a whole set of rows and heads, so the
kernel needs no communication. Axes that do not divide the dimension are left out (the
kernel is then replicated over them); when the kv heads do not divide over the head axes
but the query heads do, K/V heads are repeated just enough to split.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from neo_jax.ops import pallas_gpu, pallas_tpu, reference, xla_flash
from neo_jax.ops.masks import AttnIds

AttentionFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class MeshAxes:
  """Mesh axis names the kernels split batch and heads over (neo_jax.parallel's mesh)."""

  batch: tuple[str, ...] = ("data", "fsdp")
  heads: tuple[str, ...] = ("tensor",)


DEFAULT_MESH_AXES = MeshAxes()


@dataclasses.dataclass(frozen=True)
class _Impl:
  fn: AttentionFn
  kernel: bool  # self-attention only, runs per shard under a mesh


_IMPLS: dict[str, _Impl] = {}
_AUTO_PREFERENCE: dict[str, list[str]] = {"cpu": [], "gpu": [], "tpu": []}
_AUTO_FALLBACK = "xla_chunked"


def register(name: str, fn: AttentionFn, auto_backends: Sequence[str] = (),
             kernel: bool = False) -> None:
  """Adds an implementation; `auto_backends` makes it the `auto` choice on those backends.

  fn(q, k, v, q_ids, kv_ids, *, scale, q_chunk) -> out. A `kernel` receives self-attention
  only (kv_ids None, no explicit positions) and the arrays of one shard.
  """
  _IMPLS[name] = _Impl(fn, kernel)
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
  return _AUTO_FALLBACK


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: AttnIds,
              kv_ids: Optional[AttnIds] = None, *, impl: str = "xla",
              scale: Optional[float] = None, q_chunk: int = 512,
              mesh_axes: Optional[MeshAxes] = None) -> jax.Array:
  """q [B, Lq, Hq, Dqk], k [B, Lk, Hkv, Dqk], v [B, Lk, Hkv, Dv] -> [B, Lq, Hq, Dv].

  `q_ids` / `kv_ids` carry the segment, image, branch and sequence-position ids of the query
  and key tokens; `kv_ids=None` means self-attention over the same tokens.
  """
  if scale is None:
    scale = q.shape[-1] ** -0.5
  if k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f"attention: incompatible shapes q{q.shape} k{k.shape} v{v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"attention: {q.shape[2]} query heads not a multiple of {k.shape[2]} "
                     "key/value heads")
  spec = _IMPLS[resolve(impl)]
  if spec.kernel and (kv_ids is not None or q_ids.positions is not None):
    spec = _IMPLS[_AUTO_FALLBACK]  # cross-attention against a cache: the reference
  if not spec.kernel:
    return spec.fn(q, k, v, q_ids, kv_ids, scale=scale, q_chunk=q_chunk)
  return _per_shard(spec.fn, q, k, v, q_ids, scale=scale, q_chunk=q_chunk,
                    mesh_axes=mesh_axes or DEFAULT_MESH_AXES)


# --- sharding -----------------------------------------------------------------------------------

def _usable_axes(mesh, names: Sequence[str], size: int) -> tuple[str, ...]:
  """Auto axes of `mesh` among `names` (in order) whose product divides `size`."""
  axes = []
  for name in names:
    if name not in mesh.axis_names or mesh.shape[name] == 1:
      continue
    if mesh.axis_types[mesh.axis_names.index(name)] != AxisType.Auto:
      continue  # manual (already inside a shard_map) or explicit: leave it to the caller
    if size % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[name]) == 0:
      axes.append(name)
  return tuple(axes)


def _per_shard(fn: AttentionFn, q, k, v, ids: AttnIds, *, scale, q_chunk,
               mesh_axes: MeshAxes) -> jax.Array:
  call = lambda q, k, v, ids: fn(q, k, v, ids, None, scale=scale, q_chunk=q_chunk)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return call(q, k, v, ids)
  batch = _usable_axes(mesh, mesh_axes.batch, q.shape[0])
  heads = _usable_axes(mesh, mesh_axes.heads, q.shape[2])
  n_heads = math.prod(mesh.shape[a] for a in heads)
  if heads and k.shape[2] % n_heads:
    repeat = n_heads // math.gcd(k.shape[2], n_heads)
    if (q.shape[2] // k.shape[2]) % repeat:
      heads = ()
    else:  # e.g. 2 kv heads on 4 head shards: each kv head twice, still grouped in order
      k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
  if not batch and not heads:
    return call(q, k, v, ids)
  b_spec = batch if batch else None
  h_spec = heads if heads else None
  x_spec = P(b_spec, None, h_spec, None)
  id_spec = P(b_spec, None)
  arrays = (ids.segment_ids, ids.image_ids) + (() if ids.branch_ids is None else (ids.branch_ids,))

  def shard(q, k, v, *id_arrays):
    branch = id_arrays[2] if len(id_arrays) > 2 else None
    return call(q, k, v, AttnIds(id_arrays[0], id_arrays[1], branch, None))

  sharded = jax.shard_map(shard, mesh=mesh, in_specs=(x_spec,) * 3 + (id_spec,) * len(arrays),
                          out_specs=x_spec, check_vma=False)
  return sharded(q, k, v, *arrays)


# --- implementations ----------------------------------------------------------------------------

def _xla(q, k, v, q_ids, kv_ids, *, scale, q_chunk):
  del q_chunk
  return reference.attention_dense(q, k, v, q_ids, kv_ids, scale=scale)


def _xla_chunked(q, k, v, q_ids, kv_ids, *, scale, q_chunk):
  return reference.attention_chunked(q, k, v, q_ids, kv_ids, scale=scale, q_chunk=q_chunk)


def _xla_flash(q, k, v, q_ids, kv_ids, *, scale, q_chunk):
  del kv_ids
  return xla_flash.flash_attention(q, k, v, q_ids, scale=scale,
                                   block=min(q_chunk, xla_flash.DEFAULT_BLOCK))


def _native_or_cpu(impl: str, native: str) -> None:
  backend = jax.default_backend()
  if backend not in (native, "cpu"):
    raise ValueError(f"attention impl {impl!r} runs on {native} (compiled) or cpu (interpret "
                     f"mode), not on {backend}; use impl='auto'")


def _pallas_tpu(q, k, v, q_ids, kv_ids, *, scale, q_chunk):
  del kv_ids, q_chunk
  _native_or_cpu("pallas_tpu", "tpu")
  return pallas_tpu.flash_attention(q, k, v, q_ids, scale=scale)


def _pallas_gpu(q, k, v, q_ids, kv_ids, *, scale, q_chunk):
  del kv_ids, q_chunk
  _native_or_cpu("pallas_gpu", "gpu")
  return pallas_gpu.flash_attention(q, k, v, q_ids, scale=scale)


register("xla", _xla)
register("xla_chunked", _xla_chunked, auto_backends=("cpu",))
register("xla_flash", _xla_flash, auto_backends=("cpu",), kernel=True)
register("pallas_tpu", _pallas_tpu, auto_backends=("tpu",), kernel=True)
register("pallas_gpu", _pallas_gpu, auto_backends=("gpu", "cuda", "rocm"), kernel=True)
