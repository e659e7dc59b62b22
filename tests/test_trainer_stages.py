"""Stage masks: pretrain trains only vision, pre-Buffer and the H/W projections; frozen
parameters stay bit-identical and have no optimizer state; the schedule and skip policy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from neo_jax.config import neo_2b, tiny
from neo_jax.data.synthetic import SyntheticSpec, compact_vocab, synthetic_batch
from neo_jax.model import abstract_params
from neo_jax.objectives.next_token import next_token_loss
from neo_jax.parallel import batch_shardings, make_mesh, shard_batch
from neo_jax.trainer import optimizer as O
from neo_jax.trainer.state import init_state, state_shardings
from neo_jax.trainer.step import compile_step, make_train_step

CFG = compact_vocab(tiny(num_hidden_layers=2, num_prebuffer_layers=1), 512)
SPEC = SyntheticSpec.for_model(CFG, batch_size=4, seq_len=64, visual_tokens=24, max_image_tokens=9)
HW = ("q_proj_hw", "k_proj_hw", "q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w")


def test_pretrain_mask_selects_exactly_the_paper_set():
  paths = set(O.flat(abstract_params(neo_2b())))
  chosen = O.trainable_paths(abstract_params(neo_2b()), O.stage_patterns("pretrain"))
  expected = {p for p in paths if p.startswith(("vision/", "pre_buffer/"))}
  expected |= {
    f"llm/self_attn/{name}/{leaf}"
    for name in HW
    for leaf in ("kernel", "scale")
    if f"llm/self_attn/{name}/{leaf}" in paths
  }
  assert chosen == expected
  assert "embed_tokens/embedding" not in chosen and "norm/scale" not in chosen
  assert "llm/self_attn/q_proj/kernel" not in chosen
  assert len([p for p in chosen if p.startswith("llm/")]) == 6
  for stage in ("midtrain", "sft"):
    assert O.trainable_paths(abstract_params(neo_2b()), O.stage_patterns(stage)) == paths


def test_unknown_pattern_and_stage_are_errors():
  with pytest.raises(ValueError, match="matches no parameter"):
    O.trainable_paths(abstract_params(CFG), ("vison/.*",))
  with pytest.raises(ValueError, match="stage='warmup'"):
    O.stage_patterns("warmup")


@pytest.fixture(scope="module")
def pretrain_run():
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  trainable = O.trainable_paths(abstract_params(CFG), O.stage_patterns("pretrain"))
  tx = O.adamw()
  state0 = init_state(CFG, tx, trainable, mesh, seed=0)
  before = jax.device_get(state0.params)
  step = make_train_step(
    next_token_loss(CFG, chunk=16), tx, O.learning_rate_schedule(1e-2, 10), trainable
  )
  batch = synthetic_batch(SPEC, 0)
  run = compile_step(
    step, mesh, state_shardings(CFG, tx, trainable, mesh), batch_shardings(batch, mesh)
  )
  state = state0
  for i in range(3):
    state, _ = run(state, shard_batch(synthetic_batch(SPEC, i), mesh))
  return trainable, before, state


def test_frozen_parameters_are_bit_identical_and_trainable_ones_move(pretrain_run):
  trainable, before, state = pretrain_run
  after = O.flat(jax.device_get(state.params))
  before = O.flat(before)
  assert set(after) == set(before)
  for path in before:
    if path in trainable:
      assert not np.array_equal(after[path], before[path]), f"{path} did not train"
    else:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)


def test_no_optimizer_state_for_frozen_parameters(pretrain_run):
  trainable, before, state = pretrain_run
  adam = state.opt_state[1][0]
  assert isinstance(adam, optax.ScaleByAdamState)
  for moments in (adam.mu, adam.nu):
    assert set(O.flat(moments)) == trainable
  trainable_size = sum(int(np.size(v)) for k, v in O.flat(before).items() if k in trainable)
  # two moments per trainable element plus scalar counters, nothing else
  assert 2 * trainable_size <= O.state_param_count(state.opt_state) <= 2 * trainable_size + 8
  frozen_size = sum(int(np.size(v)) for k, v in O.flat(before).items() if k not in trainable)
  assert frozen_size > 200_000  # embedding, LLM projections, MLP, norms: no moments


def test_schedules_follow_the_recipes():
  cos = O.learning_rate_schedule(8e-4, 1000, warmup=100, min_lr_ratio=0.1)
  assert float(cos(0)) == 0.0
  np.testing.assert_allclose(float(cos(50)), 4e-4, rtol=1e-6)
  np.testing.assert_allclose(float(cos(100)), 8e-4, rtol=1e-6)
  np.testing.assert_allclose(float(cos(550)), 8e-4 * (0.1 + 0.9 * 0.5), rtol=1e-5)
  np.testing.assert_allclose(float(cos(1000)), 8e-5, rtol=1e-5)
  plain = O.learning_rate_schedule(6e-5, 1000, schedule="cosine", warmup=200)
  assert float(plain(1000)) == pytest.approx(0.0, abs=1e-12)
  assert O.warmup_steps(4500, ratio=0.03) == 135
  assert O.warmup_steps(4500, steps=200, ratio=0.03) == 200


def test_weight_decay_only_on_matrices():
  mask = O.flat(O.decay_mask(abstract_params(CFG)))
  assert mask["llm/mlp/up_proj/kernel"] and mask["embed_tokens/embedding"]
  assert not mask["norm/scale"] and not mask["vision/patch_embedding/bias"]
  assert not mask["llm/self_attn/q_norm_h/scale"]


def test_nonfinite_step_is_skipped_without_touching_state():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  trainable = {"w"}
  tx = O.adamw()

  def loss_fn(p, batch):
    from neo_jax.trainer.objective import LossOutput

    value = jnp.sum(p["w"] * batch["x"][:, :2].sum()) + p["b"].sum()
    return LossOutput(value, jnp.float32(1.0), {})

  from neo_jax.trainer.state import create_state

  state = create_state(params, tx, trainable, seed=0)
  for policy, expect_same in (("skip", True), ("stop", True), ("ignore", False)):
    step = jax.jit(
      make_train_step(loss_fn, tx, O.learning_rate_schedule(0.1, 10), trainable, nan_policy=policy)
    )
    new, metrics = step(state, {"x": jnp.full((3, 3), jnp.nan)})
    assert int(metrics["nonfinite_loss"]) == 1 and int(new.step) == 1
    same = all(
      np.array_equal(a, b, equal_nan=True)
      for a, b in zip(
        jax.tree.leaves((new.params, new.opt_state)),
        jax.tree.leaves((state.params, state.opt_state)),
      )
    )
    assert same == expect_same, policy
    good, metrics = step(state, {"x": jnp.ones((3, 3))})
    assert int(metrics["nonfinite_loss"]) == 0
    assert not np.array_equal(good.params["w"], state.params["w"])
    np.testing.assert_array_equal(good.params["b"], state.params["b"])
