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
