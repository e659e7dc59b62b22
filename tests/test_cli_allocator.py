"""The `neo-jax` command restarts itself once with glibc's huge-page tunable (host memory on
transparent huge pages), only where that helps and only once."""

import os
import subprocess
import sys
import tomllib

import pytest

from neo_jax.cli import allocator

ROOT = os.path.join(os.path.dirname(__file__), "..")
HOST = dict(system="linux", glibc=(2, 36), thp_mode="madvise")


def test_environment_adds_the_tunable_and_keeps_the_others():
  env = allocator.hugepage_environment({"PATH": "/bin"}, **HOST)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = allocator.hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **HOST)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert allocator.hugepage_environment({}, **{**HOST, "thp_mode": "always"}) is not None


@pytest.mark.parametrize(
  "environ,host",
  [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, {}),  # already restarted: never loops
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),  # the user's own choice wins
    ({"NEO_JAX_MALLOC_HUGEPAGES": "0"}, {}),  # opted out
    ({}, {"system": "darwin"}),
    ({}, {"glibc": (2, 34)}),  # before the tunable existed
    ({}, {"thp_mode": "never"}),  # the kernel gives no huge pages
    ({}, {"thp_mode": ""}),  # unknown (no /sys entry)
  ],
)
def test_no_restart_where_it_changes_nothing(environ, host):
  assert allocator.hugepage_environment(environ, **{**HOST, **host}) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert allocator._thp_mode(str(path)) == "madvise"
  assert allocator._thp_mode(str(tmp_path / "missing")) == ""


PROGRAM = (
  "import os, sys; print('pid', os.getpid(), flush=True); "
  "from neo_jax.cli import allocator; allocator.reexec_with_hugepages(); "
  "print('pid', os.getpid(), 'tunables', os.environ.get('GLIBC_TUNABLES', '-'))"
)


@pytest.mark.parametrize("opt_out", [False, True])
def test_restart_is_the_same_process_with_the_tunable(opt_out):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT_ENV)}
  if opt_out:
    env[allocator.OPT_OUT_ENV] = "0"
  out = subprocess.run(
    [sys.executable, "-c", PROGRAM], env=env, cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.splitlines()
  expected = allocator.hugepage_environment(env)
  helps_here = (
    sys.platform.startswith("linux")
    and (allocator._glibc_version() or (0,)) >= allocator.MIN_GLIBC
    and allocator._thp_mode() in ("always", "madvise")
  )
  assert (expected is not None) == (helps_here and not opt_out)
  if expected is None:
    assert out == [out[0], f"{out[0]} tunables -"]
  else:  # the first line comes from before the restart, the second from the new image
    assert len(out) == 3 and out[0] == out[1], out
    assert out[2] == f"{out[0]} tunables {allocator.TUNABLE}"


def test_console_script_and_module_go_through_entry():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert scripts["neo-jax"] == "neo_jax.cli:entry"
  with open(os.path.join(ROOT, "neo_jax", "cli", "__main__.py")) as f:
    assert "entry()" in f.read()
