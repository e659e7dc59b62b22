"""Checkpoints in and out: HF NEO <-> neo-jax parameters, Qwen3 -> NEO, logit checks.

  load_checkpoint(path, shardings=None, **compute) -> (params, NeoConfig)   any kind of dir
  register_kind(name, detect, load, holds)          add a kind of checkpoint directory
  save_params(dir, params, config, tokenizer_dir=None) / load_params(dir, shardings, **compute)
  read_hf_neo(dir, **compute) / write_hf_neo(dir, params, config, ...)
  qwen3_to_neo(qwen3_dir, num_prebuffer_layers, ...) -> (params, NeoConfig)
  hf_inputs_to_batch(input_ids, pixel_values, grid_hw, config) -> batch of one row
  compare_logits(params, config, golden) -> {max_abs_diff, mean_kl, ...}

Module map: mapping (the HF <-> JAX key table, both directions), safetensors_io (our own
reader / writer), files (output directories, shards, carried tokenizer files), hf_checkpoint,
jax_checkpoint, qwen3, hf_inputs, compare, loading (the kinds of checkpoint directory),
progress. The `neo-jax convert` and `compare-logits` commands live in neo_jax/cli/.
"""

from neo_jax.convert.compare import compare_logits, read_golden
from neo_jax.convert.hf_checkpoint import read_hf_neo, write_hf_neo
from neo_jax.convert.hf_inputs import hf_inputs_to_batch, patches_to_token_blocks
from neo_jax.convert.jax_checkpoint import load_params, save_params
from neo_jax.convert.loading import detect_kind, load_checkpoint, register_kind
from neo_jax.convert.qwen3 import qwen3_to_neo

__all__ = [
  "compare_logits",
  "detect_kind",
  "hf_inputs_to_batch",
  "load_checkpoint",
  "load_params",
  "patches_to_token_blocks",
  "qwen3_to_neo",
  "read_golden",
  "read_hf_neo",
  "register_kind",
  "save_params",
  "write_hf_neo",
]
