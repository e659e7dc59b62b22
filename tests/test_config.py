"""NeoConfig presets, parameter counts (no allocation), HF config.json round trips, and the one
traced init per config that parameter shapes, logical axes and random weights share."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from neo_jax import config as C
from neo_jax.model import (
  NeoModel,
  abstract_params,
  dummy_inputs,
  init_params,
  logical_axes,
  param_count,
)


@pytest.mark.parametrize(
  "name,tied,expected",
  [
    ("neo_2b", True, 2_585_453_568),
    ("neo_2b", False, 2_896_618_496),
    ("neo_9b", False, 10_246_797_312),
    ("neo_9b", True, 10_246_797_312 - 622_329_856),
  ],
)
def test_parameter_counts_from_shapes(name, tied, expected):
  params = abstract_params(C.preset(name, tie_word_embeddings=tied))
  assert param_count(params) == expected


def test_prebuffer_is_its_own_parameter_group():
  params = abstract_params(C.neo_2b())
  assert params["pre_buffer"]["self_attn"]["q_proj"]["kernel"].shape == (12, 2048, 2048)
  assert params["llm"]["self_attn"]["q_proj_hw"]["kernel"].shape == (28, 2048, 2048)
  assert params["llm"]["self_attn"]["k_proj_hw"]["kernel"].shape == (28, 2048, 1024)
  assert params["llm"]["self_attn"]["q_norm_h"]["scale"].shape == (28, 64)


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_hf_dict_round_trip(name, tmp_path):
  cfg = C.preset(name)
  cfg.save_hf(tmp_path)
  assert C.NeoConfig.from_hf_file(tmp_path) == cfg


def test_round_trip_keeps_token_ids(tmp_path):
  cfg = C.tiny(eos_token_id=151643, pad_token_id=151650)
  cfg.save_hf(tmp_path)
  assert C.NeoConfig.from_hf_file(tmp_path) == cfg


def test_reads_scalar_or_one_element_list_and_file_values(tmp_path):
  hf = C.neo_2b().to_hf_dict()
  hf["vision_config"]["llm_hidden_size"] = [2048]
  hf["vision_config"]["downsample_ratio"] = [0.5]
  hf["vision_config"]["rope_theta_vision"] = 10000.0
  hf["llm_config"]["rope_theta_hw"] = 5000.0
  hf["tie_word_embeddings"] = False
  del hf["llm_config"]["extra_num_layers"]
  (tmp_path / "config.json").write_text(json.dumps(hf))
  cfg = C.NeoConfig.from_hf_file(tmp_path)
  assert cfg.rope_theta_vision == 10000.0
  assert cfg.rope_theta_hw == 5000.0
  assert cfg.tie_word_embeddings is False
  assert cfg.downsample_ratio == 0.5
  assert cfg.num_prebuffer_layers == 12  # known released depth when the file omits it


def test_bad_config_names_the_field(tmp_path):
  hf = C.tiny().to_hf_dict()
  del hf["llm_config"]["hidden_size"]
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match="llm_config.hidden_size"):
    C.NeoConfig.from_hf_file(tmp_path)
  hf = C.tiny().to_hf_dict()
  hf["vision_config"]["downsample_ratio"] = [0.5, 0.5]
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match="downsample_ratio"):
    C.NeoConfig.from_hf_file(tmp_path)
  with pytest.raises(ValueError, match="attention_impl"):
    C.tiny(attention_impl="flash")
  with pytest.raises(ValueError, match="platform='gpus'"):
    C.tiny(platform="gpus")


def test_init_is_traced_once_per_config_and_replays_the_module_init(monkeypatch):
  config = C.tiny(vocab_size=509)  # no other test traces this config (the trace is cached)
  module_init, calls = NeoModel.init, []

  def counting_init(module, *args, **kwargs):
    calls.append(1)
    return module_init(module, *args, **kwargs)

  monkeypatch.setattr(NeoModel, "init", counting_init)
  key = jax.random.key(3)
  shapes, axes = abstract_params(config), logical_axes(config)
  params = init_params(config, key)
  jitted = jax.jit(lambda k: init_params(config, k))(key)  # as the trainer's set-up calls it
  assert len(calls) == 1

  def direct(rng):
    return nn.meta.unbox(module_init(NeoModel(config), rng, **dummy_inputs(config))["params"])

  want = direct(key)
  assert jax.tree.structure(params) == jax.tree.structure(want) == jax.tree.structure(jitted)
  jax.tree.map(np.testing.assert_array_equal, params, want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), jitted, want)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
    lambda p: (p.shape, p.dtype), params
  )
  assert jax.tree.structure(
    axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
  ) == jax.tree.structure(params)
  raw = jax.random.PRNGKey(3)  # a raw uint32 key is traced for itself and gives its own init
  jax.tree.map(np.testing.assert_array_equal, init_params(config, raw), direct(raw))
