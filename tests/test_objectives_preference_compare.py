"""`neo-jax compare-preference`: both runs share start, data and steps; the plot is written."""

import os

import numpy as np

from neo_jax.objectives.preference import compare as cp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACPO_CONFIG = os.path.join(REPO, "configs", "preference.py") + ":tiny"


def test_configs_differ_only_in_the_loss_and_the_run_directory(tmp_path):
  sft = tmp_path / "sft"
  (sft / "checkpoints").mkdir(parents=True)
  configs = cp.run_configs(
    ACPO_CONFIG, str(sft), str(tmp_path / "out"), cp.LOSSES, ["--config.total_steps=7"]
  )
  assert list(configs) == ["sigmoid", "acpo"]
  dpo, acpo = configs["sigmoid"].to_dict(), configs["acpo"].to_dict()
  assert dpo["preference"].pop("loss") == "sigmoid" and acpo["preference"].pop("loss") == "acpo"
  assert dpo.pop("workdir") == str(tmp_path / "out" / "sigmoid")
  assert acpo.pop("workdir") == str(tmp_path / "out" / "acpo")
  dpo.pop("name"), acpo.pop("name")
  assert dpo == acpo
  assert dpo["init"]["path"] == str(sft) and dpo["init"]["format"] == "run"
  assert dpo["total_steps"] == 7


def test_plot_writes_a_png(tmp_path):
  history = lambda slope, vqa: (
    [
      {"step": s, "train/rewards/chosen": slope * s, "train/logps/chosen": -5.0 + slope * s}
      for s in range(1, 6)
    ]
    + [{"step": 5, "vqa/accuracy": vqa}]
  )
  histories = {"sigmoid": history(-0.1, 0.6), "acpo": history(0.1, 0.7)}
  path = tmp_path / "compare.png"
  cp.plot(histories, str(path))
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  assert cp.last_value(histories["acpo"], "vqa/accuracy") == 0.7
  steps, values = cp.series(histories["sigmoid"], "train/rewards/chosen")
  assert steps == [1, 2, 3, 4, 5] and np.allclose(values, [-0.1 * s for s in steps])
