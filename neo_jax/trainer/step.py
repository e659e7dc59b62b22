"""The jitted training step: `(state, batch) -> (state, metrics)`.

One generic step serves every objective: it takes a `LossFn(params, batch) -> LossOutput`
(sums, neo_jax/trainer/objective.py), differentiates it with respect to the trainable
parameters only, accumulates over micro-batches, divides once by the global normaliser, clips,
applies AdamW with the learning rate of `state.step`, and guards against non-finite values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from neo_jax.parallel.sharding import RULES, mesh_context, replicated
from neo_jax.trainer.objective import LossFn, StatefulLossFn
from neo_jax.trainer.optimizer import merge, partition
from neo_jax.trainer.state import TrainState

StepFn = Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]

NAN_POLICIES = ("stop", "skip", "ignore")


def split_microbatches(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
  """[B, ...] -> [n, B/n, ...]; micro-batch a takes rows a, a+n, a+2n, ...

  Interleaving keeps every device's rows on that device: a contiguous block of rows per batch
  shard stays a contiguous block of each micro-batch.
  """

  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} rows is not divisible by grad_accum_steps={n}")
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0)

  return {k: split(v) for k, v in batch.items()}


def _constrain_batch(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {
    k: nn.with_logical_constraint(v, ("activation_batch",) + (None,) * (v.ndim - 1))
    for k, v in batch.items()
  }


def make_train_step(
  loss_fn: LossFn | StatefulLossFn,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  trainable: set[str],
  *,
  grad_accum_steps: int = 1,
  nan_policy: str = "stop",
  stateful: bool = False,
) -> StepFn:
  """The (unjitted) step. `tx` must not scale by the learning rate itself (lr = 1): the step
  multiplies the updates by `schedule(state.step)`, so the rate follows the step count even
  when non-finite steps are skipped.

  nan_policy: "skip" and "stop" leave params and optimizer state unchanged on a non-finite
  loss or gradient norm (the trainer then continues or stops); "ignore" applies the update.
  stateful: `loss_fn` is a StatefulLossFn over `state.objective_state` (kept, like the
  parameters, when a non-finite step is not applied).
  """
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy={nan_policy!r} is not one of {NAN_POLICIES}")
  trainable = frozenset(trainable)
  if not stateful:
    plain_loss = loss_fn
    loss_fn = lambda params, batch, obj_state: (plain_loss(params, batch), obj_state)

  def step_fn(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
    train_params, frozen_params = partition(state.params, trainable)

    def micro_loss(tp, mb, obj_state):
      out, obj_state = loss_fn(merge(tp, frozen_params), _constrain_batch(mb), obj_state)
      return out.loss_sum, (out, obj_state)

    grad_fn = jax.grad(micro_loss, has_aux=True)
    if grad_accum_steps == 1:
      grads, (out, obj_state) = grad_fn(train_params, batch, state.objective_state)
    else:
      micro = split_microbatches(batch, grad_accum_steps)
      first = {k: v[0] for k, v in micro.items()}
      grads_shape, (out_shape, _) = jax.eval_shape(
        lambda mb: grad_fn(train_params, mb, state.objective_state), first
      )
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, out_shape))

      def body(carry, mb):
        acc, obj_state = carry
        grads, (out, obj_state) = grad_fn(train_params, mb, obj_state)
        return (jax.tree.map(jnp.add, acc, (grads, out)), obj_state), None

      ((grads, out), obj_state), _ = jax.lax.scan(body, (zeros, state.objective_state), micro)

    denom = jnp.where(out.weight_sum > 0, out.weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    loss = out.loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    lr = schedule(state.step)
    updates, new_opt_state = tx.update(grads, state.opt_state, train_params)
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    new_train_params = optax.apply_updates(train_params, updates)

    loss_finite = jnp.isfinite(loss)
    grad_finite = jnp.isfinite(grad_norm)
    ok = loss_finite & grad_finite
    if nan_policy != "ignore":
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
      new_train_params = keep(new_train_params, train_params)
      new_opt_state = keep(new_opt_state, state.opt_state)
      obj_state = keep(obj_state, state.objective_state)

    new_state = state.replace(
      step=state.step + 1,
      params=merge(new_train_params, frozen_params),
      opt_state=new_opt_state,
      objective_state=obj_state,
    )
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "learning_rate": jnp.asarray(lr, jnp.float32),
      "loss_weight": out.weight_sum,
      "nonfinite_loss": (~loss_finite).astype(jnp.int32),
      "nonfinite_grad_norm": (~grad_finite).astype(jnp.int32),
      **out.metrics,
    }
    return new_state, metrics

  return step_fn


def compile_step(
  step_fn: StepFn,
  mesh: Mesh,
  state_shardings: TrainState,
  batch_shardings: Mapping[str, jax.sharding.Sharding],
  rules=RULES,
  donate: bool = True,
) -> StepFn:
  """jax.jit with explicit in/out shardings, run under the mesh and the logical-axis rules."""
  jitted = jax.jit(
    step_fn,
    in_shardings=(state_shardings, dict(batch_shardings)),
    out_shardings=(state_shardings, replicated(mesh)),
    donate_argnums=(0,) if donate else (),
  )

  def run(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
    with mesh_context(mesh, rules):
      return jitted(state, dict(batch))

  def lower(state: TrainState, batch: Mapping[str, jax.Array]):
    with mesh_context(mesh, rules):
      return jitted.lower(state, dict(batch))

  run.jitted = jitted
  run.lower = lower  # .compile() gives the executable and its memory_analysis()
  return run
