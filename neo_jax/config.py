"""NeoConfig: every architecture fact of a NEO model, plus how to compute it.

Presets `tiny`, `neo_2b` and `neo_9b` follow docs/architecture.md (facts from the released
NEO scripts: 40 layers of which 12 pre-Buffer for 2B, 42 of which 6 for 9B). The same object
reads and writes the HF `config.json` of a NEO checkpoint (`model_type: neo_chat`), so a
converted checkpoint carries its own architecture.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

# NEO's added token ids (NEO's VLMEvalKit wrapper confirms the three image ids).
IMG_CONTEXT_TOKEN_ID = 151669
IMG_START_TOKEN_ID = 151670
IMG_END_TOKEN_ID = 151671
IM_START_TOKEN_ID = 151644
IM_END_TOKEN_ID = 151645
PAD_TOKEN_ID = 151643  # <|endoftext|>

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "xla_chunked", "xla_flash", "pallas_tpu", "pallas_gpu", "cudnn", "auto")
# "" = the backend of the process that traces the model; others lower for that platform
PLATFORMS = ("", "cpu", "gpu", "cuda", "rocm", "tpu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_attention")


@dataclasses.dataclass(frozen=True)
class NeoConfig:
  """Architecture (first block) and computation (second block) of a NEO model."""

  # --- architecture -------------------------------------------------------------------------
  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 6144
  num_hidden_layers: int = 40  # total: pre-Buffer + post-LLM
  num_prebuffer_layers: int = 12  # HF `extra_num_layers`: layers [0, E) are the pre-Buffer
  num_attention_heads: int = 16
  num_key_value_heads: int = 8
  head_dim: int = 128  # temporal sub-head; the H and W sub-heads are head_dim // 2 each
  rope_theta: float = 1_000_000.0  # theta_T
  rope_theta_hw: float = 10_000.0  # theta_HW, shared by the H and W sub-heads
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 32768  # informational; RoPE tables are computed on the fly
  # vision (the "patch embedding layer")
  vision_hidden_size: int = 1024
  patch_size: int = 16
  downsample_ratio: float = 0.5
  rope_theta_vision: float = 1000.0
  num_channels: int = 3
  min_pixels: int = 65_536
  max_pixels: int = 4_194_304
  # special tokens
  img_context_token_id: int = IMG_CONTEXT_TOKEN_ID
  img_start_token_id: int = IMG_START_TOKEN_ID
  img_end_token_id: int = IMG_END_TOKEN_ID
  eos_token_id: int = IM_END_TOKEN_ID
  pad_token_id: int = PAD_TOKEN_ID
  template: str = "neo1_0"

  # --- computation --------------------------------------------------------------------------
  dtype: str = "float32"  # activations / matmul inputs
  param_dtype: str = "float32"  # stored parameters (fp32 master weights for training)
  attention_impl: str = "xla"
  attention_q_chunk: int = 512  # query block of the chunked XLA attention
  # the platform the model is traced for: "" = this process's backend; "tpu" / "cuda" on a
  # host without that device choose and trace the compiled kernels for it (jax.export)
  platform: str = ""
  remat_policy: str = "none"

  def __post_init__(self):
    checks = [
      (self.hidden_size > 0 and self.vocab_size > 0, "hidden_size and vocab_size must be > 0"),
      (
        0 <= self.num_prebuffer_layers <= self.num_hidden_layers,
        f"num_prebuffer_layers={self.num_prebuffer_layers} must lie in [0, num_hidden_layers="
        f"{self.num_hidden_layers}]",
      ),
      (
        self.num_attention_heads % self.num_key_value_heads == 0,
        f"num_attention_heads={self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}",
      ),
      (self.head_dim % 4 == 0, f"head_dim={self.head_dim} must be a multiple of 4"),
      (
        self.vision_hidden_size % 4 == 0,
        f"vision_hidden_size={self.vision_hidden_size} must be a multiple of 4",
      ),
      (self.merge_size == 2, f"downsample_ratio={self.downsample_ratio} must be 0.5 (2x2 merge)"),
      (self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {DTYPES}"),
      (self.param_dtype in DTYPES, f"param_dtype={self.param_dtype!r} is not one of {DTYPES}"),
      (
        self.attention_impl in ATTENTION_IMPLS,
        f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}",
      ),
      (self.platform in PLATFORMS, f"platform={self.platform!r} is not one of {PLATFORMS}"),
      (
        self.remat_policy in REMAT_POLICIES,
        f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}",
      ),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"NeoConfig: {message}")

  # --- derived facts ------------------------------------------------------------------------
  @property
  def num_llm_layers(self) -> int:
    """Post-LLM layers (the Qwen3 layers)."""
    return self.num_hidden_layers - self.num_prebuffer_layers

  @property
  def hw_head_dim(self) -> int:
    """Width of each of the H and W sub-heads."""
    return self.head_dim // 2

  @property
  def qk_head_dim(self) -> int:
    """Query/key width after concatenating T, H and W: 2 * head_dim."""
    return self.head_dim + 2 * self.hw_head_dim

  @property
  def merge_size(self) -> int:
    return int(round(1 / self.downsample_ratio))

  @property
  def token_pixels(self) -> int:
    """Side of the pixel block that becomes one LLM token (32 for 16-px patches, 2x2 merge)."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    return self.num_channels * self.patch_size * self.patch_size

  def replace(self, **changes: Any) -> NeoConfig:
    return dataclasses.replace(self, **changes)

  # --- HF config.json -----------------------------------------------------------------------
  def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """The `config.json` of an HF NEO directory (NEOChatConfig.to_dict layout)."""
    llm = {
      "architectures": ["Qwen3ForCausalLM"],
      "model_type": "qwen3",
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_hidden_layers,
      "extra_num_layers": self.num_prebuffer_layers,
      "num_attention_heads": self.num_attention_heads,
      "num_key_value_heads": self.num_key_value_heads,
      "head_dim": self.head_dim,
      "hidden_act": "silu",
      "attention_bias": False,
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_theta_hw": self.rope_theta_hw,
      "max_position_embeddings": self.max_position_embeddings,
      "max_position_embeddings_hw": 10000,
      "tie_word_embeddings": self.tie_word_embeddings,
      "bos_token_id": PAD_TOKEN_ID,
      "eos_token_id": self.eos_token_id,
      "pad_token_id": self.pad_token_id,
      "torch_dtype": torch_dtype,
    }
    vision = {
      "model_type": "neo_vision",
      "hidden_size": self.vision_hidden_size,
      "llm_hidden_size": self.hidden_size,
      "downsample_ratio": self.downsample_ratio,
      "rope_theta_vision": self.rope_theta_vision,
      "max_position_embeddings_vision": 10000,
      "num_channels": self.num_channels,
      "patch_size": self.patch_size,
      "min_pixels": self.min_pixels,
      "max_pixels": self.max_pixels,
    }
    return {
      "model_type": "neo_chat",
      "architectures": ["NEOChatModel"],
      "auto_map": {
        "AutoConfig": "configuration_neo_chat.NEOChatConfig",
        "AutoModel": "modeling_neo_chat.NEOChatModel",
        "AutoModelForCausalLM": "modeling_neo_chat.NEOChatModel",
      },
      "vision_config": vision,
      "llm_config": llm,
      "downsample_ratio": self.downsample_ratio,
      "template": self.template,
      "use_backbone_lora": 0,
      "use_llm_lora": 0,
      "tie_word_embeddings": self.tie_word_embeddings,
      "img_context_token_id": self.img_context_token_id,
      "img_start_token_id": self.img_start_token_id,
      "img_end_token_id": self.img_end_token_id,
      # generation stops at the template's separator (<|im_end|> for neo1_0), which need not
      # be the LLM's own eos; kept at the top level where the published files have no key
      "eos_token_id": self.eos_token_id,
      "pad_token_id": self.pad_token_id,
      "torch_dtype": torch_dtype,
    }

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], **compute: Any) -> NeoConfig:
    """Reads an HF NEO `config.json` dict; `compute` sets the computation fields."""
    if "llm_config" not in hf or "vision_config" not in hf:
      missing = [k for k in ("llm_config", "vision_config") if k not in hf]
      raise ValueError(
        f"config.json: not a NEO config, missing {missing} (model_type={hf.get('model_type')!r})"
      )
    llm, vision = hf["llm_config"], hf["vision_config"]

    def get(section: Mapping[str, Any], key: str, default: Any = _REQUIRED, where: str = ""):
      if key not in section:
        if default is _REQUIRED:
          raise ValueError(f"config.json: missing {where}{key}")
        return default
      return _scalar(section[key], f"{where}{key}")

    num_layers = int(get(llm, "num_hidden_layers", where="llm_config."))
    hidden = int(get(llm, "hidden_size", where="llm_config."))
    prebuffer = llm.get("extra_num_layers", hf.get("extra_num_layers"))
    if prebuffer is None:
      prebuffer = _KNOWN_PREBUFFER.get((hidden, num_layers), 0)
    rope_theta = llm.get("rope_theta")
    if rope_theta is None:  # transformers 5 keeps it in rope_parameters
      rope_theta = (llm.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
    heads = int(get(llm, "num_attention_heads", where="llm_config."))
    tie = hf.get("tie_word_embeddings", llm.get("tie_word_embeddings", False))
    ratio = float(
      get(vision, "downsample_ratio", hf.get("downsample_ratio", 0.5), "vision_config.")
    )
    fields = dict(
      vocab_size=int(get(llm, "vocab_size", where="llm_config.")),
      hidden_size=hidden,
      intermediate_size=int(get(llm, "intermediate_size", where="llm_config.")),
      num_hidden_layers=num_layers,
      num_prebuffer_layers=int(_scalar(prebuffer, "extra_num_layers")),
      num_attention_heads=heads,
      num_key_value_heads=int(get(llm, "num_key_value_heads", heads, "llm_config.")),
      head_dim=int(get(llm, "head_dim", hidden // heads, "llm_config.")),
      rope_theta=float(_scalar(rope_theta, "llm_config.rope_theta")),
      rope_theta_hw=float(get(llm, "rope_theta_hw", 10_000.0, "llm_config.")),
      rms_norm_eps=float(get(llm, "rms_norm_eps", 1e-6, "llm_config.")),
      tie_word_embeddings=bool(_scalar(tie, "tie_word_embeddings")),
      max_position_embeddings=int(get(llm, "max_position_embeddings", 32768, "llm_config.")),
      vision_hidden_size=int(get(vision, "hidden_size", 1024, "vision_config.")),
      patch_size=int(get(vision, "patch_size", 16, "vision_config.")),
      downsample_ratio=ratio,
      rope_theta_vision=float(get(vision, "rope_theta_vision", 10_000.0, "vision_config.")),
      num_channels=int(get(vision, "num_channels", 3, "vision_config.")),
      min_pixels=int(get(vision, "min_pixels", 65_536, "vision_config.")),
      max_pixels=int(get(vision, "max_pixels", 4_194_304, "vision_config.")),
      img_context_token_id=int(hf.get("img_context_token_id", IMG_CONTEXT_TOKEN_ID)),
      img_start_token_id=int(hf.get("img_start_token_id", IMG_START_TOKEN_ID)),
      img_end_token_id=int(hf.get("img_end_token_id", IMG_END_TOKEN_ID)),
      template=str(hf.get("template", "neo1_0")),
      eos_token_id=int(_scalar(hf.get("eos_token_id", IM_END_TOKEN_ID), "eos_token_id")),
      pad_token_id=int(_scalar(hf.get("pad_token_id", PAD_TOKEN_ID), "pad_token_id")),
    )
    llm_hidden = vision.get("llm_hidden_size")
    if (
      llm_hidden is not None and int(_scalar(llm_hidden, "vision_config.llm_hidden_size")) != hidden
    ):
      raise ValueError(
        f"config.json: vision_config.llm_hidden_size={llm_hidden} differs from "
        f"llm_config.hidden_size={hidden}"
      )
    fields.update(compute)
    return cls(**fields)

  @classmethod
  def from_hf_file(cls, path: str | os.PathLike, **compute: Any) -> NeoConfig:
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    try:
      with open(path) as f:
        hf = json.load(f)
    except FileNotFoundError:
      raise FileNotFoundError(f"config.json not found: {path}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(hf, **compute)

  def save_hf(self, directory: str | os.PathLike, torch_dtype: str = "bfloat16") -> str:
    path = os.path.join(os.fspath(directory), "config.json")
    with open(path, "w") as f:
      json.dump(self.to_hf_dict(torch_dtype), f, indent=2, sort_keys=False)
      f.write("\n")
    return path


_REQUIRED = object()

# Pre-Buffer depth of the released models, for config files that do not record it.
_KNOWN_PREBUFFER = {(2048, 40): 12, (4096, 42): 6}


def _scalar(value: Any, name: str) -> Any:
  """Accepts a scalar or a one-element list (NEOVisionConfig stores some fields as 1-tuples)."""
  if isinstance(value, (list, tuple)):
    if len(value) != 1:
      raise ValueError(f"config.json: {name} must be a scalar or a one-element list, got {value!r}")
    return value[0]
  return value


def tiny(**overrides: Any) -> NeoConfig:
  """A NEO small enough to train on two CPU cores in minutes; same code paths as neo_2b."""
  base = NeoConfig(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_prebuffer_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vision_hidden_size=128,
    tie_word_embeddings=True,
    min_pixels=64 * 64,
    max_pixels=128 * 128,
    max_position_embeddings=4096,
  )
  return base.replace(**overrides)


def neo_2b(**overrides: Any) -> NeoConfig:
  """NEO-2B: Qwen3-1.7B-Base with a 12-layer pre-Buffer (40 layers in all)."""
  return NeoConfig().replace(**overrides)


def neo_9b(**overrides: Any) -> NeoConfig:
  """NEO-9B: Qwen3-8B-Base with a 6-layer pre-Buffer (42 layers in all), untied head."""
  base = NeoConfig(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=42,
    num_prebuffer_layers=6,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
    max_position_embeddings=40960,
  )
  return base.replace(**overrides)


PRESETS = {"tiny": tiny, "neo_2b": neo_2b, "neo_9b": neo_9b}


def preset(name: str, **overrides: Any) -> NeoConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name](**overrides)
