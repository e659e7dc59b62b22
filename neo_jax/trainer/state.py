"""The train state pytree and how it is laid out on the mesh.

    step       int32 []   updates applied so far (drives the learning-rate schedule)
    params     the whole parameter tree (trainable and frozen), param_dtype (fp32 master)
    opt_state  optimizer state of the trainable sub-tree only
    rng        uint32 [2] base key; per-step randomness is fold_in(rng, step)
    objective_state  what the objective carries between steps (None for next-token; e.g. the
               BCO reward shift of a preference loss), replicated

Every leaf has an explicit NamedSharding: parameters by the logical-axis table, optimizer
moments like the parameters they follow, scalars replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from neo_jax.config import NeoConfig
from neo_jax.model import abstract_params, init_params, logical_axes
from neo_jax.parallel.sharding import RULES, mesh_context, replicated, tree_shardings
from neo_jax.trainer.optimizer import partition


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  objective_state: Any = None


def param_shardings(config: NeoConfig, mesh: Mesh, rules=RULES) -> Any:
  """NamedSharding of every parameter (FSDP over `embed`, tensor over heads/mlp/vocab)."""
  return tree_shardings(logical_axes(config), abstract_params(config), mesh, rules)


def state_shardings(
  config: NeoConfig, tx: optax.GradientTransformation, trainable: set[str], mesh: Mesh, rules=RULES
) -> TrainState:
  """Shardings of a TrainState: optimizer moments follow their parameters."""
  p_shard = param_shardings(config, mesh, rules)
  trainable_shard, _ = partition(p_shard, trainable)
  trainable_abs, _ = partition(abstract_params(config), trainable)
  opt_abs = jax.eval_shape(tx.init, trainable_abs)
  is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
  opt_shard = optax.tree_map_params(
    tx,
    lambda _, s: s,
    opt_abs,
    trainable_shard,
    transform_non_params=lambda _: replicated(mesh),
    is_leaf=is_sharding,
  )
  rep = replicated(mesh)
  return TrainState(step=rep, params=p_shard, opt_state=opt_shard, rng=rep)


def abstract_state(
  config: NeoConfig,
  tx: optax.GradientTransformation,
  trainable: set[str],
  shardings: TrainState | None = None,
) -> TrainState:
  """ShapeDtypeStructs of a TrainState (with shardings if given), for restoring."""
  params = abstract_params(config)
  trainable_abs, _ = partition(params, trainable)
  state = TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    params=params,
    opt_state=jax.eval_shape(tx.init, trainable_abs),
    rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
  )
  if shardings is None:
    return state
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
  )


def create_state(
  params: Any, tx: optax.GradientTransformation, trainable: set[str], seed: int
) -> TrainState:
  """A fresh TrainState around `params` (no optimizer state for frozen leaves)."""
  trainable_params, _ = partition(params, trainable)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(trainable_params),
    rng=jax.random.PRNGKey(seed).astype(jnp.uint32),
  )


def init_state(
  config: NeoConfig,
  tx: optax.GradientTransformation,
  trainable: set[str],
  mesh: Mesh,
  seed: int,
  params: Any = None,
  init_fn: Callable[[jax.Array], Any] | None = None,
  rules=RULES,
) -> TrainState:
  """A sharded TrainState, initialised on the devices that hold it.

  `params` (host or device arrays, e.g. from a checkpoint) are cast to param_dtype and placed;
  otherwise parameters are drawn from `init_fn(key)` (default: the model's random init) inside
  a jit whose outputs are already sharded, so no device ever holds the full model.
  """
  shardings = state_shardings(config, tx, trainable, mesh, rules)
  param_dtype = jnp.dtype(config.param_dtype)
  init_fn = init_fn or (lambda key: init_params(config, key))

  def build(key, given):
    p = init_fn(key) if given is None else jax.tree.map(lambda x: x.astype(param_dtype), given)
    return create_state(p, tx, trainable, seed)

  with mesh_context(mesh, rules):
    key = jax.random.key(seed)
    if params is None:
      return jax.jit(lambda k: build(k, None), out_shardings=shardings)(key)
    params = jax.device_put(params, shardings.params)
    return jax.jit(lambda k, p: build(k, p), out_shardings=shardings)(key, params)
