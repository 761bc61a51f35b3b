"""The evaluation loop: compiled once per model, attack and batch shape (a second evaluation does
not trace again), every example once in the split's order, and the same numbers on one device,
eight fake devices and two processes."""

import os
import socket
import subprocess
import sys

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


# Accuracies (clean, PGD; an eps sweep) and features of a small_cnn with random weights on the
# first 100 digits (the features: all of them); process 0 writes them.
REPORTS = """
import sys
import jax, numpy as np
{setup}
from gacd_jax import evaluate, models, probe
from tests import helpers
config = helpers.tiny_config()
config.eval.max_examples = 100
source = evaluate.test_source(config)
settings = evaluate.EvalSettings.from_config(config.eval)
module = models.build("small_cnn", 10, width=4)
variables = module.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32), train=False)
accuracy, _ = evaluate.evaluate_model(evaluate.logits_fn(module), variables, source, settings,
                                      names=("clean", "pgd20"))
curve = evaluate.eps_curve(evaluate.logits_fn(module), variables, source, settings, [0.05, 0.1])
probe_features, labels = probe.features_and_labels(module, variables, source, 64)
if jax.process_index() == 0:
  np.savez({out!r}, accuracy=[accuracy["clean"], accuracy["pgd20"], *curve], labels=labels,
           features=probe_features)
"""

DISTRIBUTED = """
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
assert jax.process_count() == 2 and len(jax.devices()) == 2
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _assert_same_reports(a, b):
  np.testing.assert_array_equal(a["accuracy"], b["accuracy"])
  np.testing.assert_array_equal(a["labels"], b["labels"])
  np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_one_device_eight_fake_devices_and_two_processes_agree(tmp_path):
  outputs = {}
  for devices in (1, 8):
    outputs[devices] = tmp_path / f"{devices}.npz"
    helpers.run_python(REPORTS.format(setup=f"assert len(jax.devices()) == {devices}",
                                      out=str(outputs[devices])), devices=devices)
  one, eight = np.load(outputs[1]), np.load(outputs[8])
  assert one["features"].shape == (len(one["labels"]), 16)
  _assert_same_reports(one, eight)

  # Two processes on loopback, one device each: each reads its half of every batch. Without the
  # persistent cache, so that neither runs ahead (loading what the other compiles) and leaves the
  # other more than gloo's 30 s to join the first collective.
  out = tmp_path / "two.npz"
  script = tmp_path / "reports.py"
  script.write_text(REPORTS.format(setup=DISTRIBUTED, out=str(out)))
  env = dict(os.environ, PYTHONPATH=helpers.REPO, XLA_FLAGS=helpers.device_flags(1),
             JAX_ENABLE_COMPILATION_CACHE="false")
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, str(script), coordinator, str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=helpers.REPO) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
  _assert_same_reports(one, np.load(out))
