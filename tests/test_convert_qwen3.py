"""Qwen3 -> NEO initialisation against a real transformers Qwen3.

NEO's rules: docs/reference/neo.md#initialisation-from-qwen3.

With k_proj_hw = 0 every H/W logit is 0, and text tokens have T = arange, so the new NEO
must reproduce Qwen3's logits on text exactly (to float32 rounding).
"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from neo_jax import cli
from neo_jax.config import IMG_CONTEXT_TOKEN_ID
from neo_jax.convert import loading
from neo_jax.convert.compare import model_logits
from neo_jax.convert.hf_inputs import hf_inputs_to_batch
from neo_jax.convert.qwen3 import neo_config_from_qwen3, q_proj_hw_from_q_proj, qwen3_to_neo
from neo_jax.data.tokenizer import load_tokenizer
from neo_jax.errors import UserError

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, LAYERS, PREBUFFER = 4, 2, 32, 64, 2, 2


def make_qwen3(path, tied, seed=0, dtype=torch.float32):
  """A random tiny Qwen3 saved with save_pretrained; weights rescaled to O(1) activations."""
  config = Qwen3Config(
    vocab_size=300,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    rope_theta=10000.0,
    tie_word_embeddings=tied,
  )
  torch.manual_seed(seed)
  model = Qwen3ForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 2:
        # embeddings (the tied head) at 0.25 keep logits O(1): then fp32 rounding is ~1e-6
        p.copy_(
          torch.randn_like(p) / math.sqrt(p.shape[1])
          if "embed" not in name
          else 0.25 * torch.randn_like(p)
        )
      else:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  model = model.to(dtype).eval()
  model.save_pretrained(path, safe_serialization=True)
  (path / "tokenizer_config.json").write_text("{}")
  return model


def qwen3_logits(model, ids):
  model.config._attn_implementation = "eager"
  with torch.no_grad():
    return model(torch.tensor(ids)[None]).logits[0].float().numpy()


@pytest.mark.parametrize(
  "tied,prebuffer", [(True, 0), (False, PREBUFFER)], ids=["tied-E0", "untied-E2"]
)
def test_neo_reproduces_qwen3_logits_on_text(tmp_path, tied, prebuffer):
  model = make_qwen3(tmp_path, tied)
  params, config = qwen3_to_neo(str(tmp_path), prebuffer, rope_theta_vision=1000.0)
  assert config.num_hidden_layers == LAYERS + prebuffer and config.tie_word_embeddings == tied
  assert config.rope_theta == 10000.0  # read from transformers 5's rope_parameters
  ids = np.random.default_rng(1).integers(0, 300, size=24)
  expected = qwen3_logits(model, ids)
  # a random pre-Buffer changes the input of the Qwen3 layers, so with E > 0 the post-LLM
  # group (layers E..) runs alone; with E = 0 the whole converted model runs
  post_llm = config.replace(num_hidden_layers=LAYERS, num_prebuffer_layers=0)
  llm_only = {k: v for k, v in params.items() if k != "pre_buffer"}
  assert ("pre_buffer" in params) == (prebuffer > 0)
  got = model_logits(llm_only, post_llm, hf_inputs_to_batch(ids, None, None, post_llm))[0]
  err = np.abs(got - expected).max()
  print(f"max |logit diff| {err:.2e}, max |logit| {np.abs(expected).max():.2f}")
  assert err <= 1e-5, err
  assert np.abs(expected).max() > 1.0


def test_layer_rules_of_spec_5_4(tmp_path):
  model = make_qwen3(tmp_path, tied=False)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params, config = qwen3_to_neo(str(tmp_path), PREBUFFER, seed=3)
  attn = params["llm"]["self_attn"]
  for i in range(LAYERS):
    q = sd[f"model.layers.{i}.self_attn.q_proj.weight"]  # [nH*d, H]
    hw = attn["q_proj_hw"]["kernel"][i].T  # back to [out, in]
    quarter = HEAD_DIM // 4
    rows = list(range(quarter)) + list(range(2 * quarter, 3 * quarter))
    for n in range(HEADS):
      for r, src in enumerate(rows + rows):  # head = [w1, w3, w1, w3]
        np.testing.assert_array_equal(hw[n * HEAD_DIM + r], q[n * HEAD_DIM + src])
    np.testing.assert_array_equal(attn["q_proj"]["kernel"][i], q.T)
    np.testing.assert_array_equal(
      attn["q_norm"]["scale"][i], sd[f"model.layers.{i}.self_attn.q_norm.weight"]
    )
    np.testing.assert_array_equal(
      params["llm"]["mlp"]["down_proj"]["kernel"][i], sd[f"model.layers.{i}.mlp.down_proj.weight"].T
    )
    np.testing.assert_array_equal(
      params["llm"]["post_attention_layernorm"]["scale"][i],
      sd[f"model.layers.{i}.post_attention_layernorm.weight"],
    )
  assert not np.any(attn["k_proj_hw"]["kernel"])
  for name in ("q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w"):
    assert np.all(attn[name]["scale"] == 1.0)
  # pre-Buffer: N(0, 0.02^2) projections, unit norms
  pre = params["pre_buffer"]
  projections = np.concatenate(
    [
      pre["self_attn"][n]["kernel"].ravel()
      for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_proj_hw", "k_proj_hw")
    ]
    + [pre["mlp"][n]["kernel"].ravel() for n in ("gate_proj", "up_proj", "down_proj")]
  )
  assert abs(projections.std() - 0.02) < 0.0005 and abs(projections.mean()) < 0.0005
  assert np.all(pre["input_layernorm"]["scale"] == 1.0)
  assert np.all(pre["self_attn"]["k_norm_w"]["scale"] == 1.0)
  q_pre = pre["self_attn"]["q_proj"]["kernel"]
  assert not np.array_equal(q_pre[0], q_pre[1])
  # vision: PyTorch's default conv init, U(+-1/sqrt(fan_in)) for weights and biases
  vision = params["vision"]
  fan_ins = {"patch_embedding": 768, "dense_embedding": 4 * config.vision_hidden_size}
  for name, fan_in in fan_ins.items():
    for leaf in ("kernel", "bias"):
      values = vision[name][leaf]
      bound = 1 / math.sqrt(fan_in)
      assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound
  np.testing.assert_array_equal(
    params["embed_tokens"]["embedding"], sd["model.embed_tokens.weight"]
  )
  np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)
  np.testing.assert_array_equal(params["norm"]["scale"], sd["model.norm.weight"])
  # the seed decides the new tensors, and only them
  again, _ = qwen3_to_neo(str(tmp_path), PREBUFFER, seed=3)
  other, _ = qwen3_to_neo(str(tmp_path), PREBUFFER, seed=4)
  up = lambda p: p["pre_buffer"]["mlp"]["up_proj"]["kernel"]
  patch = lambda p: p["vision"]["patch_embedding"]["kernel"]
  q_hw = lambda p: p["llm"]["self_attn"]["q_proj_hw"]["kernel"]
  np.testing.assert_array_equal(up(again), up(params))
  assert not np.array_equal(up(other), up(params))
  assert not np.array_equal(patch(other), patch(params))
  np.testing.assert_array_equal(q_hw(other), q_hw(params))


def test_q_proj_hw_layout_on_a_labelled_matrix():
  rows = np.arange(2 * 8, dtype=np.float32)[:, None]  # 2 heads of head_dim 8, row r holds r
  got = q_proj_hw_from_q_proj(rows, num_heads=2)[:, 0]
  np.testing.assert_array_equal(got, [0, 1, 4, 5, 0, 1, 4, 5, 8, 9, 12, 13, 8, 9, 12, 13])


def test_untied_qwen3_without_head_clones_embeddings(tmp_path):
  make_qwen3(tmp_path, tied=False)
  tensors = load_file(tmp_path / "model.safetensors")
  del tensors["lm_head.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  params, config = qwen3_to_neo(str(tmp_path), PREBUFFER)
  assert not config.tie_word_embeddings
  np.testing.assert_array_equal(params["lm_head"]["kernel"], params["embed_tokens"]["embedding"].T)


def test_keeps_bf16_and_config_forms(tmp_path):
  make_qwen3(tmp_path, tied=True, dtype=torch.bfloat16)
  params, config = qwen3_to_neo(str(tmp_path), PREBUFFER)
  assert config.param_dtype == "bfloat16"
  assert params["pre_buffer"]["mlp"]["up_proj"]["kernel"].dtype.name == "bfloat16"
  qwen = json.loads((tmp_path / "config.json").read_text())
  qwen.pop("rope_parameters")
  assert neo_config_from_qwen3({**qwen, "rope_theta": 5e5}, 3).rope_theta == 5e5
  with pytest.raises(UserError, match="rope type 'yarn' is not supported"):
    neo_config_from_qwen3({**qwen, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, 3)
  with pytest.raises(UserError, match="model_type is 'llama'"):
    neo_config_from_qwen3({**qwen, "model_type": "llama"}, 3)


def test_wrong_qwen3_tensors(tmp_path):
  make_qwen3(tmp_path, tied=True)
  tensors = load_file(tmp_path / "model.safetensors")
  key = "model.layers.1.self_attn.k_proj.weight"
  tensors[key] = torch.zeros(32, HIDDEN)
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(UserError) as info:
    qwen3_to_neo(str(tmp_path), PREBUFFER)
  assert str(info.value) == f"{key}: checkpoint has [32, 64], model expects [64, 64]"
  del tensors[key]
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(UserError, match=f"Qwen3 checkpoint is missing {key}; expected"):
    qwen3_to_neo(str(tmp_path), PREBUFFER)


def test_cli_qwen3_to_neo_both_formats(tmp_path, capsys):
  model = make_qwen3(tmp_path / "qwen3", tied=True)
  for fmt in ("hf", "jax"):
    out = tmp_path / fmt
    code = cli.main(
      [
        "convert",
        "qwen3-to-neo",
        "--src",
        str(tmp_path / "qwen3"),
        "--out",
        str(out),
        "--prebuffer-layers",
        str(PREBUFFER),
        "--format",
        fmt,
        "--vision-hidden-size",
        "64",
        "--rope-theta-vision",
        "500",
      ]
    )
    assert code == 0, capsys.readouterr().err
    assert (out / "generation_config.json").exists()
    # NEO's tokenizer, not the Qwen3 directory's (whose tokenizer_config.json is "{}")
    assert (out / "tokenizer_config.json").read_text() != "{}"
    assert load_tokenizer(str(out)).img_context_id == IMG_CONTEXT_TOKEN_ID
    params, config = loading.load_checkpoint(str(out))
    assert config.num_prebuffer_layers == PREBUFFER and config.vision_hidden_size == 64
    assert config.rope_theta_vision == 500.0
    assert params["vision"]["patch_embedding"]["kernel"].shape == (768, 64)
  assert "4 layers (2 pre-Buffer)" in capsys.readouterr().out
  del model
