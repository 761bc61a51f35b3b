"""The README's "Write your own loss" example, run exactly as written, trains: in a step, and
from `configs/digits.py:logit_matching` as a user runs it. Each test starts from the built-in
methods (the registry fixture in conftest.py), so registering the example leaks into no other test.
"""

import json
import math
import pathlib
import re

import jax
import numpy as np

from gacd_jax import data
from gacd_jax import methods
from gacd_jax import recipes
from gacd_jax import sharding
from gacd_jax import train
from gacd_jax.methods import baselines
from gacd_jax.methods import gacd
from tests import test_train
from tests.test_configs import load

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
  match = re.search(r"<!-- own-loss-example -->\s*```python\n(.*?)```", README.read_text(),
                    re.DOTALL)
  assert match, "the README lost its own-loss example"
  return match.group(1)


def _register_example() -> None:
  exec(compile(_example(), str(README), "exec"), {})  # pylint: disable=exec-used


def test_the_own_loss_example_registers_and_trains():
  _register_example()
  assert "logit_matching" in methods.names()
  state, teacher_vars, step, batch = test_train._step_setup("logit_matching")
  mesh = sharding.make_mesh()
  step_fn = train.jit_step(step, mesh)
  batch = data.to_global(batch, sharding.batch_sharding(mesh))
  losses = []
  for _ in range(12):
    state, metrics = step_fn(state, teacher_vars, batch, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
  assert {"ce", "match", "adv_acc"} <= set(metrics)


def _shortened(config):
  """The config, cut to two steps of 32 digits with a 1-step attack."""
  config.data.num_examples = 64
  config.train.batch_size = 32
  config.train.epochs = 1
  config.train.log_every = 1
  config.attack.steps = 1
  return config


def test_the_own_loss_example_trains_from_the_digits_config(tmp_path):
  _register_example()
  teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
  teacher = _shortened(load("digits.py:natural"))
  teacher.model.small_cnn.width = 4
  train.train(teacher, teacher_dir, progress=False)
  config = _shortened(load("digits.py:logit_matching", f"--config.teacher.workdir={teacher_dir}"))
  assert (config.method.logit_matching.weight, config.teacher.model) == (0.1, "small_cnn")
  train.train(config, student_dir, progress=False)
  logged = [json.loads(line) for line in open(tmp_path / "student" / "metrics.jsonl")]
  assert len(logged) == 2 and all(math.isfinite(entry["loss"]) for entry in logged)
  assert {"ce", "match"} <= set(logged[-1])


def test_a_registered_method_gets_the_fallback_recipe_on_cifar():
  _register_example()
  c = load("cifar10.py:logit_matching,resnet18")
  r = recipes.FALLBACK_RECIPE
  assert (c.method.name, c.train.epochs, c.optim.milestones, c.optim.lr, c.train.batch_size) == (
      "logit_matching", r.epochs, r.milestones, r.lr, r.batch_size)
  assert c.teacher.model == recipes.TEACHER_MODEL  # it distils, so it names the teacher


def test_each_test_starts_with_the_built_in_methods_only():
  """Runs after the tests above register the README's method (and in any order): none is left."""
  assert set(methods.names()) == set(baselines.REGISTRY) | set(gacd.REGISTRY)
  assert "logit_matching" not in methods.defaults()


def test_the_readme_test_command_is_what_ci_runs():
  ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
  match = re.search(r"Run the tests \(what CI runs, through `\.ci/run`\):\s*```bash\n(.*?)\n```",
                    README.read_text(), re.DOTALL)
  assert match and match.group(1) == ci
  assert "robustbench==1.1.1" in ci  # the parity tests' reference (tests/test_robustbench.py)
