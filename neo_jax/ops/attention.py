"""One attention entry point for the model: `attention(q, k, v, q_ids, kv_ids, impl=...)`.

Every implementation computes the same function: the rule of `neo_jax.ops.masks`, GQA, and
query/key width different from value width. `impl` picks how:

  xla          dense reference (ops/reference.py)
  xla_chunked  reference computed one query block at a time (O(block * L) memory)
  xla_flash    online-softmax attention in XLA loops that visits only the allowed key blocks
               (ops/xla_flash.py; self-attention, like the kernels); blocks of min(q_chunk, 64)
  pallas_tpu   Pallas TPU flash kernel with block skipping (ops/pallas_tpu.py)
  pallas_gpu   Pallas GPU (Triton) flash kernel with block skipping (ops/pallas_gpu.py)
  cudnn        cuDNN flash attention for text-only rows: packed segments, causal within each
               (ops/cudnn.py); never chosen by auto (whether rows are text-only is data)
  auto         the best implementation registered for the platform:
               cpu -> xla_flash, tpu -> pallas_tpu, gpu -> pallas_gpu; a kernel registered
               with a compile check that fails here (shared memory, an unsupported op) is
               passed over for the next one, with one KernelFallbackWarning naming the error;
               an explicit impl never falls back

`platform` is the platform the call is lowered for: by default this process's backend
(`jax.default_backend()`); "tpu", "cuda" or "rocm" on a host without that device trace the
compiled kernel for it, for `jax.export` or `.lower(lowering_platforms=...)` (the compile
check is skipped: nothing here can compile for another platform).

Kernels register themselves with `register(name, fn, auto_backends=..., kernel=True)`. A
kernel runs compiled on its own platform and in interpret mode on CPU (slow, exact: how the
kernels are tested). Kernels handle self-attention of a packed row set (`kv_ids is None`);
cross-attention against a KV cache (`kv_ids` given, or explicit positions) goes to the
chunked reference, which is what decoding needs (one or a few queries per step).

Under a mesh (`jax.set_mesh`, Auto or Explicit axes) a kernel runs inside `jax.shard_map`:
batch split over the mesh axes named in `MeshAxes.batch` (default `data`, `fsdp`), query and
kv heads over `MeshAxes.heads` (default `tensor`), each shard a whole set of rows and heads, so
the kernel needs no communication. Axes that do not divide the dimension are left out (the
kernel is then replicated over them); when the kv heads do not divide over the head axes
but the query heads do, K/V heads are repeated just enough to split. With Explicit axes the
inputs are resharded to that layout first, and an input whose sequence or head width is split
over an Explicit axis is refused with a `UserError` naming the axis. Inside a shard_map over
every axis the kernel runs on the shard as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from neo_jax.errors import UserError
from neo_jax.ops import cudnn, pallas_gpu, pallas_tpu, reference, xla_flash
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
  check: Callable[..., None] | None = None  # check(q, k, v) raises if it cannot compile


class KernelFallbackWarning(UserWarning):
  """`impl="auto"` passed over a kernel that does not compile here."""


_IMPLS: dict[str, _Impl] = {}
_AUTO_PREFERENCE: dict[str, list[str]] = {"cpu": [], "gpu": [], "tpu": []}
_AUTO_FALLBACK = "xla_chunked"
_CHECKED: dict[tuple, str | None] = {}  # (impl, head shapes, dtype) -> error or None


def register(
  name: str,
  fn: AttentionFn,
  auto_backends: Sequence[str] = (),
  kernel: bool = False,
  check: Callable[..., None] | None = None,
) -> None:
  """Adds an implementation; `auto_backends` makes it the `auto` choice on those backends.

  fn(q, k, v, q_ids, kv_ids, *, scale, q_chunk, platform) -> out, `platform` the one the
  call is lowered for. A `kernel` receives self-attention only (kv_ids None, no explicit
  positions) and the arrays of one shard. `check(q, k, v)` raises if the implementation cannot
  compile for these head counts, widths and dtype on this machine; `auto` runs it once per
  such shape before choosing the implementation.
  """
  _IMPLS[name] = _Impl(fn, kernel, check)
  for backend in auto_backends:
    _AUTO_PREFERENCE.setdefault(backend, []).insert(0, name)


def available() -> list[str]:
  return sorted(_IMPLS) + ["auto"]


# jax names GPU backends "gpu"; lowering (jax.export) names them by vendor
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _family(platform: str) -> str:
  return "gpu" if platform in _GPU_PLATFORMS else platform


def target_platform(platform: str | None = None) -> str:
  """The platform a call is lowered for: `platform`, or this process's default backend."""
  return platform or jax.default_backend()


def is_local(platform: str) -> bool:
  """Whether this process's backend is `platform` (so kernels for it can be compiled here)."""
  return _family(platform) == _family(jax.default_backend())


def resolve(impl: str, backend: str | None = None) -> str:
  """The concrete implementation name that `impl` stands for on `backend` (a platform name;
  default: this process's backend)."""
  if impl != "auto":
    if impl not in _IMPLS:
      raise ValueError(
        f"attention impl {impl!r} is not available here; choose one of {available()}"
      )
    return impl
  backend = backend or jax.default_backend()
  for name in _AUTO_PREFERENCE.get(backend, []):
    if name in _IMPLS:
      return name
  return _AUTO_FALLBACK


def _compiling(
  name: str, q: jax.Array, k: jax.Array, v: jax.Array, backend: str | None = None
) -> str:
  """`name` if its compile check passes for these shapes, else the next `auto` candidate
  whose check passes (the fallback has none). Each failure warns once per process. For a
  platform other than this process's, `name` as it is: there is nothing to compile with."""
  backend = target_platform(backend)
  if not is_local(backend):
    return name
  order = [n for n in _AUTO_PREFERENCE.get(backend, []) if n in _IMPLS] + [_AUTO_FALLBACK]
  for candidate in order[order.index(name) if name in order else 0 :]:
    check = _IMPLS[candidate].check
    if check is None:
      return candidate
    key = (candidate, q.shape[2:], k.shape[2:], v.shape[2:], str(q.dtype))
    if key not in _CHECKED:
      try:
        check(q, k, v)
        _CHECKED[key] = None
      except Exception as e:  # noqa: BLE001 - any failure to build the kernel falls back
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        _CHECKED[key] = f"{type(e).__name__}: {first[:300]}"
        warnings.warn(
          f"attention impl 'auto': {candidate} does not compile for heads "
          f"{q.shape[2]}/{k.shape[2]}, widths {q.shape[3]}/{v.shape[3]}, "
          f"{q.dtype} ({_CHECKED[key]}); using the next implementation",
          KernelFallbackWarning,
          stacklevel=3,
        )
    if _CHECKED[key] is None:
      return candidate
  return _AUTO_FALLBACK


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_ids: AttnIds,
  kv_ids: AttnIds | None = None,
  *,
  impl: str = "xla",
  scale: float | None = None,
  q_chunk: int = 512,
  mesh_axes: MeshAxes | None = None,
  platform: str | None = None,
) -> jax.Array:
  """q [B, Lq, Hq, Dqk], k [B, Lk, Hkv, Dqk], v [B, Lk, Hkv, Dv] -> [B, Lq, Hq, Dv].

  `q_ids` / `kv_ids` carry the segment, image, branch and sequence-position ids of the query
  and key tokens; `kv_ids=None` means self-attention over the same tokens. `platform`: the
  one the call is lowered for (default: this process's backend).
  """
  if scale is None:
    scale = q.shape[-1] ** -0.5
  if k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f"attention: incompatible shapes q{q.shape} k{k.shape} v{v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(
      f"attention: {q.shape[2]} query heads not a multiple of {k.shape[2]} key/value heads"
    )
  platform = target_platform(platform)
  name = resolve(impl, platform)
  cross = kv_ids is not None or q_ids.positions is not None
  if impl == "auto" and not cross:
    name = _compiling(name, q, k, v, platform)
  spec = _IMPLS[name]
  if spec.kernel and cross:
    spec = _IMPLS[_AUTO_FALLBACK]  # cross-attention against a cache: the reference
  fn = functools.partial(spec.fn, scale=scale, q_chunk=q_chunk, platform=platform)
  if not spec.kernel:
    return fn(q, k, v, q_ids, kv_ids)
  return _per_shard(
    resolve(impl, platform), fn, q, k, v, q_ids, mesh_axes=mesh_axes or DEFAULT_MESH_AXES
  )


# --- sharding -----------------------------------------------------------------------------------


def _is(mesh, name: str, kind: AxisType) -> bool:
  return mesh.axis_types[mesh.axis_names.index(name)] == kind


def _usable_axes(mesh, names: Sequence[str], size: int) -> tuple[str, ...]:
  """Auto or Explicit axes of `mesh` among `names` (in order) whose product divides `size`."""
  axes = []
  for name in names:
    if name not in mesh.axis_names or mesh.shape[name] == 1 or _is(mesh, name, AxisType.Manual):
      continue  # manual: already inside a shard_map over it
    if size % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[name]) == 0:
      axes.append(name)
  return tuple(axes)


def _spec_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _refuse_split_rows(impl: str, arrays: dict[str, jax.Array]) -> None:
  """Under Explicit axes, a kernel takes whole rows and whole head widths: one-line error
  naming the axis that splits them (the caller reshards or picks a reference impl)."""
  for name, x in arrays.items():
    spec = tuple(jax.typeof(x).sharding.spec)
    for dim, what in ((1, "sequence"), (3, "head width")):
      axes = _spec_axes(spec[dim]) if dim < min(len(spec), x.ndim) else ()
      if axes:
        raise UserError(
          f"attention impl {impl!r}: the {what} axis of {name} is sharded over "
          f"mesh axis {axes[0]!r}; the kernel needs whole rows: reshard it "
          "(jax.reshard) or use impl='xla_chunked'"
        )


def _only(spec: P, axes: Sequence[str]) -> P:
  """`spec` with every mesh axis not in `axes` dropped."""
  keep = lambda entry: tuple(a for a in _spec_axes(entry) if a in axes) or None
  return P(*(keep(entry) for entry in spec))


def _per_shard(
  impl: str, fn: AttentionFn, q, k, v, ids: AttnIds, *, mesh_axes: MeshAxes
) -> jax.Array:
  call = lambda q, k, v, ids: fn(q, k, v, ids, None)
  mesh = jax.sharding.get_abstract_mesh()
  free = (
    () if mesh.empty else tuple(a for a in mesh.axis_names if not _is(mesh, a, AxisType.Manual))
  )
  if not free:  # no mesh, or inside a shard_map over every axis: the arrays are one shard
    return call(q, k, v, ids)
  explicit = tuple(a for a in free if _is(mesh, a, AxisType.Explicit))
  arrays = (ids.segment_ids, ids.image_ids) + (() if ids.branch_ids is None else (ids.branch_ids,))
  if explicit:
    names = ("q", "k", "v", "segment_ids", "image_ids", "branch_ids")
    _refuse_split_rows(impl, dict(zip(names, (q, k, v) + arrays)))
  batch = _usable_axes(mesh, mesh_axes.batch, q.shape[0])
  heads = _usable_axes(mesh, mesh_axes.heads, q.shape[2])
  b_spec = batch if batch else None
  n_heads = math.prod(mesh.shape[a] for a in heads)
  if heads and k.shape[2] % n_heads:
    repeat = n_heads // math.gcd(k.shape[2], n_heads)
    if (q.shape[2] // k.shape[2]) % repeat:
      heads = ()
    else:  # e.g. 2 kv heads on 4 head shards: each kv head twice, still grouped in order
      kv_spec = _only(P(b_spec), explicit) if explicit else None
      if explicit:
        k, v = jax.reshard(k, kv_spec), jax.reshard(v, kv_spec)
      k, v = (jnp.repeat(x, repeat, axis=2, out_sharding=kv_spec) for x in (k, v))
  if not batch and not heads and not explicit:  # Auto axes that split nothing: XLA replicates
    return call(q, k, v, ids)
  h_spec = heads if heads else None
  x_spec = P(b_spec, None, h_spec, None)
  id_spec = P(b_spec, None)
  if explicit:  # Explicit inputs enter a shard_map exactly as its in_specs say
    q_spec = tuple(jax.typeof(q).sharding.spec) + (None,) * 4
    q, k, v = (jax.reshard(x, _only(x_spec, explicit)) for x in (q, k, v))
    arrays = tuple(jax.reshard(a, _only(id_spec, explicit)) for a in arrays)

  def shard(q, k, v, *id_arrays):
    branch = id_arrays[2] if len(id_arrays) > 2 else None
    return call(q, k, v, AttnIds(id_arrays[0], id_arrays[1], branch, None))

  sharded = jax.shard_map(
    shard,
    mesh=mesh,
    in_specs=(x_spec,) * 3 + (id_spec,) * len(arrays),
    out_specs=x_spec,
    axis_names=set(free),
    check_vma=False,
  )
  out = sharded(q, k, v, *arrays)
  if explicit:  # the output is sharded like q, as the reference's would be
    out = jax.reshard(out, P(q_spec[0], None, q_spec[2], None))
  return out


# --- implementations ----------------------------------------------------------------------------


def _xla(q, k, v, q_ids, kv_ids, *, scale, q_chunk, platform):
  del q_chunk, platform
  return reference.attention_dense(q, k, v, q_ids, kv_ids, scale=scale)


def _xla_chunked(q, k, v, q_ids, kv_ids, *, scale, q_chunk, platform):
  del platform
  return reference.attention_chunked(q, k, v, q_ids, kv_ids, scale=scale, q_chunk=q_chunk)


def _xla_flash(q, k, v, q_ids, kv_ids, *, scale, q_chunk, platform):
  del kv_ids, platform
  return xla_flash.flash_attention(
    q, k, v, q_ids, scale=scale, block=min(q_chunk, xla_flash.DEFAULT_BLOCK)
  )


def _emulated(impl: str, native: str, platform: str) -> bool:
  """False for a kernel lowered for its own platform (compiled), True for cpu (interpret mode
  or emulation); any other platform is an error."""
  if _family(platform) == native:
    return False
  if platform != "cpu":
    raise ValueError(
      f"attention impl {impl!r} runs on {native} (compiled) or cpu (interpret "
      f"mode), not on {platform}; use impl='auto'"
    )
  return True


def _pallas_tpu(q, k, v, q_ids, kv_ids, *, scale, q_chunk, platform):
  del kv_ids, q_chunk
  return pallas_tpu.flash_attention(
    q, k, v, q_ids, scale=scale, interpret=_emulated("pallas_tpu", "tpu", platform)
  )


def _pallas_gpu(q, k, v, q_ids, kv_ids, *, scale, q_chunk, platform):
  del kv_ids, q_chunk
  return pallas_gpu.flash_attention(
    q, k, v, q_ids, scale=scale, interpret=_emulated("pallas_gpu", "gpu", platform)
  )


def _cudnn(q, k, v, q_ids, kv_ids, *, scale, q_chunk, platform):
  del kv_ids, q_chunk
  return cudnn.attention(q, k, v, q_ids, scale=scale, emulate=_emulated("cudnn", "gpu", platform))


register("xla", _xla)
register("xla_chunked", _xla_chunked, auto_backends=("cpu",))
register("xla_flash", _xla_flash, auto_backends=("cpu",), kernel=True)
register("pallas_tpu", _pallas_tpu, auto_backends=("tpu",), kernel=True)
register(
  "pallas_gpu",
  _pallas_gpu,
  auto_backends=("gpu", "cuda", "rocm"),
  kernel=True,
  check=pallas_gpu.compile_check,
)
register("cudnn", _cudnn, kernel=True)
