"""An independent PyTorch NEO written from docs/reference/neo.md, for parity tests.

Functional code over an HF-keyed state dict and the HF config.json dict; it uses none of
neo_jax's model, rope, mask or position code, so agreement with the Flax model means both
read docs/reference/neo.md the same way (#patch-embedding, #decoder-layer,
#multi-head-native-attention, #native-rope, #attention-mask, #output-head).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LAYER = "language_model.model.layers.{}."


class Dims:
  """The numbers the forward pass needs, read from an HF NEO config.json dict."""

  def __init__(self, hf: Mapping):
    llm, vision = hf["llm_config"], hf["vision_config"]
    self.hidden = llm["hidden_size"]
    self.heads = llm["num_attention_heads"]
    self.kv_heads = llm["num_key_value_heads"]
    self.head_dim = llm["head_dim"]
    self.layers = llm["num_hidden_layers"]
    self.intermediate = llm["intermediate_size"]
    self.vocab = llm["vocab_size"]
    self.eps = llm["rms_norm_eps"]
    self.theta_t = llm["rope_theta"]
    self.theta_hw = llm["rope_theta_hw"]
    self.vision_hidden = vision["hidden_size"]
    self.theta_v = vision["rope_theta_vision"]
    self.patch = vision["patch_size"]
    self.img_context = hf["img_context_token_id"]
    self.img_start = hf["img_start_token_id"]
    self.img_end = hf["img_end_token_id"]


# --- positions (docs/reference/neo.md#index-rule) ----------------------------------------------


def thw_indexes(input_ids: Tensor, grid_hw: Tensor, dims: Dims) -> Tensor:
  """[3, L] T/H/W of one sequence: T = cumsum(s + n) - 1; image tokens take (row, col)."""
  prev = torch.cat([torch.full((1,), -1, dtype=input_ids.dtype), input_ids[:-1]])
  s = (prev == dims.img_start).long()
  n = (input_ids != dims.img_context).long()
  t = torch.cumsum(s + n, 0) - 1
  rows, cols = [], []
  for h16, w16 in grid_hw.tolist():
    h, w = h16 // 2, w16 // 2
    k = torch.arange(h * w)
    rows.append(k // w)
    cols.append(k % w)
  h_pos = torch.zeros_like(t)
  w_pos = torch.zeros_like(t)
  ctx = input_ids == dims.img_context
  if rows:
    h_pos[ctx] = torch.cat(rows)
    w_pos[ctx] = torch.cat(cols)
  return torch.stack([t, h_pos, w_pos])


# --- decoder (docs/reference/neo.md#decoder-layer, #multi-head-native-attention, #native-rope,
# #attention-mask, #output-head) ----------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
  x32 = x.float()
  x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
  return weight * x32.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
  half = x.shape[-1] // 2
  return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
  """HF rotate_half RoPE. x [heads, L, D], positions [L]."""
  dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
  freqs = positions.float()[:, None] * inv_freq[None, :]
  emb = torch.cat([freqs, freqs], dim=-1)
  return x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)


def mixed_mask(t: Tensor) -> Tensor:
  """[L, L] float 0 / -inf: allowed(i, j) = (T_i == T_j) or j <= i."""
  length = t.shape[0]
  causal = torch.arange(length)[None, :] <= torch.arange(length)[:, None]
  allowed = causal | (t[:, None] == t[None, :])
  return torch.zeros(length, length).masked_fill(~allowed, float("-inf"))


def decoder_layer(
  sd: Mapping[str, Tensor],
  layer: int,
  dims: Dims,
  x: Tensor,
  thw: Tensor,
  mask: Tensor | None = None,
) -> Tensor:
  """One NEO layer on x [L, hidden] with positions thw [3, L]; `mask` is mixed_mask(thw[0])
  (computed here when not given)."""
  p = LAYER.format(layer)
  w = lambda name: sd[p + name]
  length = x.shape[0]
  d, dhw = dims.head_dim, dims.head_dim // 2
  t_pos, h_pos, w_pos = thw
  hn = rms_norm(x, w("input_layernorm.weight"), dims.eps)

  def split_heads(y: Tensor, heads: int) -> Tensor:  # [L, heads*d] -> [heads, L, d]
    return y.view(length, heads, d).transpose(0, 1)

  def qk(prefix: str, heads: int) -> Tensor:
    t = split_heads(F.linear(hn, w(f"self_attn.{prefix}_proj.weight")), heads)
    hw = split_heads(F.linear(hn, w(f"self_attn.{prefix}_proj_hw.weight")), heads)
    t = rope(rms_norm(t, w(f"self_attn.{prefix}_norm.weight"), dims.eps), t_pos, dims.theta_t)
    hh = rope(
      rms_norm(hw[..., :dhw], w(f"self_attn.{prefix}_norm_h.weight"), dims.eps),
      h_pos,
      dims.theta_hw,
    )
    ww = rope(
      rms_norm(hw[..., dhw:], w(f"self_attn.{prefix}_norm_w.weight"), dims.eps),
      w_pos,
      dims.theta_hw,
    )
    return torch.cat([t, hh, ww], dim=-1)

  q = qk("q", dims.heads)  # [nH, L, 2d]
  k = qk("k", dims.kv_heads)  # [nKV, L, 2d]
  v = split_heads(F.linear(hn, w("self_attn.v_proj.weight")), dims.kv_heads)
  groups = dims.heads // dims.kv_heads
  k = k.repeat_interleave(groups, dim=0)  # repeat_kv: KV head j serves Q heads j*g .. j*g+g-1
  v = v.repeat_interleave(groups, dim=0)
  scores = q @ k.transpose(1, 2) * d**-0.5 + (mixed_mask(t_pos) if mask is None else mask)
  probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
  attn = (probs @ v).transpose(0, 1).reshape(length, dims.heads * d)
  h = x + F.linear(attn, w("self_attn.o_proj.weight"))
  hn = rms_norm(h, w("post_attention_layernorm.weight"), dims.eps)
  gate = F.silu(F.linear(hn, w("mlp.gate_proj.weight")))
  mlp = F.linear(gate * F.linear(hn, w("mlp.up_proj.weight")), w("mlp.down_proj.weight"))
  return h + mlp


# --- vision (docs/reference/neo.md#patch-embedding) ---------------------------------------------


def vision_rotary(f: Tensor, x_pos: Tensor, y_pos: Tensor, theta: float) -> Tensor:
  """Interleaved pairs; first half of channels rotated by column x, second half by row y."""
  part = f.shape[-1] // 2
  omega = theta ** (-2.0 * torch.arange(part // 2, dtype=torch.float64) / part)

  def rotate(chunk: Tensor, pos: Tensor) -> Tensor:
    angle = (pos.double()[:, None] * omega[None, :]).float()
    pairs = torch.view_as_complex(chunk.float().reshape(chunk.shape[0], -1, 2).contiguous())
    rotated = pairs * torch.polar(torch.ones_like(angle), angle)
    return torch.view_as_real(rotated).reshape(chunk.shape)

  return torch.cat([rotate(f[:, :part], x_pos), rotate(f[:, part:], y_pos)], dim=-1).to(f.dtype)


def vision(sd: Mapping[str, Tensor], dims: Dims, pixel_values: Tensor, grid_hw: Tensor) -> Tensor:
  """[N_patches, 768] row-major patches per image -> [sum h16*w16/4, hidden] visual tokens."""
  e = "vision_model.embeddings."
  p = dims.patch
  x = F.conv2d(
    pixel_values.view(-1, 3, p, p),
    sd[e + "patch_embedding.weight"],
    sd[e + "patch_embedding.bias"],
    stride=p,
  )
  f = F.gelu(x.flatten(1))
  outputs, start = [], 0
  for h16, w16 in grid_hw.tolist():
    n = h16 * w16
    k = torch.arange(n)
    img = vision_rotary(f[start : start + n], k % w16, k // w16, dims.theta_v)
    grid = img.view(h16, w16, -1).permute(2, 0, 1)[None]
    merged = F.conv2d(
      grid, sd[e + "dense_embedding.weight"], sd[e + "dense_embedding.bias"], stride=2
    )
    outputs.append(merged.flatten(2)[0].transpose(0, 1))
    start += n
  return torch.cat(outputs)


# --- whole model ----------------------------------------------------------------------------


@torch.no_grad()
def neo_logits(
  sd: Mapping[str, Tensor],
  hf_config: Mapping,
  input_ids: Tensor,
  pixel_values: Tensor | None = None,
  grid_hw: Tensor | None = None,
) -> Tensor:
  """Logits [L, vocab] of one sequence (batch size 1, as the HF model)."""
  return neo_forward(sd, hf_config, input_ids, pixel_values, grid_hw)


def neo_forward(
  sd: Mapping[str, Tensor],
  hf_config: Mapping,
  input_ids: Tensor,
  pixel_values: Tensor | None = None,
  grid_hw: Tensor | None = None,
) -> Tensor:
  """`neo_logits` under autograd (gradients reach every tensor of `sd` that requires them);
  the mask is built once, as the HF model does."""
  dims = Dims(hf_config)
  x = F.embedding(input_ids, sd["language_model.model.embed_tokens.weight"])
  if grid_hw is None:
    grid_hw = torch.zeros((0, 2), dtype=torch.long)
  if len(grid_hw):
    x = x.clone()
    x[input_ids == dims.img_context] = vision(sd, dims, pixel_values, grid_hw).to(x.dtype)
  thw = thw_indexes(input_ids, grid_hw, dims)
  mask = mixed_mask(thw[0])
  for layer in range(dims.layers):
    x = decoder_layer(sd, layer, dims, x, thw, mask)
  x = rms_norm(x, sd["language_model.model.norm.weight"], dims.eps)
  head = sd.get("language_model.lm_head.weight", sd["language_model.model.embed_tokens.weight"])
  return F.linear(x, head)


def random_state_dict(
  hf_config: Mapping, seed: int = 0, tied: bool = True, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
  """Every tensor of docs/reference/neo.md#state-dict-keys, random and non-zero (H/W included).

  Projections are N(0, 1/fan_in) so activations stay O(1); norm weights are 1 + N(0, 0.1^2)
  so a swapped norm shows.
  """
  dims = Dims(hf_config)
  g = torch.Generator().manual_seed(seed)
  d, c, hid = dims.head_dim, dims.vision_hidden, dims.hidden
  lin = lambda out, inp: torch.randn(out, inp, generator=g) / math.sqrt(inp)
  norm = lambda n: 1.0 + 0.1 * torch.randn(n, generator=g)
  sd = {
    "vision_model.embeddings.patch_embedding.weight": torch.randn(
      c, 3, dims.patch, dims.patch, generator=g
    )
    / math.sqrt(768),
    "vision_model.embeddings.patch_embedding.bias": 0.1 * torch.randn(c, generator=g),
    "vision_model.embeddings.dense_embedding.weight": torch.randn(hid, c, 2, 2, generator=g)
    / math.sqrt(4 * c),
    "vision_model.embeddings.dense_embedding.bias": 0.1 * torch.randn(hid, generator=g),
    "language_model.model.embed_tokens.weight": torch.randn(dims.vocab, hid, generator=g),
  }
  for layer in range(dims.layers):
    p = LAYER.format(layer)
    sd[p + "self_attn.q_proj.weight"] = lin(dims.heads * d, hid)
    sd[p + "self_attn.k_proj.weight"] = lin(dims.kv_heads * d, hid)
    sd[p + "self_attn.v_proj.weight"] = lin(dims.kv_heads * d, hid)
    sd[p + "self_attn.o_proj.weight"] = lin(hid, dims.heads * d)
    sd[p + "self_attn.q_proj_hw.weight"] = lin(dims.heads * d, hid)
    sd[p + "self_attn.k_proj_hw.weight"] = lin(dims.kv_heads * d, hid)
    sd[p + "self_attn.q_norm.weight"] = norm(d)
    sd[p + "self_attn.k_norm.weight"] = norm(d)
    for name in ("q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w"):
      sd[p + f"self_attn.{name}.weight"] = norm(d // 2)
    sd[p + "mlp.gate_proj.weight"] = lin(dims.intermediate, hid)
    sd[p + "mlp.up_proj.weight"] = lin(dims.intermediate, hid)
    sd[p + "mlp.down_proj.weight"] = lin(hid, dims.intermediate)
    sd[p + "input_layernorm.weight"] = norm(hid)
    sd[p + "post_attention_layernorm.weight"] = norm(hid)
  sd["language_model.model.norm.weight"] = norm(hid)
  if not tied:
    sd["language_model.lm_head.weight"] = lin(dims.vocab, hid)
  return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def random_images(grid_hws: list[tuple[int, int]], seed: int = 0) -> tuple[Tensor, Tensor]:
  """Normalised-looking pixel_values [sum h16*w16, 768] and grid_hw [n, 2] (16-px grids)."""
  g = torch.Generator().manual_seed(seed)
  pixels = [torch.randn(h * w, 768, generator=g) for h, w in grid_hws]
  return torch.cat(pixels), torch.tensor(grid_hws, dtype=torch.long)


def sequence_with_images(
  grid_hws: list[tuple[int, int]], dims_or_config, seed: int = 0, text_between: int = 3
) -> Tensor:
  """Text, then per image `<img>` + `<IMG_CONTEXT>` x (h16*w16/4) + `</img>` + text."""
  dims = dims_or_config if isinstance(dims_or_config, Dims) else Dims(dims_or_config)
  g = torch.Generator().manual_seed(seed)
  text = lambda n: torch.randint(0, 1000, (n,), generator=g).tolist()
  ids = text(text_between)
  for h, w in grid_hws:
    ids += [dims.img_start] + [dims.img_context] * (h * w // 4) + [dims.img_end]
    ids += text(text_between)
  return torch.tensor(ids, dtype=torch.long)
