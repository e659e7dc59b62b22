"""Sharded loading of a starting checkpoint: placed directly on the training shardings, each
process reading only the slices its devices hold, and equal to the whole-array read.

(The host memory this saves, measured with two processes, is benchmarks/sharded_load.py.)
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from test_convert_qwen3 import PREBUFFER, make_qwen3
from test_convert_roundtrip import small_config, write_hf_dir

from neo_jax.convert import hf_checkpoint, jax_checkpoint, loading
from neo_jax.convert.qwen3 import qwen3_to_neo
from neo_jax.convert.safetensors_io import SafetensorsFile
from neo_jax.parallel import make_mesh
from neo_jax.trainer.state import param_shardings

MESH_SHAPE = (2, 2, 2)  # data, fsdp, tensor: weights split two ways, replicated two ways


def _shardings_fn():
  mesh = make_mesh(*MESH_SHAPE)
  return lambda config: param_shardings(config, mesh)


def _assert_placed_and_equal(sharded, whole, shardings):
  flat = jax.tree_util.tree_flatten_with_path(sharded)[0]
  for (path, leaf), expected, sharding in zip(
    flat, jax.tree.leaves(whole), jax.tree.leaves(shardings)
  ):
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert leaf.dtype == np.asarray(expected).dtype, name
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected), err_msg=name)


@pytest.mark.parametrize(
  "tied,dtype,cast", [(True, torch.float32, None), (False, torch.bfloat16, "float32")]
)
def test_hf_neo_read_by_slices_equals_the_whole_read(tmp_path, tied, dtype, cast):
  config = small_config()
  write_hf_dir(
    tmp_path, config, dtype, tied=tied, shard_keys=["language_model.model.embed_tokens.weight"]
  )
  compute = {} if cast is None else {"param_dtype": cast}
  whole, config_a = hf_checkpoint.read_hf_neo(str(tmp_path), **compute)
  fn = _shardings_fn()
  sharded, config_b = loading.load_checkpoint(str(tmp_path), fn, **compute)
  assert config_a == config_b
  _assert_placed_and_equal(sharded, whole, fn(config_b))


def test_neo_jax_params_restore_onto_the_shardings_of_their_config(tmp_path):
  config = small_config()
  write_hf_dir(tmp_path / "hf", config)
  whole, loaded = hf_checkpoint.read_hf_neo(str(tmp_path / "hf"))
  jax_checkpoint.save_params(str(tmp_path / "jax"), whole, loaded)
  fn = _shardings_fn()
  sharded, config_b = loading.load_checkpoint(str(tmp_path / "jax"), fn)
  _assert_placed_and_equal(sharded, whole, fn(config_b))


def test_qwen3_init_by_slices_equals_the_whole_init(tmp_path):
  make_qwen3(tmp_path, tied=False)
  whole, config_a = qwen3_to_neo(str(tmp_path), PREBUFFER, seed=3)
  fn = _shardings_fn()
  sharded, config_b = qwen3_to_neo(str(tmp_path), PREBUFFER, seed=3, shardings=fn)
  assert config_a == config_b
  _assert_placed_and_equal(sharded, whole, fn(config_b))


def test_a_slice_read_copies_only_the_slice(tmp_path):
  write_hf_dir(tmp_path, small_config())
  f = SafetensorsFile(tmp_path / "model.safetensors")
  key = "language_model.model.embed_tokens.weight"
  part = f.read(key, (slice(10, 20), slice(0, 64, 2)))
  np.testing.assert_array_equal(part, f[key][10:20, 0:64:2])
  assert part.flags.owndata and part.shape == (10, 32)
