"""Training configs: every file loads and documents itself, recipes match spec 5.1, overrides
are typed, and bad fields give one-line errors naming them."""

import glob
import json
import os

import pytest

from neo_jax import cli
from neo_jax.errors import UserError
from neo_jax.train import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("common.py"))


def _load(name, *overrides):
  return config_lib.load_config(os.path.join(REPO, "configs", name), list(overrides))


def test_all_expected_configs_exist():
  names = {os.path.basename(p) for p in CONFIGS}
  assert names == {"tiny_vqa_pretrain.py", "tiny_vqa_sft.py", "tiny_vqa_acpo.py",
                   "tiny_vqa_dpo.py",
                   *(f"neo_{s}_{t}.py" for s in ("2b", "9b")
                     for t in ("pretrain", "midtrain", "sft", "acpo"))}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_starts_with_its_command(path):
  with open(path) as f:
    source = f.read()
  assert source.startswith('"""')
  doc = source.split('"""')[1]
  assert f"neo-jax train --config configs/{os.path.basename(path)}" in doc
  assert "Expect" in doc
  config = config_lib.load_config(path)
  model = config_lib.model_config(config)
  assert config.stage in ("pretrain", "midtrain", "sft", "preference")
  assert (config.stage == "preference") == (config.data.kind == "preference")
  assert model.param_dtype == "float32"
  json.loads(config_lib.to_json(config))


# spec 5.1: (lr, accum, steps, warmup steps, warmup ratio, schedule, min ratio, L, max pixels)
RECIPES = {
    "neo_2b_pretrain": (8e-4, 5, 200_000, 1000, 0.0, "cosine_with_min_lr", 0.1, 16384, 4_194_304),
    "neo_2b_midtrain": (5e-5, 2, 50_000, 0, 0.03, "cosine_with_min_lr", 0.2, 32768, 16_777_216),
    "neo_2b_sft": (6e-5, 1, 4_500, 0, 0.03, "cosine_with_min_lr", 0.1, 34816, 16_777_216),
    "neo_9b_pretrain": (8e-4, 5, 200_000, 1000, 0.0, "cosine_with_min_lr", 0.1, 16384, 4_194_304),
    "neo_9b_midtrain": (5e-5, 2, 50_000, 200, 0.0, "cosine_with_min_lr", 0.2, 18432, 16_777_216),
    "neo_9b_sft": (6e-5, 1, 4_500, 200, 0.0, "cosine", 0.0, 18432, 16_777_216),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_stage_recipes_match_the_published_scripts(name):
  c = _load(f"{name}.py")
  lr, accum, steps, warm, ratio, schedule, min_ratio, seq_len, max_px = RECIPES[name]
  o = c.optimizer
  assert (o.lr, c.grad_accum_steps, c.total_steps) == (lr, accum, steps)
  assert (o.warmup_steps, o.warmup_ratio, o.schedule) == (warm, ratio, schedule)
  assert o.min_lr_ratio == pytest.approx(min_ratio)
  assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-8, 0.01, 1.0)
  assert (c.data.seq_len, c.data.min_pixels, c.data.max_pixels) == (seq_len, 65_536, max_px)
  assert c.data.batch_size == 8 * accum
  model = config_lib.model_config(c)
  assert (model.dtype, model.param_dtype, model.remat_policy) == ("bfloat16", "float32", "full")
  assert c.init.format == ("qwen3" if name.endswith("pretrain") else "neo")
  expected_layers = {"2b": (40, 12), "9b": (42, 6)}[name[4:6]]
  assert (model.num_hidden_layers, model.num_prebuffer_layers) == expected_layers


def test_overrides_take_the_field_type():
  c = _load("tiny_vqa_sft.py", "--config.optimizer.lr=3e-4", "--config.total_steps", "7",
            "--config.log.tensorboard=false", "--config.data.sources=easy_vqa/vqa,pydoc/text",
            "--config.trainable=('vision/.*', 'pre_buffer/.*')", "--config.model.dtype=bfloat16")
  assert c.optimizer.lr == 3e-4 and c.total_steps == 7 and c.log.tensorboard is False
  assert tuple(c.data.sources) == ("easy_vqa/vqa", "pydoc/text")
  assert tuple(c.trainable) == ("vision/.*", "pre_buffer/.*")
  assert config_lib.model_config(c).dtype == "bfloat16"


def test_loss_positions_and_packer_budget_are_one_field():
  c = _load("tiny_vqa_sft.py", "--config.loss.positions_per_row=20")
  assert c.data.loss_token_budget == 20
  c = _load("tiny_vqa_sft.py", "--config.data.loss_token_budget=12")
  assert c.loss.positions_per_row == 12


@pytest.mark.parametrize("args,message", [
    (["--config.optimizer.lrr=1"], "--config.optimizer.lrr: no field 'lrr' in optimizer"),
    (["--config.nope.x=1"], "--config.nope.x: no field 'nope'"),
    (["--config.optimizer.lr=fast"], "--config.optimizer.lr=fast: not a valid float"),
    (["--config.total_steps=1.5"], "--config.total_steps=1.5: not a valid int"),
    (["--config.optimizer=1"], "--config.optimizer: is a group of fields"),
    (["--config.stage=warmup"], "stage='warmup' is not one of"),
    (["--config.model.num_key_value_heads=3"], "config.model: NeoConfig: num_attention_heads"),
    (["--config.grad_accum_steps=3"], "data.batch_size=4 is not divisible by grad_accum_steps=3"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_overrides_are_one_line_errors(capsys, args, message):
  rc = cli.main(["train", "--config", os.path.join(REPO, "configs", "tiny_vqa_sft.py"), *args])
  err = capsys.readouterr().err.strip()
  assert rc == 1
  assert len(err.splitlines()) == 1 and message in err, err


def test_missing_config_file_and_print_config(capsys, tmp_path):
  assert cli.main(["train", "--config", str(tmp_path / "none.py")]) == 1
  assert "no such file" in capsys.readouterr().err
  assert cli.main(["train", "--config", os.path.join(REPO, "configs", "tiny_vqa_pretrain.py"),
                   "--print-config", "--config.seed=5"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["seed"] == 5 and printed["model"]["hidden_size"] == 128


def test_config_file_argument_and_missing_get_config(tmp_path):
  (tmp_path / "common.py").write_text("VALUE = 3\n")
  (tmp_path / "x.py").write_text(
      "import common\nimport ml_collections\n"
      "def get_config(arg=None):\n"
      "  return ml_collections.ConfigDict({'v': common.VALUE, 'arg': arg or ''})\n")
  c = config_lib.load_config_file(f"{tmp_path / 'x.py'}:hello")
  assert c.v == 3 and c.arg == "hello"
  (tmp_path / "y.py").write_text("X = 1\n")
  with pytest.raises(UserError, match="defines no get_config"):
    config_lib.load_config_file(str(tmp_path / "y.py"))
