"""Host memory on transparent huge pages: the `neo-jax` command restarts itself once with
glibc's `glibc.malloc.hugetlb=1` tunable.

XLA:CPU allocates every buffer of a step (logits chunks, activations, gradients) anew with
malloc; glibc serves allocations above 32 MiB with a fresh mmap and unmaps them when freed,
so each step touches its buffers page by page again (a 177.5M-parameter NEO fwd+bwd step at
L = 1,024: 544k minor page faults). With the tunable, glibc asks for transparent huge pages
(madvise) on those mappings: 2 MiB pages, 7.6k faults. The numerics do not change (same
buffers, other pages): losses are bitwise equal. Measured in benchmarks/README.md ("Two host
devices and host memory on huge pages") and docs/training.md (the demo: 9.6 -> 8.4 min).

Tunables are read when a process starts, so the only way to set one for this process is to
start it again: `reexec_with_hugepages` replaces the process (same PID, same arguments) before
anything else has run. It does nothing where it cannot help (not Linux, not glibc >= 2.35,
transparent huge pages off), where the tunable is already set, and with
NEO_JAX_MALLOC_HUGEPAGES=0.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_ENV = "NEO_JAX_MALLOC_HUGEPAGES"  # "0": leave the allocator as it is
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def _glibc_version() -> tuple[int, ...] | None:
  libc, version = platform.libc_ver()
  if libc != "glibc" or not version:
    return None
  try:
    return tuple(int(part) for part in version.split("."))
  except ValueError:
    return None


def _thp_mode(path: str = THP_SETTING) -> str:
  """The kernel's transparent huge page mode ("always", "madvise", "never"; "" if unknown)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1 : end] if 0 <= start < end else ""


def hugepage_environment(
  environ: Mapping[str, str],
  *,
  system: str = sys.platform,
  glibc: tuple[int, ...] | None = None,
  thp_mode: str | None = None,
) -> dict[str, str] | None:
  """The environment to restart with (GLIBC_TUNABLES plus the tunable), or None if a restart
  would change nothing or is not wanted. `glibc` and `thp_mode` default to this host's."""
  if not system.startswith("linux") or environ.get(OPT_OUT_ENV, "1").strip() == "0":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:  # set by the user (any value) or by the restart
    return None
  glibc = _glibc_version() if glibc is None else glibc
  if glibc is None or glibc < MIN_GLIBC:
    return None
  if (_thp_mode() if thp_mode is None else thp_mode) not in ("always", "madvise"):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
  return env


def reexec_with_hugepages() -> None:
  """Replaces this process by the same command with the tunable set; returns if not needed.

  Call it first thing in a program's entry point (nothing started, no threads, no files
  written). The command is rebuilt from `sys.orig_argv` (interpreter options, `-m module` or
  the script, then the arguments).
  """
  env = hugepage_environment(os.environ)
  if env is None or not sys.orig_argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
