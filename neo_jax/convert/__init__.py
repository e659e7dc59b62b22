"""Checkpoints in and out: HF NEO <-> neo-jax parameters, Qwen3 -> NEO, logit checks.

Public API (imported on first use, so `neo-jax convert --help` stays instant):

  load_checkpoint(path, shardings=None, **compute) -> (params, NeoConfig)   any kind of dir
  register_kind(name, detect, load, holds)          add a kind (e.g. training run dirs)
  save_params(dir, params, config, tokenizer_dir=None) / load_params(dir, shardings, **compute)
  read_hf_neo(dir, **compute) / write_hf_neo(dir, params, config, ...)
  qwen3_to_neo(qwen3_dir, num_prebuffer_layers, ...) -> (params, NeoConfig)
  hf_inputs_to_batch(input_ids, pixel_values, grid_hw, config) -> batch of one row
  compare_logits(params, config, golden) -> {max_abs_diff, mean_kl, ...}
"""

import importlib

_EXPORTS = {
    "load_checkpoint": "neo_jax.convert.loading",
    "register_kind": "neo_jax.convert.loading",
    "detect_kind": "neo_jax.convert.loading",
    "save_params": "neo_jax.convert.jax_checkpoint",
    "load_params": "neo_jax.convert.jax_checkpoint",
    "read_hf_neo": "neo_jax.convert.hf_checkpoint",
    "write_hf_neo": "neo_jax.convert.hf_checkpoint",
    "qwen3_to_neo": "neo_jax.convert.qwen3",
    "hf_inputs_to_batch": "neo_jax.convert.hf_inputs",
    "patches_to_token_blocks": "neo_jax.convert.hf_inputs",
    "compare_logits": "neo_jax.convert.compare",
    "read_golden": "neo_jax.convert.compare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'neo_jax.convert' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
