"""Shared test set-up: CPU only, 8 virtual devices for mesh tests, full-precision matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from neo_jax.data.cache import CACHE_ENV  # noqa: E402


@pytest.fixture(scope="session")
def neo_cache(tmp_path_factory):
  """A fresh $NEO_JAX_CACHE for the session: the tokenizer and embedded data are built, not
  taken from the user's ~/.cache."""
  root = tmp_path_factory.getbasetemp() / "neo_jax_cache"
  old = os.environ.get(CACHE_ENV)
  os.environ[CACHE_ENV] = str(root)
  yield root
  if old is None:
    os.environ.pop(CACHE_ENV, None)
  else:
    os.environ[CACHE_ENV] = old


@pytest.fixture(scope="module")
def tok(neo_cache):
  """The offline Qwen3 + NEO tokenizer, built in the session cache."""
  from neo_jax.data.tokenizer import load_tokenizer

  return load_tokenizer()


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A module whose runs compile the same programs reuses them through jax's persistent cache
  (`pytestmark = pytest.mark.usefixtures("compilation_cache")`)."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  options = {
    "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  saved = {name: getattr(jax.config, name) for name in options}
  for name, value in options.items():
    jax.config.update(name, value)
  cc.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  cc.reset_cache()
