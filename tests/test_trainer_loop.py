"""The trainer end to end on a small NEO: loss falls, exact resume, SIGTERM, NaN stop, logs."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from neo_jax import objectives, stage
from neo_jax.run_dir import load_run_params
from neo_jax.trainer import config as config_lib
from neo_jax.trainer.batches import synthetic_iterator
from neo_jax.trainer.checkpoint import RunCheckpointer
from neo_jax.trainer.hooks import NonFiniteError
from neo_jax.trainer.loop import Trainer
from neo_jax.trainer.metrics import read_jsonl
from neo_jax.trainer.objective import LossOutput, Objective

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tiny pretrain stage shrunk: 1 + 1 layers, a 512-token vocabulary, 8 synthetic rows of 64
# tokens, K = 16, one device, a record every step
LOCAL = os.path.join(REPO, "configs", "pretrain.py") + ":tiny,local"


def small_config(workdir, total_steps, *extra):
  return config_lib.load_config(
    LOCAL, [f"--config.workdir={workdir}", f"--config.total_steps={total_steps}", *extra]
  )


def _losses(history):
  return [r["train/loss"] for r in history if "train/loss" in r]


pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py


N = 8  # steps before the interruption; the straight run takes 2N


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """2N steps of the tiny pretrain stage (its own mask: LLM frozen), checkpoints every N."""
  workdir = tmp_path_factory.mktemp("straight")
  config = small_config(
    workdir, 2 * N, f"--config.checkpoint.every_steps={N}", "--config.trainable=()"
  )
  return workdir, stage.train(config)


def test_tiny_pretrain_loss_falls_and_logs(straight):
  workdir, result = straight
  losses = _losses(result.history)
  assert result.status == "completed" and result.step == 2 * N and len(losses) == 2 * N
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records] == list(range(1, 2 * N + 1))
  last = records[-1]
  for key in (
    "train/loss",
    "train/grad_norm",
    "train/learning_rate",
    "perf/tokens_per_s",
    "perf/step_time_s",
    "perf/tflops_per_s_per_device",
    "data/batches",
  ):
    assert key in last and np.isfinite(last[key]), key
  assert "perf/first_step_s" in records[0]
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  assert RunCheckpointer(str(workdir), read_only=True).all_steps() == [N, 2 * N]


def test_resume_after_interrupt_is_exact(straight, tmp_path):
  straight_dir, straight_result = straight

  def interrupt(info):
    if info.step == N:
      os.kill(os.getpid(), signal.SIGTERM)

  # no periodic checkpoint: the one resumed from is the one SIGTERM saves
  args = ("--config.checkpoint.every_steps=1000", "--config.trainable=()")
  trainer = stage.build_trainer(small_config(tmp_path, 2 * N, *args))
  trainer.add_hook(interrupt)  # after the default hooks: the stop still saves step N
  first = trainer.run()
  assert (first.status, first.step, first.signal) == ("interrupted", N, "SIGTERM")
  assert RunCheckpointer(str(tmp_path), read_only=True).all_steps() == [N]
  second = stage.train(small_config(tmp_path, 2 * N, *args))
  assert second.status == "completed" and second.step == 2 * N
  assert _losses(first.history) + _losses(second.history) == _losses(straight_result.history)
  for step in (N, 2 * N):  # the straight run's step-N checkpoint was written asynchronously
    params_a, _ = load_run_params(str(straight_dir), step=step)  # while later steps reused
    params_b, _ = load_run_params(str(tmp_path), step=step)  # (donated) the state buffers
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_loss_stops_with_step_and_metric(tmp_path):
  config = small_config(tmp_path, 6)
  it = synthetic_iterator(config, config_lib.model_config(config))

  class Poisoned:
    def __next__(self):
      batch = next(it)
      if it.step == 3:
        batch["loss_weights"] = np.where(batch["loss_weights"] > 0, np.nan, 0.0)
      return batch

    def get_state(self):
      return it.get_state()

  with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss=nan"):
    stage.train(config, data_iterator=Poisoned())


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_cli_run_leaves_a_restorable_checkpoint(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  cmd = [
    sys.executable,
    "-m",
    "neo_jax.cli",
    "train",
    "--config",
    LOCAL,
    f"--config.workdir={tmp_path}",
    "--config.total_steps=100000",
    "--config.checkpoint.every_steps=100000",
  ]
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err
  assert "stopped by SIGTERM" in err and "resume" in err
  ckpt = RunCheckpointer(str(tmp_path), read_only=True)
  step = ckpt.latest_step()
  assert step is not None and step >= 2
  params, config = load_run_params(str(tmp_path))
  assert config.vocab_size == 512
  assert params["embed_tokens"]["embedding"].shape == (512, 128)
  meta = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  assert meta["step"] == step


def test_a_second_objective_plugs_into_the_same_trainer(straight, tmp_path):
  """Another objective replaces the loss and adds its own metrics; all else is shared."""
  base = objectives.get("next_token")

  def make_loss(model_config, config):
    inner = base.make_loss(model_config, config)

    def loss_fn(params, batch):
      out = inner(params, batch)
      return LossOutput(
        2.0 * out.loss_sum,
        out.weight_sum,
        {**out.metrics, "rows": (batch["segment_ids"][:, 0] > 0).sum() * 1.0},
      )

    return loss_fn

  doubled = Objective("doubled", make_loss, base.step_flops)
  result = Trainer(small_config(tmp_path, 1, "--config.trainable=()"), doubled).run()
  first = result.history[0]
  assert first["train/loss"] == pytest.approx(2.0 * _losses(straight[1].history)[0], rel=1e-6)
  assert first["train/rows"] == 8.0
  with pytest.raises(ValueError, match="objective 'nope'"):
    stage.train(small_config(tmp_path, 1, "--config.objective=nope"))
