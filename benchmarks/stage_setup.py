"""What a training stage costs before its first update: set-up, traces of the model, compiles.

    python benchmarks/stage_setup.py configs/pretrain.py:tiny
    python benchmarks/stage_setup.py configs/sft.py:tiny --config.init.path=RUN_DIR

Builds the stage's trainer (`neo_jax.stage.build_trainer`, evaluators included) in a fresh run
directory and runs 3 updates (an evaluation, if the config has one, after the last). Reports
the set-up time, the first update (which compiles the step) and the later ones, and how often
the model's modules were traced, as calls of `NeoModel.init` (parameter shapes, logical axes,
random initialisation) and `NeoModel.apply` (inside the step, a reference pass, an evaluation;
one program may call it more than once), during set-up and in all. `--config.FIELD=VALUE`
overrides apply.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from neo_jax import stage as stage_lib  # noqa: E402
from neo_jax.model import neo as neo_model  # noqa: E402
from neo_jax.trainer import config as config_lib  # noqa: E402


class TraceCounter:
  """Counts NeoModel.init / NeoModel.apply calls (each one traced into a program or run)."""

  def __init__(self):
    self.counts = {"init": 0, "apply": 0}
    self._init, self._apply = neo_model.NeoModel.init, neo_model.NeoModel.apply
    counter = self

    def init(module, *args, **kwargs):
      counter.counts["init"] += 1
      return counter._init(module, *args, **kwargs)

    def apply(module, *args, **kwargs):
      counter.counts["apply"] += 1
      return counter._apply(module, *args, **kwargs)

    neo_model.NeoModel.init, neo_model.NeoModel.apply = init, apply

  def snapshot(self) -> dict[str, int]:
    return dict(self.counts)


def measure(spec: str, overrides: list[str], steps: int = 3) -> dict:
  """Builds and runs the stage in a temporary run directory (removed afterwards)."""
  counter = TraceCounter()
  config = config_lib.load_config(spec, overrides)
  config.total_steps = steps
  config.checkpoint.every_steps = 10**6  # only the final save
  config.log.progress_bar = False
  config.mesh.num_devices = 1
  if config.eval.every_steps > 0:
    config.eval.every_steps = steps
  with tempfile.TemporaryDirectory(prefix="stage_setup_") as workdir:
    config.workdir = workdir
    t0 = time.perf_counter()
    trainer = stage_lib.build_trainer(config)
    setup_s = time.perf_counter() - t0
    setup_traces = counter.snapshot()
    step_s = []
    trainer.add_hook(lambda info: step_s.append(round(info.seconds, 2)))
    t1 = time.perf_counter()
    trainer.run()
    run_s = time.perf_counter() - t1
  return {
    "config": spec,
    "overrides": overrides,
    "setup_s": round(setup_s, 1),
    "setup_traces": setup_traces,
    "traces": counter.snapshot(),
    "first_step_s": step_s[0],
    "later_steps_s": step_s[1:],
    "run_s": round(run_s, 1),
    "before_first_update_s": round(setup_s + step_s[0] - min(step_s[1:] or [0.0]), 1),
    "date": datetime.date.today().isoformat(),
    "machine": platform.node(),
    "cpus": os.cpu_count(),
    "load_average": [round(x, 1) for x in os.getloadavg()],
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config", help="FILE.py:ARG, as for neo-jax train")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--json", default="", help="append the result as one JSON line to this file")
  args, overrides = p.parse_known_args(argv)
  result = measure(args.config, overrides, args.steps)
  line = json.dumps(result)
  print(line)
  if args.json:
    with open(args.json, "a") as f:
      f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
