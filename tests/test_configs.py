"""Training configs: one file per stage, every variant its docstring runs loads, recipes match
NEO's scripts (docs/reference/neo.md#scripted-hyperparameters), the pixel range is one field,
overrides are typed, and bad fields or arguments give one-line errors naming them."""

import glob
import json
import os
import re

import pytest

from neo_jax import cli
from neo_jax.config import tiny
from neo_jax.errors import UserError
from neo_jax.trainer import batches
from neo_jax.trainer import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
  p for p in glob.glob(os.path.join(REPO, "configs", "*.py")) if not p.endswith("common.py")
)


def _load(name, *overrides):
  return config_lib.load_config(os.path.join(REPO, "configs", name), list(overrides))


def test_all_expected_configs_exist():
  names = {os.path.basename(p) for p in CONFIGS}
  assert names == {"pretrain.py", "midtrain.py", "sft.py", "preference.py"}


def _doc(path):
  with open(path) as f:
    source = f.read()
  assert source.startswith('"""')
  return source.split('"""')[1]


# every `neo-jax train --config configs/FILE.py:ARG` command of every config's docstring
DOC_VARIANTS = sorted(
  {
    (os.path.basename(p), arg)
    for p in CONFIGS
    for arg in re.findall(
      rf"neo-jax train --config configs/{re.escape(os.path.basename(p))}:(\S+)", _doc(p)
    )
  }
)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_starts_with_its_commands(path):
  doc = _doc(path)
  name = os.path.basename(path)
  assert f"neo-jax train --config configs/{name}:neo_2b" in doc
  assert "Expect" in doc
  assert {arg.split(",")[0] for file, arg in DOC_VARIANTS if file == name} >= (
    {"neo_2b", "neo_9b"} if name == "midtrain.py" else {"neo_2b", "neo_9b", "tiny"}
  )


@pytest.mark.parametrize("name,arg", DOC_VARIANTS)
def test_every_variant_the_docstrings_run_loads(name, arg):
  config = _load(f"{name}:{arg}")
  model = config_lib.model_config(config)
  assert config.stage in ("pretrain", "midtrain", "sft", "preference")
  assert (config.stage == "preference") == (config.data.kind == "preference")
  assert (config.objective == "preference") == (config.stage == "preference")
  assert model.param_dtype == "float32"
  assert ("local" in arg.split(",")) == (config.data.pipeline == "synthetic")
  json.loads(config_lib.to_json(config))


# (lr, accum, steps, warmup steps, warmup ratio, schedule, min ratio, L, max pixels), written
# here from NEO's scripts (docs/reference/neo.md#scripted-hyperparameters) to check the config
# files against
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
  model, stage = name[:6], name[7:]
  c = _load(f"{stage}.py:{model}")
  lr, accum, steps, warm, ratio, schedule, min_ratio, seq_len, max_px = RECIPES[name]
  o = c.optimizer
  assert (o.lr, c.grad_accum_steps, c.total_steps) == (lr, accum, steps)
  assert (o.warmup_steps, o.warmup_ratio, o.schedule) == (warm, ratio, schedule)
  assert o.min_lr_ratio == pytest.approx(min_ratio)
  assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-8, 0.01, 1.0)
  assert (c.data.seq_len, c.model.min_pixels, c.model.max_pixels) == (seq_len, 65_536, max_px)
  # one packed row per GPU: the global batch of NEO's 8 GPUs, and twice it on 16
  assert (c.data.batch_size, c.data.rows_per_shard) == (0, 1)
  assert batches.global_rows(c, 8) == 8 * accum and batches.global_rows(c, 16) == 16 * accum
  model = config_lib.model_config(c)
  assert (model.dtype, model.param_dtype, model.remat_policy) == ("bfloat16", "float32", "full")
  assert c.init.format == ("qwen3" if name.endswith("pretrain") else "neo")
  expected_layers = {"2b": (40, 12), "9b": (42, 6)}[name[4:6]]
  assert (model.num_hidden_layers, model.num_prebuffer_layers) == expected_layers


def test_overrides_take_the_field_type():
  c = _load(
    "sft.py:tiny",
    "--config.optimizer.lr=3e-4",
    "--config.total_steps",
    "7",
    "--config.log.tensorboard=false",
    "--config.data.sources=easy_vqa/vqa,pydoc/text",
    "--config.data.weights=(3,1)",
    "--config.trainable=('vision/.*', 'pre_buffer/.*')",
    "--config.model.dtype=bfloat16",
  )
  assert c.optimizer.lr == 3e-4 and c.total_steps == 7 and c.log.tensorboard is False
  assert tuple(c.data.sources) == ("easy_vqa/vqa", "pydoc/text")
  assert tuple(c.data.weights) == (3.0, 1.0)
  assert tuple(c.trainable) == ("vision/.*", "pre_buffer/.*")
  assert config_lib.model_config(c).dtype == "bfloat16"


def test_loss_positions_and_packer_budget_are_one_field():
  c = _load("sft.py:tiny", "--config.loss.positions_per_row=20")
  assert c.data.loss_token_budget == 20
  c = _load("sft.py:tiny", "--config.data.loss_token_budget=12")
  assert c.loss.positions_per_row == 12


@pytest.mark.parametrize(
  "args,message",
  [
    (["--config.optimizer.lrr=1"], "--config.optimizer.lrr: no field 'lrr' in optimizer"),
    (["--config.nope.x=1"], "--config.nope.x: no field 'nope'"),
    (["--config.optimizer.lr=fast"], "--config.optimizer.lr=fast: not a valid float"),
    (["--config.total_steps=1.5"], "--config.total_steps=1.5: not a valid int"),
    (["--config.optimizer=1"], "--config.optimizer: is a group of fields"),
    (["--config.stage=warmup"], "stage='warmup' is not one of"),
    (["--config.model.num_key_value_heads=3"], "config.model: NeoConfig: num_attention_heads"),
    (
      ["--config.grad_accum_steps=3", "--config.data.batch_size=4"],
      "data.batch_size=4 is not divisible by grad_accum_steps=3",
    ),
    (["--config.data.sources=5"], "data.sources=(5,) must be a tuple of source specs"),
    (["--config.data.weights=(1,)"], "data.weights has 1 entries for 5 data.sources"),
    (["--config.data.weights=(1,-1)"], "data.weights=(1, -1) must all be > 0"),
    (["--config.data.augment=rot"], "data.augment 'rot' is not one of ('flip', 'shift:F')"),
    (["--config.data.augment=(1,)"], "data.augment=(1,) must be a tuple of augmentations"),
    (["--config.checkpoint.every_steps=0"], "checkpoint.every_steps=0 must be > 0"),
    (["--config.log.every_steps=-1"], "log.every_steps=-1 must be > 0"),
    (["--config.eval.every_steps=-5"], "eval.every_steps=-5 must be >= 0 (0: off)"),
    (["--config.mesh.fsdp=0"], "mesh.fsdp=0 must be >= 1, or -1"),
    (
      ["--config.data.batch_size=0", "--config.data.rows_per_shard=0"],
      "data.batch_size=0 needs data.rows_per_shard > 0",
    ),
    (["--config.data.batch_size=-2"], "data.batch_size=-2 must be >= 0"),
    (["--config.max_skipped_share=1.5"], "max_skipped_share=1.5 must be within [0, 1]"),
    (["stray"], "unexpected argument 'stray'"),
  ],
)
def test_bad_overrides_are_one_line_errors(capsys, args, message):
  rc = cli.main(["train", "--config", os.path.join(REPO, "configs", "sft.py:tiny"), *args])
  err = capsys.readouterr().err.strip()
  assert rc == 2
  assert len(err.splitlines()) == 1 and message in err, err


def test_missing_config_file_and_print_config(capsys, tmp_path):
  assert cli.main(["train", "--config", str(tmp_path / "none.py")]) == 2
  assert "no such file" in capsys.readouterr().err
  assert (
    cli.main(
      [
        "train",
        "--config",
        os.path.join(REPO, "configs", "pretrain.py:tiny"),
        "--print-config",
        "--config.seed=5",
      ]
    )
    == 0
  )
  printed = json.loads(capsys.readouterr().out)
  assert printed["seed"] == 5 and printed["model"]["hidden_size"] == 128


def test_config_file_argument_and_missing_get_config(tmp_path):
  (tmp_path / "common.py").write_text("VALUE = 3\n")
  (tmp_path / "x.py").write_text(
    "import common\nimport ml_collections\n"
    "def get_config(arg=None):\n"
    "  return ml_collections.ConfigDict({'v': common.VALUE, 'arg': arg or ''})\n"
  )
  c = config_lib.load_config_file(f"{tmp_path / 'x.py'}:hello")
  assert c.v == 3 and c.arg == "hello"
  (tmp_path / "y.py").write_text("X = 1\n")
  with pytest.raises(UserError, match="defines no get_config"):
    config_lib.load_config_file(str(tmp_path / "y.py"))


@pytest.mark.parametrize(
  "arg,message",
  [
    ("", "name the model after the file, FILE.py:MODEL"),
    (":gpt2", "MODEL one of tiny, neo_2b, neo_9b (got 'gpt2')"),
    (":tiny,lcal", "'lcal': not one of local"),
    (":tiny,local=maybe", "local is true or false"),
  ],
)
def test_bad_config_arguments_are_one_line_errors(capsys, arg, message):
  rc = cli.main(
    ["train", "--config", os.path.join(REPO, "configs", "sft.py") + arg, "--print-config"]
  )
  err = capsys.readouterr().err.strip()
  assert rc == 2
  assert len(err.splitlines()) == 1 and message in err, err
  assert "tiny" not in _load("midtrain.py:neo_2b").name
  with pytest.raises(UserError, match="MODEL one of neo_2b, neo_9b"):
    _load("midtrain.py:tiny")


def test_pixel_range_is_one_field():
  """config.model holds the range; the data pipeline and the checkpoint's config.json read it."""
  c = _load("sft.py:neo_2b", "--config.model.max_pixels=1048576")
  assert "min_pixels" not in c.data and "max_pixels" not in c.data
  data = batches.data_config(c, config_lib.model_config(c))
  assert (data.min_pixels, data.max_pixels) == (65_536, 1_048_576)


def test_augmentation_applies_to_training_data_only():
  c = _load("pretrain.py:tiny", "--config.data.augment=('flip', 'shift:0.0625')")
  model = config_lib.model_config(c)
  assert batches.data_config(c, model, "train").augment == ("flip", "shift:0.0625")
  assert batches.data_config(c, model, "test").augment == ()


def test_local_variant_is_the_stage_shrunk():
  full, local = _load("pretrain.py:tiny"), _load("pretrain.py:tiny,local")
  model = config_lib.model_config(local)
  assert (model.num_hidden_layers, model.num_prebuffer_layers, model.vocab_size) == (2, 1, 512)
  assert model.hidden_size == tiny().hidden_size
  assert local.data.pipeline == "synthetic" and local.mesh.num_devices == 1
  assert local.workdir == full.workdir + "_local"
  assert (local.optimizer.lr, local.trainable, local.stage) == (
    full.optimizer.lr,
    full.trainable,
    full.stage,
  )


def test_sharding_rules_are_part_of_the_config():
  c = _load(
    "sft.py:neo_2b", "--config.mesh.rules.activation_mlp=", "--config.mesh.rules.embed=fsdp,tensor"
  )
  rules = dict(config_lib.sharding_rules(c))
  assert rules["activation_mlp"] is None and rules["embed"] == ("fsdp", "tensor")
  assert rules["activation_batch"] == ("data", "fsdp") and rules["mlp"] == "tensor"
  with pytest.raises(UserError, match="config.mesh.rules: sharding rule embed: mesh axes"):
    _load("sft.py:neo_2b", "--config.mesh.rules.embed=fspd")
