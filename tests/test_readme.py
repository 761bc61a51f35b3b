"""The README's "Write your own loss" example, run exactly as written, trains."""

import pathlib
import re

import jax
import numpy as np

from gacd_jax import data
from gacd_jax import methods
from gacd_jax import sharding
from gacd_jax import train
from tests import test_train

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
  match = re.search(r"<!-- own-loss-example -->\s*```python\n(.*?)```", README.read_text(),
                    re.DOTALL)
  assert match, "the README lost its own-loss example"
  return match.group(1)


def test_the_own_loss_example_registers_and_trains():
  if "logit_matching" not in methods.REGISTRY:
    exec(compile(_example(), str(README), "exec"), {})  # pylint: disable=exec-used
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
