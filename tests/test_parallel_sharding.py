"""The sharded step on 8 virtual CPU devices equals the single-device step; sharding rules."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from neo_jax.config import neo_2b, tiny
from neo_jax.data.synthetic import SyntheticSpec, compact_vocab, synthetic_batch
from neo_jax.model import abstract_params, init_params, logical_axes
from neo_jax.model.attention import K_ACTIVATION, Q_ACTIVATION
from neo_jax.model.layers import EMBED_ACTIVATION, MLP_ACTIVATION
from neo_jax.objectives.next_token import next_token_loss
from neo_jax.parallel import (
  batch_shardings,
  explain,
  make_mesh,
  mesh_context,
  named_sharding,
  shard_batch,
  tree_shardings,
)
from neo_jax.parallel.mesh import resolve_mesh_shape
from neo_jax.parallel.sharding import RULES, rules_from_table, rules_table
from neo_jax.trainer import optimizer as O
from neo_jax.trainer.state import init_state, state_shardings
from neo_jax.trainer.step import compile_step, make_train_step

CFG = compact_vocab(tiny(num_hidden_layers=2, num_prebuffer_layers=1), 512)
SPEC = SyntheticSpec.for_model(CFG, batch_size=8, seq_len=64, visual_tokens=24, max_image_tokens=9)


@pytest.fixture(scope="module")
def params0():
  return jax.device_get(jax.jit(lambda k: init_params(CFG, k))(jax.random.key(0)))


def _run(mesh, params, stage="sft", steps=2, accum=1):
  tx = O.adamw()
  schedule = O.learning_rate_schedule(1e-3, 10, warmup=1)
  trainable = O.trainable_paths(abstract_params(CFG), O.stage_patterns(stage))
  state = init_state(CFG, tx, trainable, mesh, seed=0, params=params)
  step = make_train_step(
    next_token_loss(CFG, chunk=16, positions_per_row=8),
    tx,
    schedule,
    trainable,
    grad_accum_steps=accum,
  )
  batches = [synthetic_batch(SPEC, i) for i in range(steps)]
  run = compile_step(
    step, mesh, state_shardings(CFG, tx, trainable, mesh), batch_shardings(batches[0], mesh)
  )
  losses = []
  for b in batches:
    state, metrics = run(state, shard_batch(b, mesh))
    losses.append(float(metrics["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def single_device(params0):
  return _run(make_mesh(1, 1, 1, devices=jax.devices()[:1]), params0)


@pytest.mark.parametrize("shape,accum", [((2, 2, 2), 1), ((1, 4, 2), 2)])
def test_sharded_step_equals_single_device(single_device, params0, shape, accum):
  """Mesh (1, 4, 2) also accumulates two micro-batches: still the same step."""
  assert jax.device_count() == 8
  ref_losses, ref_state = single_device
  mesh = make_mesh(*shape)
  losses, state = _run(mesh, params0, accum=accum)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  ref_leaves = jax.tree_util.tree_leaves_with_path(ref_state.params)
  for (path, ref), got in zip(ref_leaves, jax.tree.leaves(state.params)):
    np.testing.assert_allclose(
      np.asarray(got), np.asarray(ref), rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path)
    )
  # parameters and their Adam moments really are split over the mesh (FSDP + tensor)
  emb = state.params["embed_tokens"]["embedding"]
  assert emb.sharding.spec == P("tensor", "fsdp")
  assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape[0] < 512
  mu = state.opt_state[1][0].mu["llm"]["mlp"]["up_proj"]["kernel"]
  assert mu.sharding.spec == state.params["llm"]["mlp"]["up_proj"]["kernel"].sharding.spec
  assert mu.sharding.spec == P(None, "fsdp", "tensor")


def test_every_parameter_has_a_rule_and_2b_shards_fully():
  """On a 16-way fsdp x 4-way tensor mesh every large neo_2b matrix is split both ways."""
  config = neo_2b()
  mesh = jax.sharding.AbstractMesh((2, 16, 4), ("data", "fsdp", "tensor"))
  specs = jax.tree.map(
    lambda spec, x: named_sharding(spec, x.shape, mesh).spec,
    logical_axes(config),
    abstract_params(config),
    is_leaf=lambda x: isinstance(x, P),
  )
  flat = {
    jax.tree_util.keystr(p): s
    for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  }
  assert flat["['embed_tokens']['embedding']"] == P("tensor", "fsdp")
  assert flat["['llm']['self_attn']['q_proj']['kernel']"] == P(None, "fsdp", "tensor")
  assert flat["['llm']['self_attn']['k_proj_hw']['kernel']"] == P(None, "fsdp", "tensor")
  assert flat["['llm']['mlp']['down_proj']['kernel']"] == P(None, "tensor", "fsdp")
  assert flat["['vision']['dense_embedding']['kernel']"] == P("tensor", "fsdp")
  for name, spec in flat.items():
    if name.endswith("['kernel']") or name.endswith("['embedding']"):
      assert any(a is not None for a in spec), name


def test_undivisible_dimension_falls_back_to_replicated():
  mesh = jax.sharding.AbstractMesh((1, 2, 4), ("data", "fsdp", "tensor"))
  # tiny k_proj: 2 KV heads x 32 = 64 columns divide 4; a 6-wide dim would not
  assert named_sharding(P("embed", "kv_heads"), (128, 6), mesh).spec == P("fsdp", None)
  assert named_sharding(P("activation_batch", "activation_length"), (3, 8), mesh).spec == P(
    "data", None
  )
  lines = explain({"w": P("embed", "kv_heads")}, {"w": np.zeros((128, 6))}, mesh)
  assert "not divisible" in lines[0]


def test_mesh_shape_resolution_and_errors():
  assert resolve_mesh_shape(1, -1, 2, 8) == (1, 4, 2)
  assert resolve_mesh_shape(2, 2, 2, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="8 devices"):
    resolve_mesh_shape(2, 2, 1, 8)
  with pytest.raises(ValueError, match="at most one"):
    resolve_mesh_shape(-1, -1, 1, 8)


def test_shard_batch_splits_rows_and_checks_divisibility():
  mesh = make_mesh(2, 2, 2)
  batch = synthetic_batch(SPEC, 0)
  sharded = shard_batch(batch, mesh)
  assert sharded["positions"].sharding.spec == P(("data", "fsdp"), None, None)
  np.testing.assert_array_equal(np.asarray(sharded["input_ids"]), batch["input_ids"])
  with pytest.raises(ValueError, match="6 local rows .* the 4 batch shards this process holds"):
    shard_batch({k: v[:6] for k, v in batch.items()}, mesh)


def test_tree_shardings_cover_the_whole_tree():
  mesh = make_mesh(1, 8, 1)
  shardings = tree_shardings(logical_axes(CFG), abstract_params(CFG), mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract_params(CFG))


def test_weights_and_activations_are_named_apart_so_rule_order_does_not_matter():
  """Weights split fsdp x tensor; activations keep the model dimension whole and split the
  batch; the same under any order of the rules (no rule relies on an earlier one)."""
  mesh = jax.sharding.AbstractMesh((2, 16, 4), ("data", "fsdp", "tensor"))
  weight_names = {
    name
    for spec in jax.tree.leaves(logical_axes(neo_2b()), is_leaf=lambda x: isinstance(x, P))
    for name in spec
    if name is not None
  }
  rule_names = {name for name, _ in RULES}
  activations = {n for n in rule_names if n.startswith("activation_")}
  assert weight_names <= rule_names - activations
  for rules in (RULES, tuple(reversed(RULES)), rules_from_table(rules_table())):
    spec = lambda names, shape, rules=rules: named_sharding(P(*names), shape, mesh, rules).spec
    assert spec(EMBED_ACTIVATION, (32, 64, 2048)) == P(("data", "fsdp"), None, None)
    assert spec(MLP_ACTIVATION, (32, 64, 6144)) == P(("data", "fsdp"), None, "tensor")
    assert spec(Q_ACTIVATION, (32, 64, 16, 256)) == P(("data", "fsdp"), None, "tensor", None)
    assert spec(K_ACTIVATION, (32, 64, 8, 256)) == P(("data", "fsdp"), None, "tensor", None)
    assert spec(("embed", "mlp"), (2048, 6144)) == P("fsdp", "tensor")
    assert spec(("vocab", "embed"), (151936, 2048)) == P("tensor", "fsdp")


def test_mesh_context_sets_mesh_and_rules_together_and_restores_both():
  """Inside, a model's logical constraint resolves to the rules' mesh axes on that mesh;
  outside, neither the mesh nor the rules remain (a constraint is then a no-op)."""
  mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
  reversed_rules = tuple(reversed(RULES))
  with mesh_context(mesh, reversed_rules):
    assert tuple(nn.get_logical_axis_rules()) == reversed_rules
    assert jax.sharding.get_abstract_mesh().axis_names == mesh.axis_names
    constrained = jax.jit(lambda x: nn.with_logical_constraint(x, MLP_ACTIVATION))
    out = constrained(np.ones((2, 4, 6), np.float32))
    assert out.sharding.spec == P(None, None, "tensor")
  assert tuple(nn.get_logical_axis_rules()) == ()
  assert jax.sharding.get_abstract_mesh().empty


def test_rules_table_round_trips_and_checks_mesh_axes():
  assert rules_from_table(rules_table()) == RULES
  assert rules_table()["activation_batch"] == ("data", "fsdp")
  assert rules_table()["activation_embed"] == ()
  with pytest.raises(ValueError, match="fspd"):
    rules_from_table({"embed": ("fspd",)})
