"""Sampling filters against their definitions, and sampled generation end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_inference_support import prompts, random_model

from neo_jax.inference.generation import generate
from neo_jax.inference.sampling import GREEDY, Sampling, filter_logits, next_token

PROBS = np.array([0.05, 0.5, 0.1, 0.15, 0.2])  # ranked: 1 (0.5), 4 (0.2), 3 (0.15), 2, 0


LOG_PROBS = np.log(PROBS)


def kept(sampling, logits=LOG_PROBS):
  out = np.asarray(filter_logits(jnp.asarray(logits, jnp.float32)[None], sampling))[0]
  return set(np.nonzero(np.isfinite(out))[0].tolist())


def test_top_p_keeps_the_smallest_nucleus():
  # a token stays when the mass ranked above it is < p
  assert kept(Sampling(temperature=1.0, top_p=0.45)) == {1}
  assert kept(Sampling(temperature=1.0, top_p=0.55)) == {1, 4}
  assert kept(Sampling(temperature=1.0, top_p=0.69)) == {1, 4}
  assert kept(Sampling(temperature=1.0, top_p=0.72)) == {1, 4, 3}
  assert kept(Sampling(temperature=1.0, top_p=0.9)) == {1, 4, 3, 2}
  assert kept(Sampling(temperature=1.0, top_p=1.0)) == {0, 1, 2, 3, 4}
  assert kept(Sampling(temperature=1.0, top_p=1e-6)) == {1}


def test_top_p_applies_to_the_tempered_distribution():
  # at temperature 0.5 the probabilities become PROBS^2 / sum: 0.5 weighs ~0.76
  assert kept(Sampling(temperature=0.5, top_p=0.7)) == {1}
  assert kept(Sampling(temperature=2.0, top_p=0.7)) == {1, 4, 3}


def test_top_k_keeps_exactly_the_k_highest():
  logits = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
  out = np.asarray(filter_logits(jnp.asarray(logits), Sampling(temperature=1.0, top_k=7)))
  for row, filtered in zip(logits, out):
    assert set(np.nonzero(np.isfinite(filtered))[0]) == set(np.argsort(-row)[:7])
  assert kept(Sampling(temperature=1.0, top_k=2, top_p=0.45)) == {1}
  assert kept(Sampling(temperature=1.0, top_k=2, top_p=0.9)) == {1, 4}


def test_temperature_scales_logits():
  logits = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9)), jnp.float32)
  np.testing.assert_allclose(
    filter_logits(logits, Sampling(temperature=0.25)), logits * 4, rtol=1e-6
  )


def test_top_k_one_and_tiny_top_p_equal_greedy():
  logits = jnp.asarray(np.random.default_rng(2).standard_normal((8, 1000)), jnp.float32)
  greedy = np.asarray(next_token(logits, GREEDY, jax.random.key(0)))
  np.testing.assert_array_equal(greedy, np.asarray(logits).argmax(-1))
  for seed in range(10):
    for s in (Sampling(temperature=1.3, top_k=1), Sampling(temperature=0.7, top_p=1e-6)):
      np.testing.assert_array_equal(next_token(logits, s, jax.random.key(seed)), greedy)


def test_samples_come_only_from_the_allowed_set():
  row = np.random.default_rng(3).standard_normal(50).astype(np.float32)
  logits = jnp.asarray(np.tile(row, (2000, 1)))  # 2000 independent draws, one per row
  top3 = set(np.argsort(-row)[:3].tolist())
  draws = np.asarray(next_token(logits, Sampling(temperature=1.0, top_k=3), jax.random.key(0)))
  assert set(draws.tolist()) == top3
  probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
  order = np.argsort(-probs)
  nucleus = set(order[: np.searchsorted(np.cumsum(probs[order]), 0.5) + 1].tolist())
  draws = np.asarray(next_token(logits, Sampling(temperature=1.0, top_p=0.5), jax.random.key(1)))
  assert set(draws.tolist()) == nucleus and len(nucleus) > 1


def test_sample_frequencies_follow_the_tempered_softmax():
  logits = np.log(PROBS).astype(np.float32)
  for temperature in (0.5, 2.0):
    expected = PROBS ** (1 / temperature) / (PROBS ** (1 / temperature)).sum()
    draws = np.asarray(
      next_token(
        jnp.asarray(np.tile(logits, (8000, 1))),
        Sampling(temperature=temperature),
        jax.random.key(7),
      )
    )
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, expected, atol=0.02)  # ~4 standard errors


def test_sampling_is_seeded():
  logits = jnp.asarray(np.zeros((64, 1000), np.float32))
  s = Sampling(temperature=1.0)
  a = np.asarray(next_token(logits, s, jax.random.key(5)))
  np.testing.assert_array_equal(a, next_token(logits, s, jax.random.key(5)))
  assert (a != np.asarray(next_token(logits, s, jax.random.key(6)))).mean() > 0.9


@pytest.mark.parametrize(
  "kwargs", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_sampling_values_are_rejected(kwargs):
  with pytest.raises(ValueError):
    Sampling(**kwargs)


def test_generation_top_k_one_equals_greedy_and_samples_stay_in_top_k():
  params, config = random_model()
  prompt = [prompts(config)[2]]  # text only: compiles fast
  greedy = generate(params, config, prompt, 5).token_lists()
  top1 = generate(
    params, config, prompt, 5, Sampling(temperature=0.7, top_k=1), jax.random.key(3)
  ).token_lists()
  assert top1 == greedy
  s = Sampling(temperature=2.0, top_k=5)
  out = generate(params, config, prompt, 5, s, jax.random.key(4), return_logits=True)
  again = generate(params, config, prompt, 5, s, jax.random.key(4), return_logits=True)
  assert out.token_lists() == again.token_lists()
  tokens = out.token_lists()[0]
  for step, token in enumerate(tokens):
    assert token in np.argsort(-out.logits[0, step])[:5]
  others = [
    generate(params, config, prompt, 5, s, jax.random.key(k), return_logits=True).token_lists()[0]
    for k in (5, 6)
  ]
  assert any(o != tokens for o in others + greedy)
