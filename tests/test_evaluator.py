"""The evaluation loop: compiled once per model, attack and batch shape (a second evaluation does
not trace again) and every example once in the split's order. That one device, eight fake devices
and two processes give the same numbers is tested in test_distributed (one pair of processes
trains and evaluates)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gacd_jax import analysis
from gacd_jax import evaluate
from gacd_jax import evaluator
from gacd_jax import probe
from tests import helpers

TRACES = []  # one entry per call of `_Counting` while a function is traced


class _Counting(nn.Module):
  """A two-layer MLP that records each call: calls happen while a jit traces, not when it runs."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    TRACES.append(x.shape)
    features = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(features), features


@pytest.fixture(scope="module")
def counted():
  config = helpers.tiny_config()
  config.eval.max_examples = 100  # two batches of 64, the second cut to 36
  module = _Counting()
  variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  return module, variables, evaluate.test_source(config), evaluate.EvalSettings.from_config(
      config.eval)


def _traces_per_call(call, times: int = 2) -> list[int]:
  counts = []
  for _ in range(times):
    before = len(TRACES)
    call()
    counts.append(len(TRACES) - before)
  return counts


def test_a_second_evaluation_of_the_same_model_does_not_trace_again(counted):
  module, variables, source, settings = counted
  # As `evaluate_model` does: a new apply function and attack object on every call.
  first, second = _traces_per_call(lambda: evaluate.robust_accuracy(
      evaluate.logits_fn(module), variables, source, evaluate.attack_fn("pgd20", settings),
      eps=[settings.eps, settings.eps / 2], batch_size=settings.batch_size,
      max_examples=settings.max_examples))
  assert first > 0 and second == 0
  # Other variables of the same shapes (another run of the architecture), another seed, another
  # number of examples: the same compilation.
  other = module.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
  assert _traces_per_call(lambda: evaluate.robust_accuracy(
      evaluate.logits_fn(_Counting()), other, source, evaluate.attack_fn("pgd20", settings),
      eps=settings.eps, batch_size=settings.batch_size, max_examples=64, seed=3), 1) == [0]


def test_the_analyses_and_the_probe_compile_once(counted):
  module, variables, source, settings = counted
  assert _traces_per_call(lambda: analysis.steps_curve(
      evaluate.logits_fn(module), variables, source, settings, steps=(1, 2)))[1] == 0
  assert _traces_per_call(lambda: analysis.paired_features(
      module, variables, module, variables, source, settings))[1] == 0
  assert _traces_per_call(lambda: probe.features_and_labels(module, variables, source, 64))[1] == 0


def test_every_example_once_in_order(counted):
  module, variables, source, _ = counted
  features, labels = probe.features_and_labels(module, variables, source, 64)
  batch = source.get(np.arange(source.num_examples))
  assert len(labels) == source.num_examples > 64
  np.testing.assert_array_equal(labels, batch["label"])
  expected = module.apply(variables, jnp.asarray(batch["image"]))[1]
  np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_an_unhashable_function_still_runs(counted):
  module, variables, source, _ = counted

  class Unhashable:
    __hash__ = None

    def __call__(self, variables, x, y, rng):
      return {"label": y}

  out = evaluator.map_split(Unhashable(), variables, source, batch_size=64, max_examples=70)
  np.testing.assert_array_equal(out[0]["label"], source.get(np.arange(70))["label"])


def test_equal_models_and_attacks_are_equal_cache_keys():
  settings = evaluate.EvalSettings()
  assert evaluate.logits_fn(_Counting()) == evaluate.logits_fn(_Counting())
  assert hash(evaluate.logits_fn(_Counting())) == hash(evaluate.logits_fn(_Counting()))
  assert evaluate.logits_fn(_Counting()) != evaluate.logits_fn(_Counting(num_classes=5))
  # The batch size and number of examples do not change the attack.
  resized = evaluate.EvalSettings(batch_size=32, max_examples=10)
  assert evaluate.attack_fn("pgd20", settings) == evaluate.attack_fn("pgd20", resized)
  assert evaluate.attack_fn("pgd20", settings) != evaluate.attack_fn(
      "pgd20", evaluate.EvalSettings(pgd_steps=7))
  with pytest.raises(ValueError, match="unknown attack"):
    evaluate.attack_fn("pgd", settings)
