"""Run checkpoints: sharded save/restore with the data state, run directories as checkpoints
for every command, and where a stage starts (previous run, neo-jax / HF NEO dir, Qwen3)."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from neo_jax.config import tiny
from neo_jax.data.synthetic import SyntheticIterator, SyntheticSpec, compact_vocab
from neo_jax.model import abstract_params
from neo_jax.parallel import make_mesh
from neo_jax.run_dir import write_run_files
from neo_jax.trainer import config as config_lib
from neo_jax.trainer import optimizer as O
from neo_jax.trainer.checkpoint import RunCheckpointer, load_initial_params
from neo_jax.trainer.state import abstract_state, init_state, state_shardings

CFG = compact_vocab(tiny(num_hidden_layers=2, num_prebuffer_layers=1), 512)


def _tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A run directory with one checkpoint of a state sharded over a (1, 4, 2) mesh."""
  workdir = str(tmp_path_factory.mktemp("run"))
  mesh = make_mesh(1, 4, 2)
  trainable = O.trainable_paths(abstract_params(CFG), O.stage_patterns("pretrain"))
  tx = O.adamw()
  state = init_state(CFG, tx, trainable, mesh, seed=3)
  state = state.replace(step=state.step + 7)
  recipe = ml_collections.ConfigDict({"model": config_lib.model_fields(CFG).to_dict()})
  write_run_files(workdir, CFG, config_lib.to_json(recipe))
  data = SyntheticIterator(
    SyntheticSpec.for_model(CFG, batch_size=2, seq_len=32, visual_tokens=8), step=11
  )
  ckpt = RunCheckpointer(workdir, max_to_keep=2)
  ckpt.save(state, data.get_state(), meta={"stage": "pretrain"})
  ckpt.close()
  return workdir, mesh, tx, trainable, jax.device_get(state)


def test_sharded_state_and_data_position_round_trip(saved_run):
  workdir, mesh, tx, trainable, saved = saved_run
  shardings = state_shardings(CFG, tx, trainable, mesh)
  data = SyntheticIterator(SyntheticSpec.for_model(CFG, batch_size=2, seq_len=32, visual_tokens=8))
  ckpt = RunCheckpointer(workdir, read_only=True)
  assert ckpt.latest_step() == 7
  restored, meta = ckpt.restore(abstract_state(CFG, tx, trainable, shardings), data_iterator=data)
  assert meta["stage"] == "pretrain" and meta["step"] == 7
  assert data.step == 11
  _tree_equal(restored, saved)
  emb = restored.params["embed_tokens"]["embedding"]
  assert emb.sharding == shardings.params["embed_tokens"]["embedding"]
  mu = restored.opt_state[1][0].mu["pre_buffer"]["mlp"]["up_proj"]["kernel"]
  assert mu.sharding.spec == shardings.params["pre_buffer"]["mlp"]["up_proj"]["kernel"].spec


def test_run_directory_is_a_checkpoint_for_every_command(saved_run):
  workdir, _, _, _, saved = saved_run
  from neo_jax.convert import detect_kind, load_checkpoint

  assert detect_kind(workdir).name == "neo-jax training run"
  params, config = load_checkpoint(workdir, dtype="bfloat16")
  assert config.vocab_size == 512 and config.dtype == "bfloat16"
  assert config.img_context_token_id == CFG.img_context_token_id
  _tree_equal(params, saved.params)


def test_next_stage_starts_from_the_previous_runs_parameters(saved_run):
  workdir, _, _, _, saved = saved_run
  target = CFG.replace(dtype="bfloat16", remat_policy="full")
  for fmt in ("run", "neo"):
    params, config = load_initial_params(workdir, fmt, target)
    _tree_equal(params, saved.params)
    assert config.dtype == "bfloat16" and config.remat_policy == "full"
    assert config.vocab_size == 512


def test_start_from_a_neo_jax_params_directory(saved_run, tmp_path):
  _, _, _, _, saved = saved_run
  from neo_jax.convert import save_params

  save_params(str(tmp_path / "p"), saved.params, CFG)
  params, config = load_initial_params(str(tmp_path / "p"), "neo", CFG)
  _tree_equal(params, saved.params)
  assert config.num_prebuffer_layers == 1


def _fake_qwen3(path, hidden=128, heads=4, kv_heads=2, head_dim=32, inter=384, layers=1, vocab=512):
  rng = np.random.default_rng(0)
  config = dict(
    model_type="qwen3",
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=inter,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    head_dim=head_dim,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
  )
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config))
  t = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
  for i in range(layers):
    p = f"model.layers.{i}."
    t.update(
      {
        p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
        p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
        p + "self_attn.q_norm.weight": (head_dim,),
        p + "self_attn.k_norm.weight": (head_dim,),
        p + "mlp.gate_proj.weight": (inter, hidden),
        p + "mlp.up_proj.weight": (inter, hidden),
        p + "mlp.down_proj.weight": (hidden, inter),
        p + "input_layernorm.weight": (hidden,),
        p + "post_attention_layernorm.weight": (hidden,),
      }
    )
  tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}
  save_file(tensors, str(path / "model.safetensors"))
  return tensors


def test_pretrain_starts_from_a_qwen3_directory(tmp_path):
  qwen = _fake_qwen3(tmp_path / "qwen3")
  params, config = load_initial_params(str(tmp_path / "qwen3"), "qwen3", CFG, seed=0)
  assert config.num_hidden_layers == 2 and config.num_prebuffer_layers == 1
  assert config.param_dtype == "float32" and config.vocab_size == 512
  q = params["llm"]["self_attn"]["q_proj"]["kernel"][0]
  np.testing.assert_array_equal(q, qwen["model.layers.0.self_attn.q_proj.weight"].T)
  assert not np.any(params["llm"]["self_attn"]["k_proj_hw"]["kernel"])
  np.testing.assert_array_equal(
    params["embed_tokens"]["embedding"], qwen["model.embed_tokens.weight"]
  )
  shapes = jax.tree.map(lambda x: x.shape, abstract_params(config))
  assert jax.tree.map(np.shape, params) == shapes
