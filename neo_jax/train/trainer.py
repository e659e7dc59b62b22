"""The trainer: owns the loop, so entry points stay one call (`Trainer(config).run()`).

    set up     mesh, model config, parameters (checkpoint / previous stage / random),
               optimizer, sharded train state, data iterator, compiled step, eval hooks
    loop       batch -> step -> metrics (NaN check, logs, progress bar) -> evals -> checkpoint
    stop       at total_steps, or on SIGTERM / SIGINT after saving a checkpoint

What the step optimises is an `Objective` from a registry (next-token prediction here; a
preference objective registers itself the same way) and plugs into the same state, optimizer,
sharding, checkpoints and loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from neo_jax.config import NeoConfig
from neo_jax.errors import UserError
from neo_jax.model import abstract_params
from neo_jax.parallel import distributed
from neo_jax.parallel.mesh import batch_divisor, make_mesh
from neo_jax.parallel.sharding import batch_shardings, batch_spec, replicated, shard_batch
from neo_jax.train import checkpoint as ckpt_lib
from neo_jax.train import config_lib, data as data_lib, metrics as metrics_lib
from neo_jax.train import optimizer as opt_lib
from neo_jax.train.evaluation import EvalHook, GenerateFn, HeldOutLoss, VqaExactMatch
from neo_jax.train.state import (TrainState, abstract_state, init_state, param_shardings,
                                 state_shardings)
from neo_jax.train.step import LossFn, compile_step, make_train_step, next_token_loss

logger = logging.getLogger("neo_jax.train")


class NonFiniteError(RuntimeError):
  """A step produced a non-finite loss or gradient norm under nan_policy="stop"."""


# --- objectives -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ObjectiveSetup:
  """What an objective's batch function may need, built by the trainer's set-up."""

  config: ml_collections.ConfigDict
  model_config: NeoConfig
  mesh: Any
  param_shardings: Any
  params: Any  # the state's parameters (the starting ones, or the restored ones on resume)
  resuming: bool


BatchFn = Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a step optimises: a loss over a batch, and its FLOPs for MFU.

  Optional parts, for objectives that need more than (params, batch):
    init_state     state carried from step to step in TrainState.objective_state (e.g. a
                   running mean); the loss then is (params, batch, state) -> (LossOutput, state)
    make_batch_fn  set-up -> a function adding arrays to each sharded batch before the step
                   (e.g. reference log-probs from a frozen model), or None
    summarize      the step's metric sums -> the values logged
  """

  name: str
  make_loss: Callable[[NeoConfig, ml_collections.ConfigDict], LossFn]
  step_flops: Callable[[NeoConfig, Mapping[str, np.ndarray], set, ml_collections.ConfigDict],
                       float]
  init_state: Optional[Callable[[NeoConfig, ml_collections.ConfigDict], Any]] = None
  make_batch_fn: Optional[Callable[[ObjectiveSetup], Optional[BatchFn]]] = None
  summarize: Optional[Callable[[Mapping[str, Any]], dict]] = None


def _next_token_loss(model_config: NeoConfig, config: ml_collections.ConfigDict) -> LossFn:
  return next_token_loss(model_config, chunk=config.loss.chunk_size,
                         positions_per_row=config.loss.positions_per_row,
                         remat=config.loss.remat, vocab_chunk=config.loss.vocab_chunk)


def _next_token_flops(model_config, batch, trainable, config) -> float:
  return metrics_lib.step_flops(model_config, batch, trainable,
                                config.loss.positions_per_row)["total"]


OBJECTIVES: dict[str, Objective] = {
    "next_token": Objective("next_token", _next_token_loss, _next_token_flops),
}


# objectives defined in other modules, which register themselves when imported
OBJECTIVE_MODULES = {"preference": "neo_jax.train.preference"}


def register_objective(objective: Objective) -> None:
  OBJECTIVES[objective.name] = objective


def get_objective(name: str) -> Objective:
  if name not in OBJECTIVES and name in OBJECTIVE_MODULES:
    importlib.import_module(OBJECTIVE_MODULES[name])
  if name not in OBJECTIVES:
    raise ValueError(f"objective {name!r} is not one of "
                     f"{sorted(set(OBJECTIVES) | set(OBJECTIVE_MODULES))}")
  return OBJECTIVES[name]


# --- signals ----------------------------------------------------------------------------------

class StopSignal(contextlib.AbstractContextManager):
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step (then saves, exits)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: Optional[int] = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop at once
    self.received = signum
    logger.warning("received %s: saving a checkpoint after this step, then stopping",
                   signal.Signals(signum).name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


@dataclasses.dataclass
class TrainResult:
  step: int  # updates applied when the run ended
  status: str  # "completed" | "interrupted"
  signal: Optional[str]
  history: list  # the logged metric records
  workdir: str


# --- the trainer ------------------------------------------------------------------------------

class Trainer:
  """Runs one training stage from a config (see configs/common.py for every field)."""

  def __init__(self, config: ml_collections.ConfigDict, *,
               data_iterator: Optional[Iterator[dict]] = None,
               eval_hooks: Sequence[EvalHook] = (),
               generate_fn: Optional[GenerateFn] = None,
               vqa_examples: Optional[Sequence[Any]] = None,
               objective: Optional[str] = None,
               on_step: Optional[Callable[[int, dict], None]] = None):
    """`objective`: a registered Objective's name; default config.objective, else next_token."""
    config_lib.validate(config)
    self.config = config
    self.objective = get_objective(objective or config.get("objective", "next_token"))
    self._data_iterator = data_iterator
    self._extra_hooks = list(eval_hooks)
    self._generate_fn = generate_fn
    self._vqa_examples = vqa_examples
    self._on_step = on_step

  # -- set up ----------------------------------------------------------------------------------

  def _model_and_params(self, ckpt: ckpt_lib.RunCheckpointer, model_config: NeoConfig):
    """(NeoConfig, host params or None): resume wins, then config.init, then random."""
    cfg = self.config
    if ckpt.latest_step() is not None:
      arch = ckpt_lib.run_model_config(cfg.workdir)
      return ckpt_lib.reconcile(arch, model_config), None
    if cfg.init.path:
      step = None if cfg.init.step < 0 else cfg.init.step
      try:
        params, loaded = ckpt_lib.load_initial_params(cfg.init.path, cfg.init.format,
                                                      model_config, seed=cfg.seed, step=step)
      except (UserError, FileNotFoundError) as e:
        raise UserError(f"config.init.path (format {cfg.init.format!r}): {e}; set "
                        "--config.init.path='' to start from random weights") from None
      logger.info("initialised from %s (%s)", cfg.init.path, cfg.init.format)
      return loaded, params
    return model_config, None

  def _eval_hooks(self, loss_fn: LossFn, mesh, p_shardings, model_config,
                  batch_fn: Optional[BatchFn] = None) -> list[EvalHook]:
    cfg = self.config
    hooks = list(self._extra_hooks)
    every = cfg.eval.every_steps
    if every <= 0:
      return hooks
    if cfg.eval.heldout_batches > 0:
      changes = {"sources": tuple(cfg.eval.sources)} if cfg.eval.sources else {}
      held = data_lib.make_iterator(cfg, model_config, split=cfg.eval.split, **changes)
      batches = [next(held) for _ in range(cfg.eval.heldout_batches)]
      if batch_fn is not None:  # the held-out batches are fixed: add their arrays once
        batches = [{**b, **_local_rows(batch_fn(shard_batch(b, mesh)), mesh)} for b in batches]
      hooks.append(HeldOutLoss(batches, loss_fn, mesh, p_shardings, every))
    if cfg.eval.vqa_examples > 0:
      generate_fn = self._generate_fn
      if generate_fn is None:  # greedy decoding of neo_jax.inference with the real tokenizer
        from neo_jax.data.tokenizer import load_tokenizer
        from neo_jax.inference import vqa_answer_fn
        generate_fn = vqa_answer_fn(model_config, load_tokenizer(),
                                    max_new_tokens=cfg.eval.max_new_tokens,
                                    min_pixels=cfg.data.min_pixels,
                                    max_pixels=cfg.data.max_pixels)
      examples = self._vqa_examples
      if examples is None:
        from neo_jax.data.pipeline import read_vqa_eval
        examples = read_vqa_eval("test", cfg.eval.vqa_examples)
      hooks.append(VqaExactMatch(examples[:cfg.eval.vqa_examples], generate_fn, every))
    return hooks

  def _setup(self) -> "_Run":
    """Everything the loop needs, built in dependency order."""
    cfg = self.config
    distributed.initialize()
    if cfg.mesh.num_devices and jax.process_count() > 1:
      raise UserError("mesh.num_devices selects devices of a single process; leave it 0 for "
                      "multi-process runs")
    devices = jax.devices()[:cfg.mesh.num_devices or None]
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    micro_rows, shards = cfg.data.batch_size // cfg.grad_accum_steps, batch_divisor(mesh)
    if micro_rows % shards:
      raise UserError(f"data.batch_size / grad_accum_steps = {micro_rows} rows per micro-batch "
                      f"is not divisible by mesh data*fsdp = {shards}")
    primary = distributed.is_primary()
    ckpt = ckpt_lib.RunCheckpointer(cfg.workdir, max_to_keep=cfg.checkpoint.max_to_keep,
                                    async_save=cfg.checkpoint.async_save)
    model_config, init_params = self._model_and_params(ckpt, config_lib.model_config(cfg))
    if primary:  # the recipe as run: config.model holds the model actually trained
      ran = ml_collections.ConfigDict(cfg.to_dict())
      ran.model = config_lib.model_fields(model_config)
      ckpt_lib.write_run_files(cfg.workdir, model_config, config_lib.to_json(ran))
      if cfg.data.pipeline == "grain":  # the tokenizer the data is encoded with, so that the
        from neo_jax.data.tokenizer import load_tokenizer  # run directory loads on its own
        load_tokenizer().save(cfg.workdir)

    patterns = tuple(cfg.trainable) or opt_lib.stage_patterns(cfg.stage)
    abstract = abstract_params(model_config)
    trainable = opt_lib.trainable_paths(abstract, patterns)
    tx, schedule = opt_lib.from_config(cfg.optimizer, cfg.total_steps)
    shardings = state_shardings(model_config, tx, trainable, mesh)
    data_it = self._data_iterator or data_lib.make_iterator(cfg, model_config)
    objective = self.objective
    stateful = objective.init_state is not None
    obj_state = objective.init_state(model_config, cfg) if stateful else None
    obj_shardings = jax.tree.map(lambda _: replicated(mesh), obj_state)

    resuming = ckpt.latest_step() is not None
    if resuming:
      restorable = data_it if hasattr(data_it, "set_state") else None
      if restorable is None:
        logger.warning("the data iterator has no set_state: resuming without its position")
      target = abstract_state(model_config, tx, trainable, shardings).replace(
          objective_state=jax.tree.map(
              lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
              obj_state, obj_shardings))
      state, _ = ckpt.restore(target, data_iterator=restorable)
      logger.info("resumed from %s at step %d", ckpt.directory, ckpt.latest_step())
    else:
      state = init_state(model_config, tx, trainable, mesh, cfg.seed, params=init_params)
      state = state.replace(objective_state=jax.device_put(obj_state, obj_shardings))
    shardings = shardings.replace(objective_state=obj_shardings)

    p_shardings = param_shardings(model_config, mesh)
    batch_fn = None
    if objective.make_batch_fn is not None:
      batch_fn = objective.make_batch_fn(ObjectiveSetup(cfg, model_config, mesh, p_shardings,
                                                        state.params, resuming))
    loss_fn = objective.make_loss(model_config, cfg)
    step_fn = make_train_step(loss_fn, tx, schedule, trainable,
                              grad_accum_steps=cfg.grad_accum_steps, nan_policy=cfg.nan_policy,
                              stateful=stateful)
    eval_loss = (loss_fn if not stateful else
                 lambda p, b: loss_fn(p, b, obj_state)[0])  # eval: the initial state
    hooks = self._eval_hooks(eval_loss, mesh, p_shardings, model_config, batch_fn)
    peak = (cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops > 0 else
            metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    logger.info("stage %s: %d trainable parameters of %d; mesh %s", cfg.stage,
                count(opt_lib.partition(abstract, trainable)[0]), count(abstract),
                dict(mesh.shape))
    writer = metrics_lib.MetricWriter(cfg.workdir, enabled=primary,
                                      tensorboard=cfg.log.tensorboard)
    return _Run(mesh, ckpt, model_config, trainable, shardings, data_it, state, step_fn, hooks,
                writer, peak, _progress_bar(cfg, int(jax.device_get(state.step)), primary),
                batch_fn)

  def run(self) -> TrainResult:
    """Trains until `total_steps` or a stop signal; returns where it ended."""
    cfg, r = self.config, self._setup()
    state, data_it = r.state, r.data_it
    step = start = int(jax.device_get(state.step))
    history, window, skipped_steps, train_step = [], _Window(), 0, None
    get_state = getattr(data_it, "get_state", lambda: None)
    batch = next(data_it) if start < cfg.total_steps else None
    data_state = get_state() if batch is not None else None
    try:
      with StopSignal() as stop:
        while step < cfg.total_steps and stop.received is None:
          t0 = time.perf_counter()
          sharded = shard_batch(batch, r.mesh)
          if r.batch_fn is not None:
            sharded = {**sharded, **r.batch_fn(sharded)}
          if train_step is None:  # compile on the first batch's shapes
            train_step = compile_step(r.step_fn, r.mesh, r.shardings,
                                      batch_shardings(sharded, r.mesh))
          state, metrics = train_step(state, sharded)
          step += 1
          # fetch the next batch while the device computes; its state is kept apart so a
          # checkpoint of this step does not count it as consumed
          next_batch = next(data_it) if step < cfg.total_steps else None
          next_state = get_state() if next_batch is not None else None
          flops = self.objective.step_flops(r.model_config, batch, r.trainable, cfg)
          flops *= jax.process_count()  # each process counts its own rows (~ the same)
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - t0
          if self.objective.summarize is not None:
            metrics = self.objective.summarize(metrics)

          bad = [name for name in ("loss", "grad_norm") if int(metrics[f"nonfinite_{name}"])]
          if bad:
            where = ", ".join(f"{n}={float(metrics[n])}" for n in bad)
            if cfg.nan_policy == "stop":
              raise NonFiniteError(f"step {step}: non-finite {where}; the update was not "
                                   f"applied and the run stopped (nan_policy=stop); last "
                                   f"checkpoint: step {r.ckpt.latest_step()}")
            if cfg.nan_policy == "skip":
              skipped_steps += 1
              logger.warning("step %d: non-finite %s; update skipped (%d so far)", step, where,
                             skipped_steps)
          window.add(elapsed, float(metrics.get("tokens", 0.0)), flops,  # global already
                     compiling=step == start + 1)
          record = _train_record(metrics, skipped_steps)
          r.progress.update(1)
          r.progress.set_postfix(loss=f"{record['train/loss']:.4f}",
                                 lr=f"{record['train/learning_rate']:.2e}", refresh=False)

          last = step == cfg.total_steps
          if step % cfg.log.every_steps == 0 or last or step == start + 1:
            record.update(window.summary(r.mesh.devices.size, r.peak))
            record.update(data_lib.iterator_stats(data_it))
            record.update(_memory_stats())
            r.writer.write(step, record)
            history.append({"step": step, **record})
            window.reset()
          due = [h for h in r.hooks if last or step % h.every_steps == 0]
          if due:
            evals = {k: v for hook in due for k, v in hook(state, step).items()}
            r.writer.write(step, evals)
            history.append({"step": step, **evals})
            logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in evals.items()))
          if self._on_step is not None:
            self._on_step(step, record)
          if step % cfg.checkpoint.every_steps == 0 or last or stop.received is not None:
            r.ckpt.save(state, data_state, meta={"stage": cfg.stage, "time": time.time(),
                                                   "loss": record["train/loss"]})
          batch, data_state = next_batch, next_state
        received = stop.received
    finally:
      r.progress.close()
      r.ckpt.close()
      r.writer.close()
    status = "interrupted" if received is not None and step < cfg.total_steps else "completed"
    signame = signal.Signals(received).name if received is not None else None
    if signame:
      logger.warning("stopped by %s at step %d; checkpoint saved in %s", signame, step,
                     r.ckpt.directory)
    return TrainResult(step, status, signame, history, cfg.workdir)


@dataclasses.dataclass
class _Run:
  """What `Trainer._setup` builds for the loop."""

  mesh: Any
  ckpt: ckpt_lib.RunCheckpointer
  model_config: NeoConfig
  trainable: set
  shardings: TrainState
  data_it: Iterator[dict]
  state: TrainState
  step_fn: Callable
  hooks: list
  writer: metrics_lib.MetricWriter
  peak: Optional[float]
  progress: Any
  batch_fn: Optional[BatchFn] = None  # the objective's per-batch arrays (e.g. reference)


# --- helpers ----------------------------------------------------------------------------------

class _Window:
  """Throughput over the steps since the last log line (the first, compiling step apart)."""

  def __init__(self):
    self.first_step_s = None
    self.reset()

  def reset(self):
    self.seconds = self.tokens = self.flops = 0.0
    self.steps = 0

  def add(self, seconds: float, tokens: float, flops: float, compiling: bool):
    if compiling:  # reported on its own: it includes compilation
      self.first_step_s = seconds
      return
    self.seconds += seconds
    self.tokens += tokens
    self.flops += flops
    self.steps += 1

  def summary(self, n_devices: int, peak: Optional[float]) -> dict[str, float]:
    out = {}
    if self.steps:
      seconds = max(self.seconds, 1e-9)
      out = {"perf/step_time_s": seconds / self.steps,
             "perf/tokens_per_s": self.tokens / seconds,
             "perf/tflops_per_s_per_device": self.flops / seconds / n_devices / 1e12}
      if peak:
        out["perf/mfu"] = self.flops / seconds / n_devices / peak
    if self.first_step_s is not None:
      out["perf/first_step_s"] = self.first_step_s
      self.first_step_s = None
    return out


def _train_record(metrics: Mapping[str, Any], skipped_steps: int) -> dict[str, float]:
  """The step's metrics as `train/...` scalars; an objective's own sums pass through."""
  m = {k: float(v) for k, v in metrics.items()}
  for key in ("nonfinite_loss", "nonfinite_grad_norm"):
    m.pop(key, None)
  record = {"train/loss": m.pop("loss"), "train/grad_norm": m.pop("grad_norm"),
            "train/learning_rate": m.pop("learning_rate"),
            "train/skipped_steps": float(skipped_steps)}
  if "correct_tokens" in m and "supervised_tokens" in m:
    record["train/token_accuracy"] = m.pop("correct_tokens") / max(m["supervised_tokens"], 1.0)
  record.update({f"train/{k}": v for k, v in m.items()})
  return record


def _local_rows(arrays: Mapping[str, jax.Array], mesh) -> dict[str, np.ndarray]:
  """This process's rows of batch-sharded global arrays, as numpy."""
  out = {}
  for key, x in arrays.items():
    if not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      x = multihost_utils.global_array_to_host_local_array(x, mesh, batch_spec(x.ndim))
    out[key] = np.asarray(x)
  return out


def _memory_stats() -> dict[str, float]:
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" not in stats:
    return {}
  return {"perf/peak_memory_gb": stats["peak_bytes_in_use"] / 2**30}


class _NoBar:
  def update(self, n):
    pass

  def set_postfix(self, **kwargs):
    pass

  def close(self):
    pass


def _progress_bar(config: ml_collections.ConfigDict, start: int, primary: bool):
  if not (primary and config.log.progress_bar):
    return _NoBar()
  from tqdm.auto import tqdm
  return tqdm(total=config.total_steps, initial=start, desc=config.name, unit="step",
              dynamic_ncols=True)
