"""Loss terms against plain numpy formulas."""

import numpy as np
import pytest

from gacd_jax import errors
from gacd_jax import losses


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(6, 5)).astype(np.float32) * 3,
          rng.normal(size=(6, 5)).astype(np.float32) * 3, rng.integers(0, 5, 6))


def test_cross_entropy_matches_numpy(logits):
  z, _, y = logits
  expected = -np.log(_softmax(z)[np.arange(6), y])
  np.testing.assert_allclose(losses.cross_entropy(z, y), expected, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_matches_numpy_with_both_reductions(logits, temperature):
  target, z, _ = logits
  p, q = _softmax(target / temperature), _softmax(z / temperature)
  per_class = p * (np.log(p) - np.log(q))
  got = losses.kl_divergence_per_class(target, z, temperature)
  np.testing.assert_allclose(got, per_class, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(losses.reduce_kl(got, "batchmean"), per_class.sum(1).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.reduce_kl(got, "mean"), per_class.mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.kl_divergence(target, z, temperature), per_class.sum(1),
                             rtol=1e-4, atol=1e-6)


def test_kl_of_identical_distributions_is_zero(logits):
  z, _, _ = logits
  np.testing.assert_allclose(losses.kl_divergence(z, z), 0.0, atol=1e-6)


def test_unknown_kl_reduction_is_a_config_error(logits):
  with pytest.raises(errors.ConfigError, match="batchmean"):
    losses.reduce_kl(np.zeros((2, 3)), "sum")


def test_margin_matches_numpy(logits):
  z, _, y = logits
  expected = []
  for row, label in zip(z, y):
    others = np.delete(row, label)
    expected.append(others.max() - row[label])
  np.testing.assert_allclose(losses.margin(z, y), expected, rtol=1e-6)
