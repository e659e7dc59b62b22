"""`neo-jax convert` and `neo-jax compare-logits` from the command line."""

import argparse
import json
import os

import pytest
import torch
import torch_neo_reference as ref
from safetensors.torch import load_file, save_file

from neo_jax import cli
from neo_jax.cli import convert as convert_cli
from neo_jax.config import tiny

FLAGS = {
  "hf-to-jax": ["--src", "--out", "--dtype", "--overwrite", "--progress"],
  "jax-to-hf": ["--src", "--out", "--dtype", "--max-shard-size", "--overwrite", "--progress"],
  "qwen3-to-neo": [
    "--src",
    "--out",
    "--prebuffer-layers",
    "--format",
    "--seed",
    "--vision-hidden-size",
    "--rope-theta-vision",
    "--rope-theta-hw",
    "--dtype",
    "--max-shard-size",
    "--overwrite",
    "--progress",
  ],
}


@pytest.mark.parametrize("direction", sorted(FLAGS))
def test_help_explains_every_flag(direction, capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(["convert", direction, "--help"])
  assert info.value.code == 0
  text = capsys.readouterr().out
  assert all(flag in text for flag in FLAGS[direction])
  parser = argparse.ArgumentParser()
  convert_cli.add_arguments(parser)
  sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  actions = [a for a in sub.choices[direction]._actions if a.dest != "help"]
  assert sorted(a.option_strings[0] for a in actions) == sorted(FLAGS[direction])
  for action in actions:
    assert action.help and len(action.help) > 20, action.option_strings


def test_compare_logits_help(capsys):
  with pytest.raises(SystemExit):
    cli.main(["compare-logits", "--help"])
  text = capsys.readouterr().out
  assert "--checkpoint" in text and "--golden" in text and "--atol" in text


@pytest.fixture()
def hf_dir(tmp_path):
  config = tiny(vocab_size=512)
  hf = config.to_hf_dict("float32")
  sd = ref.random_state_dict(hf, seed=0, tied=False)
  path = tmp_path / "hf"
  path.mkdir()
  save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(hf))
  (path / "tokenizer.json").write_text("{}")
  return path, sd


def test_hf_to_jax_to_hf_with_shards_and_dtype(hf_dir, tmp_path, capsys):
  src, sd = hf_dir
  assert (
    cli.main(
      ["convert", "hf-to-jax", "--src", str(src), "--out", str(tmp_path / "jax"), "--no-progress"]
    )
    == 0
  )
  assert (
    cli.main(
      [
        "convert",
        "jax-to-hf",
        "--src",
        str(tmp_path / "jax"),
        "--out",
        str(tmp_path / "out"),
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "0.1MB",
      ]
    )
    == 0
  )
  out = tmp_path / "out"
  index = json.loads((out / "model.safetensors.index.json").read_text())
  tensors = {}
  for name in set(index["weight_map"].values()):
    tensors.update(load_file(out / name))
  assert sorted(tensors) == sorted(sd)
  for key, value in sd.items():  # the same round-to-nearest-even cast as torch's
    assert torch.equal(tensors[key].view(torch.int16), value.to(torch.bfloat16).view(torch.int16))
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert (out / "tokenizer.json").read_text() == "{}"
  assert "untied head" in capsys.readouterr().out


def test_flag_and_file_errors_are_one_line(hf_dir, tmp_path, capsys):
  src, _ = hf_dir
  assert cli.main(["convert", "hf-to-jax", "--src", str(src), "--out", str(tmp_path / "j")]) == 0
  capsys.readouterr()
  assert cli.main(["convert", "hf-to-jax", "--src", str(src), "--out", str(tmp_path / "j")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "pass --overwrite" in err
  assert (
    cli.main(
      [
        "convert",
        "jax-to-hf",
        "--src",
        str(tmp_path / "j"),
        "--out",
        str(tmp_path / "h"),
        "--max-shard-size",
        "lots",
      ]
    )
    == 2
  )
  assert "--max-shard-size: cannot read 'lots'" in capsys.readouterr().err
  assert cli.main(["convert", "jax-to-hf", "--src", str(src), "--out", str(tmp_path / "h")]) == 2
  assert "not a neo-jax parameter directory" in capsys.readouterr().err
  assert (
    cli.main(
      [
        "convert",
        "qwen3-to-neo",
        "--src",
        str(src),
        "--out",
        str(tmp_path / "q"),
        "--prebuffer-layers",
        "1",
      ]
    )
    == 2
  )
  assert "model_type is 'neo_chat', expected 'qwen3'" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "h")
