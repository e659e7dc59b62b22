"""NeoConfig presets, parameter counts (no allocation) and HF config.json round trips."""

import json

import pytest

from neo_jax import config as C
from neo_jax.model import abstract_params, param_count


@pytest.mark.parametrize("name,tied,expected", [
    ("neo_2b", True, 2_585_453_568),
    ("neo_2b", False, 2_896_618_496),
    ("neo_9b", False, 10_246_797_312),
    ("neo_9b", True, 10_246_797_312 - 622_329_856),
])
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
