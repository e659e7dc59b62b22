"""The trainer: sets a stage up from its config, then loops batch -> step -> hooks.

    trainer = Trainer(config, objective)     mesh, model, run files, state, data, step, hooks
    trainer.add_hook(hook, every=N)          more hooks (evaluators, printers, ...)
    result = trainer.run()                   until total_steps, or a stop signal (then saved)

What the step optimises is an `Objective` (neo_jax/trainer/objective.py) given by the caller;
everything around the step (NaN policy, throughput, progress, logs, evaluation, checkpoints)
is a hook with its own cadence (neo_jax/trainer/hooks.py). neo_jax/stage.py builds a Trainer
with the objective and evaluators a config names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from neo_jax import run_dir
from neo_jax.config import NeoConfig
from neo_jax.data.embedded import load_named_tokenizer
from neo_jax.errors import UserError
from neo_jax.model import abstract_params
from neo_jax.parallel import distributed
from neo_jax.parallel.layout import BatchLayout, batch_layout
from neo_jax.parallel.mesh import batch_divisor, make_mesh
from neo_jax.parallel.sharding import batch_shardings, replicated, shard_batch
from neo_jax.trainer import batches, flops
from neo_jax.trainer import checkpoint as ckpt_lib
from neo_jax.trainer import config as config_lib
from neo_jax.trainer import optimizer as opt_lib
from neo_jax.trainer.hooks import (
  Cadence,
  Hook,
  LogMetrics,
  NanPolicy,
  ProgressBar,
  SaveCheckpoint,
  StepInfo,
  Throughput,
  memory_stats,
)
from neo_jax.trainer.metrics import MetricWriter, drop_records_after
from neo_jax.trainer.objective import EvalLossFn, Objective, ObjectiveSetup, eval_loss
from neo_jax.trainer.state import (
  TrainState,
  abstract_state,
  init_state,
  param_shardings,
  state_shardings,
)
from neo_jax.trainer.step import compile_step, make_train_step

logger = logging.getLogger("neo_jax.train")


class StopSignal(contextlib.AbstractContextManager):
  """One stop decision for all processes: SIGTERM, SIGHUP or SIGINT to any process (or JAX's
  preemption notice) makes every process stop after the same update, which is then saved.

  `decide()` is called once after every update, on every process, and returns the same answer
  everywhere. How the answer is reached (`mode`):

    local   one process: the signal handlers set a flag.
    jax     several processes with JAX's preemption service (the default): SIGTERM stays with
            JAX's own handler; SIGHUP and SIGINT are turned into a SIGTERM to this process.
            When any process gets one, JAX's service picks the next update no process has
            passed yet, max(updates so far) + 1, and `reached_preemption_sync_point` returns
            True there on every process. Per update this is one local check (no
            communication) until a notice arrives.
    gather  several processes without that service (jax_enable_preemption_service off, or
            SIGTERM taken by another handler): the flags of all processes are gathered after
            every update (a small collective each step).

  A second SIGINT raises KeyboardInterrupt at once (no checkpoint).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
  _updates = 0  # updates decided in this process so far, over every run (JAX's sync counter)

  def __init__(self):
    self.received: int | None = None  # the signal this process got, if any
    self.stopped = False  # decided: the run stops after the current update
    self.mode = "local"
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop at once
    self.received = signum
    logger.warning(
      "received %s: every process saves a checkpoint after the same step, then stops",
      signal.Signals(signum).name,
    )
    if self.mode == "jax" and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler starts the agreement

  def __enter__(self):
    if jax.process_count() > 1:
      self.mode = "jax" if distributed.preemption_service_active(StopSignal._updates) else "gather"
      if self.mode == "gather":
        logger.warning(
          "JAX's preemption service is off: the processes agree on stopping by a "
          "collective after every step"
        )
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        if not (self.mode == "jax" and sig == signal.SIGTERM):
          self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def decide(self) -> bool:
    """Whether every process stops after the update just made (call once per update)."""
    StopSignal._updates += 1
    if self.mode == "jax":
      stop = multihost_utils.reached_preemption_sync_point(StopSignal._updates)
    elif self.mode == "gather":
      flags = multihost_utils.process_allgather(np.int32(self.received is not None))
      stop = bool(np.max(flags))
    else:
      stop = self.received is not None
    self.stopped = self.stopped or stop
    return self.stopped

  @property
  def reason(self) -> str | None:
    """The signal that stopped the run, as this process saw it (SIGTERM: another process's
    signal or a preemption notice); None when it was not stopped."""
    if not self.stopped:
      return None
    return signal.Signals(self.received or signal.SIGTERM).name


@dataclasses.dataclass
class TrainResult:
  step: int  # updates applied when the run ended
  status: str  # "completed" | "interrupted"
  signal: str | None
  history: list  # the logged metric records
  workdir: str


class _Batch(NamedTuple):
  arrays: Mapping[str, np.ndarray]  # this process's rows
  data_state: dict | None  # the iterator's state right after them


class Trainer:
  """Runs one training stage from a config (configs/common.py lists every field).

  Attributes the set-up leaves for hooks and evaluators: `config`, `model_config`, `mesh`,
  `layout` (the rows each process feeds), `rules`, `param_shardings`, `trainable`, `state`,
  `data`, `checkpointer`, `writer`, `eval_loss_fn` ((params, batch, objective_state) ->
  LossOutput: a stateful objective is evaluated with the state training has reached, which it
  does not change) and `batch_fn` (the objective's arrays added to each sharded batch, or None).
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    objective: Objective,
    *,
    data_iterator: Iterator[dict] | None = None,
  ):
    config_lib.validate(config)
    self.config, self.objective = config, objective
    self.hooks: list[tuple[Hook, Cadence]] = []
    distributed.initialize()
    self.mesh, self.rules = _make_mesh(config), config_lib.sharding_rules(config)
    self.layout = run_layout(config, self.mesh)
    self.primary = distributed.is_primary()
    self.checkpointer = ckpt_lib.RunCheckpointer(
      config.workdir,
      max_to_keep=config.checkpoint.max_to_keep,
      async_save=config.checkpoint.async_save,
    )
    self.model_config, initial_params = self._model_and_params()
    abstract = abstract_params(self.model_config)
    patterns = tuple(config.trainable) or opt_lib.stage_patterns(config.stage)
    self.trainable = opt_lib.trainable_paths(abstract, patterns)
    tx, schedule = opt_lib.from_config(config.optimizer, config.total_steps)
    self.data = data_iterator or batches.make_iterator(
      config, self.model_config, layout=self.layout
    )
    resuming = self.checkpointer.latest_step() is not None
    objective_state = (
      objective.init_state(self.model_config, config) if objective.stateful else None
    )
    self.state, self.state_shardings = self._initial_state(
      tx, initial_params, objective_state, resuming
    )
    if self.primary:  # once the state is there: a failed resume leaves the run files as they were
      self._write_run_files()
    self.param_shardings = param_shardings(self.model_config, self.mesh, self.rules)
    setup = ObjectiveSetup(
      config=config,
      model_config=self.model_config,
      mesh=self.mesh,
      rules=self.rules,
      param_shardings=self.param_shardings,
      params=self.state.params,
      resuming=resuming,
    )
    self.batch_fn = objective.make_batch_fn(setup) if objective.make_batch_fn else None
    loss_fn = objective.make_loss(self.model_config, config)
    self.eval_loss_fn: EvalLossFn = eval_loss(loss_fn, objective.stateful)
    self.step_fn = make_train_step(
      loss_fn,
      tx,
      schedule,
      self.trainable,
      grad_accum_steps=config.grad_accum_steps,
      nan_policy=config.nan_policy,
      stateful=objective.stateful,
    )
    self._compiled = None  # the jitted step, compiled for the first batch's shapes
    self._stop: StopSignal | None = None
    self.writer = MetricWriter(
      config.workdir, enabled=self.primary, tensorboard=config.log.tensorboard
    )
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    logger.info(
      "stage %s: %d trainable parameters of %d; mesh %s",
      config.stage,
      count(opt_lib.partition(abstract, self.trainable)[0]),
      count(abstract),
      dict(self.mesh.shape),
    )
    self._add_default_hooks()

  # -- hooks -----------------------------------------------------------------------------------

  def add_hook(
    self,
    hook: Hook,
    every: int = 1,
    *,
    first: bool = False,
    last: bool = False,
    on_stop: bool = False,
  ) -> None:
    """Calls `hook(StepInfo)` after every `every`-th update (0: never by count), and also after
    the run's first update (`first`), its last (`last`), or the one a stop signal arrived at
    (`on_stop`). Hooks run in the order they were added; the defaults come first."""
    self.hooks.append((hook, Cadence(every, first, last, on_stop)))

  def _add_default_hooks(self) -> None:
    cfg = self.config
    self.nan_policy = NanPolicy(
      cfg.nan_policy,
      self.checkpointer.latest_step,
      skipped=self.resumed_meta.get("skipped_steps", 0),
      max_share=cfg.get("max_skipped_share", 1.0),
    )
    self.throughput = Throughput(self._step_flops, self.mesh.devices.size, _peak_flops(cfg))
    self.add_hook(self.nan_policy)
    self.add_hook(self.throughput)
    if self.primary and cfg.log.progress_bar:
      self.add_hook(ProgressBar(cfg.total_steps, self.step, cfg.name))
    sources = (
      self.nan_policy.report,
      self.throughput.report,
      lambda: batches.iterator_stats(self.data),
      memory_stats,
    )
    self.add_hook(LogMetrics(self.writer, sources), cfg.log.every_steps, first=True, last=True)
    self.add_hook(
      SaveCheckpoint(
        self.checkpointer, cfg.stage, lambda: {"skipped_steps": self.nan_policy.skipped}
      ),
      cfg.checkpoint.every_steps,
      last=True,
      on_stop=True,
    )

  def _call_hooks(self, info: StepInfo) -> bool:
    """Runs the due hooks, then takes the stop decision (the same on every process); when the
    run stops here, also the on_stop hooks that did not run yet. Returns the decision."""
    ran = set()
    for i, (hook, cadence) in enumerate(self.hooks):
      if cadence.due(info):
        hook(info)
        ran.add(i)
    stopping = self._stop is not None and self._stop.decide()
    if stopping:  # the run ends after this update, on every process
      for i, (hook, cadence) in enumerate(self.hooks):
        if cadence.on_stop and i not in ran:
          hook(info)
    return stopping

  # -- the loop --------------------------------------------------------------------------------

  @property
  def step(self) -> int:
    """Updates applied so far."""
    return int(jax.device_get(self.state.step))

  def run(self) -> TrainResult:
    """Trains until `total_steps` or a stop signal; returns where it ended."""
    start = step = self.step
    with StopSignal() as self._stop:
      try:
        batch = self._next_batch(start)
        stopping = False
        while batch is not None and not stopping:
          t0 = time.perf_counter()
          self.state, metrics = self._train_step(batch.arrays)  # runs on, asynchronously
          step += 1
          upcoming = self._next_batch(step)  # read while the device computes
          metrics = jax.device_get(metrics)
          if self.objective.summarize is not None:
            metrics = self.objective.summarize(metrics)
          stopping = self._call_hooks(self._step_info(step, start, batch, metrics, t0))
          batch = upcoming
      finally:
        self.close()
    if step >= self.config.total_steps:  # finished: fails when too many updates were skipped
      self.nan_policy.check_share(step)
    return self._result(step, self._stop.reason)

  def _step_info(self, step: int, start: int, batch: _Batch, metrics: dict, t0: float) -> StepInfo:
    """What the hooks see after update `step` of a run that started at `start`."""
    return StepInfo(
      step=step,
      state=self.state,
      metrics=metrics,
      batch=batch.arrays,
      data_state=batch.data_state,
      seconds=time.perf_counter() - t0,
      first=step == start + 1,
      last=step == self.config.total_steps,
    )

  def _next_batch(self, step: int) -> _Batch | None:
    """The batch of update `step + 1` with the iterator's state right after it (so a batch
    fetched ahead is not counted as consumed by a checkpoint of `step`); None at the end."""
    if step >= self.config.total_steps:
      return None
    arrays = next(self.data)
    return _Batch(arrays, self.data.get_state() if hasattr(self.data, "get_state") else None)

  def _train_step(self, arrays: Mapping[str, np.ndarray]) -> tuple[TrainState, dict]:
    batch = shard_batch(arrays, self.mesh)
    if self.batch_fn is not None:
      batch = {**batch, **self.batch_fn(batch)}
    if self._compiled is None:
      self._compiled = compile_step(
        self.step_fn, self.mesh, self.state_shardings, batch_shardings(batch, self.mesh), self.rules
      )
    return self._compiled(self.state, batch)

  def _step_flops(self, batch: Mapping[str, np.ndarray]) -> float:
    """Model FLOPs of a step over all processes (each data group counts its own rows, ~ the
    same)."""
    return (
      self.objective.step_flops(self.model_config, batch, self.trainable, self.config)
      * self.layout.groups
    )

  def _result(self, step: int, signame: str | None) -> TrainResult:
    status = (
      "interrupted" if signame is not None and step < self.config.total_steps else "completed"
    )
    if signame:
      logger.warning(
        "stopped by %s at step %d; checkpoint saved in %s",
        signame,
        step,
        self.checkpointer.directory,
      )
    return TrainResult(step, status, signame, self.writer.history, self.config.workdir)

  def close(self) -> None:
    """Waits for the last checkpoint and closes the hooks, the checkpointer and the writer."""
    for hook, _ in self.hooks:
      if hasattr(hook, "close"):
        hook.close()
    self.checkpointer.close()
    self.writer.close()

  # -- set-up ----------------------------------------------------------------------------------

  def _model_and_params(self) -> tuple[NeoConfig, Any]:
    """(NeoConfig, params on their shardings or None): resume wins, then config.init, then
    random."""
    cfg = self.config
    model_config = config_lib.model_config(cfg)
    if self.checkpointer.latest_step() is not None:
      return ckpt_lib.reconcile(run_dir.run_model_config(cfg.workdir), model_config), None
    if not cfg.init.path:
      return model_config, None
    step = None if cfg.init.step < 0 else cfg.init.step
    shardings = lambda loaded: param_shardings(loaded, self.mesh, self.rules)
    try:  # each process reads the parts of the checkpoint its devices hold
      params, loaded = ckpt_lib.load_initial_params(
        cfg.init.path, cfg.init.format, model_config, seed=cfg.seed, step=step, shardings=shardings
      )
    except (UserError, FileNotFoundError) as e:
      raise UserError(
        f"config.init.path (format {cfg.init.format!r}): {e}; set "
        "--config.init.path='' to start from random weights"
      ) from None
    logger.info("initialised from %s (%s)", cfg.init.path, cfg.init.format)
    return loaded, params

  def _write_run_files(self) -> None:
    """config.json and the recipe as run (config.model: the model actually trained), and the
    tokenizer grain data is encoded with, so that the run directory loads on its own."""
    cfg = self.config
    ran = ml_collections.ConfigDict(cfg.to_dict())
    ran.model = config_lib.model_fields(self.model_config)
    ran.data.batch_size = self.layout.rows  # as resolved for this mesh
    run_dir.write_run_files(cfg.workdir, self.model_config, config_lib.to_json(ran))
    if cfg.data.pipeline == "grain":
      with run_dir.staged(cfg.workdir) as local:
        load_named_tokenizer(cfg.data.tokenizer).save(local)

  def _initial_state(
    self, tx: optax.GradientTransformation, params: Any, objective_state: Any, resuming: bool
  ) -> tuple[TrainState, TrainState]:
    """(state, its shardings): restored on resume (with the data position), else built."""
    cfg, mc, mesh = self.config, self.model_config, self.mesh
    self.resumed_meta: dict = {}  # the restored checkpoint's meta (counters to continue from)
    obj_shardings = jax.tree.map(lambda _: replicated(mesh), objective_state)
    shardings = state_shardings(mc, tx, self.trainable, mesh, self.rules)
    if resuming:
      restorable = self.data if hasattr(self.data, "set_state") else None
      if restorable is None:
        logger.warning("the data iterator has no set_state: resuming without its position")
      target = abstract_state(mc, tx, self.trainable, shardings).replace(
        objective_state=jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
          objective_state,
          obj_shardings,
        )
      )
      state, self.resumed_meta = self.checkpointer.restore(target, data_iterator=restorable)
      step = self.resumed_meta["step"]
      logger.info("resumed from %s at step %d", self.checkpointer.directory, step)
      if self.primary:  # the steps after it are redone: their old records go
        dropped = drop_records_after(cfg.workdir, step)
        if dropped:
          logger.info(
            "%s: removed %d records after step %d (they are redone)",
            run_dir.METRICS_FILE,
            dropped,
            step,
          )
    else:
      state = init_state(mc, tx, self.trainable, mesh, cfg.seed, params=params, rules=self.rules)
      state = state.replace(objective_state=jax.device_put(objective_state, obj_shardings))
    return state, shardings.replace(objective_state=obj_shardings)


def _make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The mesh of config.mesh over this run's devices; a one-line UserError when it does not
  fit them."""
  if config.mesh.num_devices and jax.process_count() > 1:
    raise UserError(
      "mesh.num_devices selects devices of a single process; leave it 0 for multi-process runs"
    )
  devices = jax.devices()[: config.mesh.num_devices or None]
  try:
    return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
  except ValueError as e:
    raise UserError(
      f"config.{e} ({jax.process_count()} process(es) x {jax.local_device_count()} device(s))"
    ) from None


def run_layout(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> BatchLayout:
  """The rows of each update and which of them this process feeds, checked against the mesh
  and the processes before anything is built (one-line UserErrors)."""
  rows = batches.global_rows(config, batch_divisor(mesh))
  if config.data.batch_size > 0 and config.data.get("rows_per_shard", 0) > 0:
    logger.warning(
      "data.rows_per_shard=%d is ignored: data.batch_size=%d is set",
      config.data.rows_per_shard,
      config.data.batch_size,
    )
  return batch_layout(mesh, rows, config.grad_accum_steps)


def _peak_flops(config: ml_collections.ConfigDict) -> float | None:
  if config.log.peak_tflops > 0:
    return config.log.peak_tflops * 1e12
  return flops.peak_flops_per_device(jax.devices()[0].device_kind)
