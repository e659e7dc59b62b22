"""cuDNN flash attention for text-only packed rows: causal within each packed segment.

Without images and preference branches (text-only SFT) the rule of `neo_jax.ops.masks` is
"same segment, causal". cuDNN's fused attention expresses exactly that with its packed
(ragged) layout: per row, the start and length of each segment; causal within a segment;
tokens outside every segment (padding) see nothing. `jax.nn.dot_product_attention` does not
take segment offsets (one sequence length per row with padding at the end, and V as wide as
K), so this calls the function behind it, `jax._src.cudnn.fused_attention_stablehlo.
dot_product_attention` (same signature in jax 0.10.2 and 0.11), with

  q_offsets = kv_offsets  int32 [B, M + 1]  start of each segment, -1 past the last
  q_seqlen = kv_seqlen    int32 [B, M]      its length, -1 past the last
  mask_type PADDING_CAUSAL, layout BTNH, GQA.

jax scales that one kv offset table by K's per-token stride (kv heads x Dqk) for K and V alike,
which is V's stride only when Dv = Dqk, so V is zero-padded to the query/key width (NEO: 128
to 256; the zeros add no output, the padded columns are sliced off). jax < 0.11.1 scales the kv
offsets by the query heads instead (fixed upstream for GQA after 0.11.0): there K and V are
repeated to the query heads first.

Preconditions:
  - static (ValueError here): bf16 or fp16 inputs, max_segments >= 2;
  - per row, checked in the graph (ids are data, so not at trace time): no image ids, no
    branch ids, at most `max_segments` segments. A row that breaks one gets NaN outputs, so a
    training step stops on it (nan_policy "stop") instead of learning from another mask;
  - shared with the kernels (`masks.kv_ranges`): each segment is one contiguous span;
  - the GPU's (raised by jax when tracing on a GPU): Hopper or newer for the packed layout and
    for widths above 128.

Off a GPU the same offsets and lengths become a dense mask for
`jax.nn.dot_product_attention(implementation="xla")`: the CPU tests check this plumbing, and
that the cuDNN call lowers for CUDA. That cuDNN reads offsets and lengths the same way is what
only a GPU checks (`make device-check`, part kernel_check, impl cudnn on a text-only row).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from neo_jax.ops import flash_common as fc
from neo_jax.ops.masks import AttnIds

try:  # the packed-layout entry point behind jax.nn.dot_product_attention(implementation="cudnn")
  from jax._src.cudnn import fused_attention_stablehlo as _fas
except ImportError:  # pragma: no cover
  _fas = None

MAX_SEGMENTS = 64  # default bound on the segments of one row (a static shape of the layout)
KV_OFFSETS_GQA_FIXED = jax.__version_info__ >= (0, 11, 1)


class PackedLayout(NamedTuple):
  offsets: jax.Array  # int32 [B, M + 1]: start of each segment, -1 past the last
  seqlens: jax.Array  # int32 [B, M]: its length, -1 past the last
  count: jax.Array  # int32 [B]: segments in the row
  ok: jax.Array  # bool [B]: the row meets the per-row preconditions


def packed_layout(ids: AttnIds, max_segments: int) -> PackedLayout:
  """cuDNN's packed layout of each row: the start and length of every run of one non-zero
  segment id (-1 past the last), how many there are, and whether the row meets this path's
  per-row preconditions (text only, at most `max_segments` segments)."""
  seg = ids.segment_ids.astype(jnp.int32)
  valid = seg != 0
  pad = jnp.zeros_like(seg[:, :1])
  starts_l = valid & (seg != jnp.concatenate([pad, seg[:, :-1]], axis=1))
  ends_l = valid & (seg != jnp.concatenate([seg[:, 1:], pad], axis=1))
  first = lambda mask: jax.vmap(lambda m: jnp.nonzero(m, size=max_segments, fill_value=-1)[0])(
    mask
  ).astype(jnp.int32)
  starts, last = first(starts_l), first(ends_l)
  seqlens = jnp.where(starts >= 0, last + 1 - starts, -1)
  offsets = jnp.concatenate([starts, jnp.full_like(starts[:, :1], -1)], axis=1)
  count = starts_l.sum(axis=1).astype(jnp.int32)
  ok = (count <= max_segments) & jnp.all(ids.image_ids == 0, axis=1)
  if ids.branch_ids is not None:
    ok = ok & jnp.all(ids.branch_ids == 0, axis=1)
  return PackedLayout(offsets, seqlens, count, ok)


def layout_mask(offsets: jax.Array, seqlens: jax.Array, length: int) -> jax.Array:
  """bool [B, L, L]: the mask cuDNN's packed causal attention applies for these offsets and
  lengths (token t is in segment m iff offsets[m] <= t < offsets[m] + seqlens[m])."""
  t = jnp.arange(length, dtype=jnp.int32)
  lo, hi = offsets[:, None, :-1], offsets[:, None, :-1] + seqlens[:, None, :]
  inside = (t[None, :, None] >= lo) & (t[None, :, None] < hi) & (seqlens[:, None, :] > 0)
  member = jnp.where(inside.any(axis=-1), jnp.argmax(inside, axis=-1), -1)  # [B, L]
  same = (member[:, :, None] == member[:, None, :]) & (member[:, :, None] >= 0)
  return same & (t[None, None, :] <= t[None, :, None])


def _cudnn_packed(q, k, v, layout, scale: float):
  if _fas is None:  # pragma: no cover
    raise ValueError("cudnn attention: this jax has no cuDNN fused attention")
  return _fas.dot_product_attention(
    q,
    k,
    v,
    q_seqlen=layout.seqlens,
    kv_seqlen=layout.seqlens,
    q_offsets=layout.offsets,
    kv_offsets=layout.offsets,
    scale=scale,
    mask_type=_fas.MaskType.PADDING_CAUSAL,
    qkv_layout="BTNH",
  )


def _xla_packed(q, k, v, layout, scale: float):
  mask = layout_mask(layout.offsets, layout.seqlens, q.shape[1])
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask[:, None], scale=scale, implementation="xla"
  )


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  ids: AttnIds,
  *,
  scale: float,
  max_segments: int = MAX_SEGMENTS,
  emulate: bool | None = None,
) -> jax.Array:
  """Self-attention of text-only packed rows: q [B, L, Hq, Dqk], k [B, L, Hkv, Dqk],
  v [B, L, Hkv, Dv] -> [B, L, Hq, Dv]; padding rows exactly 0, rows that break the
  preconditions NaN. `emulate`: None runs cuDNN on GPU and the XLA emulation elsewhere."""
  if ids.positions is not None:
    raise ValueError("cudnn attention: self-attention only (no explicit positions)")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"cudnn attention: needs bfloat16 or float16 inputs, got {q.dtype}")
  if max_segments < 2:
    raise ValueError(f"cudnn attention: max_segments must be >= 2, got {max_segments}")
  if emulate is None:
    emulate = not fc.on_backend("gpu")
  layout = packed_layout(ids, max_segments)
  valid = (ids.segment_ids != 0)[:, :, None, None]
  on_tokens = lambda x: jnp.where(valid, x, jnp.zeros((), x.dtype))  # padding tokens: 0, no grad
  dv = v.shape[-1]
  q, k, v = on_tokens(q), on_tokens(k), on_tokens(fc.pad_last(v, q.shape[-1]))
  group = q.shape[2] // k.shape[2]
  if group > 1 and not emulate and not KV_OFFSETS_GQA_FIXED:
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  run = _xla_packed if emulate else _cudnn_packed
  out = on_tokens(run(q, k, v, layout, float(scale))[..., :dv])
  return jnp.where(layout.ok[:, None, None, None], out, jnp.full((), jnp.nan, out.dtype))
