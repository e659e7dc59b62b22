"""The README's commands are real: the Quickstart is what CI and `make` run, every `neo-jax`
flag it shows is one its command accepts, every `--config.*` override names a field of the
config it is given, and the launch scripts know the flags shown for them."""

import os
import re
import shlex
import subprocess

import pytest

from neo_jax import cli
from neo_jax.trainer import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
  with open(os.path.join(REPO, name)) as f:
    return f.read()


def readme_commands() -> list[list[str]]:
  """Each command line of the README's ```bash blocks (continuations joined, comments cut)."""
  blocks = re.findall(r"```bash\n(.*?)```", _read("README.md"), re.S)
  lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
  return [shlex.split(line, comments=True) for line in lines if line.strip()]


def _program(words):
  """The words from the program on (after VAR=value prefixes)."""
  while words and re.match(r"^[A-Z_]+=", words[0]):
    words = words[1:]
  if words[:1] == ["sbatch"]:
    words = [w for w in words[1:] if not w.startswith("--")]  # sbatch's own flags
  return words


def _help(argv, capsys) -> str:
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv + ["--help"])
  assert exit_info.value.code == 0
  return capsys.readouterr().out


def test_quickstart_is_what_make_and_ci_run():
  quickstart = _read("README.md").split("## Quickstart", 1)[1]
  first_block = re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1)
  assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == [
    "make demo",
    "make test",
  ]
  makefile = _read("Makefile")
  assert re.search(r"^demo: .*\n\t\$\(BIN\)/neo-jax demo$", makefile, re.M)
  assert re.search(
    r"^test: .*\n\t\$\(BIN\)/python -m pytest -n \$\(TEST_WORKERS\) --dist loadfile$",
    makefile,
    re.M,
  )
  assert _read(".ci/run").strip().splitlines()[-1] == "make test"


def test_neo_jax_commands_take_the_flags_shown(capsys):
  commands = [_program(w) for w in readme_commands() if _program(w)[:1] == ["neo-jax"]]
  assert len(commands) >= 6, commands
  for words in commands:
    args = words[1:]
    command = [args[0]] + ([args[1]] if args[0] == "convert" else [])
    assert command[0] in cli.COMMANDS, words
    text = _help(command, capsys)
    flags = [a.split("=")[0] for a in args if a.startswith("--") and not a.startswith("--config.")]
    for flag in flags:
      assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (flag, words)
    overrides = [a for a in args if a.startswith("--config.")]
    if overrides:
      config_file = args[args.index("--config") + 1]
      config_lib.load_config(os.path.join(REPO, config_file), overrides)  # raises on a typo


def test_launch_scripts_take_the_flags_shown():
  commands = [
    _program(w)
    for w in readme_commands()
    if _program(w)[:1] and _program(w)[0].startswith("launch/")
  ]
  assert {c[0] for c in commands} == {"launch/tpu_pod.sh", "launch/gpu_slurm.sbatch"}
  for words in commands:
    out = subprocess.run(
      ["bash", os.path.join(REPO, words[0]), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (a.split("=")[0] for a in words[1:] if a.startswith("--")):
      if flag.startswith("--config."):  # passed through to `neo-jax train`
        continue
      assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", out), (flag, words)
