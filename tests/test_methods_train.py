"""Every registered method trains: its jitted step, called on one fixed digits batch, gives finite
losses that fall.

Compiling one step per method dominates the time, so everything is small: 8x8 digits, batch 32, a
small_cnn of width 4 as the student and a shared, untrained small_cnn of width 4 as the teacher
(its outputs are fixed targets all the same), 1-step attacks, 16 negatives and 16-dim heads for
the contrastive methods. After compiling, the 30 steps take well under a second. They are 30
rather than ~12 because CRD's and GACD's loss on a fixed batch is not monotone: it swings with a
period of ~10 steps as the memory banks (momentum 0.5) chase the embeddings, and falls clearly only
over a few periods.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gacd_jax import data
from gacd_jax import methods
from gacd_jax import models
from gacd_jax import sharding
from gacd_jax import train
from tests import helpers

WIDTH = 4
NUM_EXAMPLES = 128
STEPS = 30


def _init_key(seed: int) -> jax.Array:
  # Initialisation runs op by op; with the rbg generator its ops compile in ~3 s instead of ~11 s
  # for threefry. The step itself keeps the default generator.
  return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def setup():
  source = data.build("digits", "train", image_size=8, channels=1, num_examples=NUM_EXAMPLES)
  teacher_model = models.build("small_cnn", 10, width=WIDTH)
  teacher_vars = teacher_model.init(_init_key(1), jnp.zeros((1, 8, 8, 1)), train=False)
  mesh = sharding.make_mesh()
  batch = data.to_global(source.get(np.arange(32)), sharding.batch_sharding(mesh))
  feature_dim = models.feature_dim(teacher_model, (8, 8, 1))
  info = methods.InitInfo(num_examples=NUM_EXAMPLES, train_labels=train.all_labels(source),
                          steps_per_epoch=NUM_EXAMPLES // 32, num_classes=10,
                          student_feature_dim=feature_dim, teacher_feature_dim=feature_dim,
                          teacher_num_classes=10)
  return teacher_model, teacher_vars, mesh, batch, info


def _config(method_name: str):
  config = helpers.tiny_config(method_name, width=WIDTH, num_examples=NUM_EXAMPLES)
  for name in ("gacd", "crd"):
    config.method[name].num_negatives = 16
    config.method[name].feat_dim = 16
  config.method.crdnd.feat_dim = 16
  config.method.iad.warmup_epochs = 0  # the introspection term from the first step
  config.attack.steps = 1  # each unrolled attack step adds ~25% to the compile time
  return config


@pytest.mark.parametrize("method_name", methods.names())
def test_every_method_trains_on_a_fixed_batch(setup, method_name):
  teacher_model, teacher_vars, mesh, batch, info = setup
  config = _config(method_name)
  method = methods.build(config.method)
  model = models.build("small_cnn", 10, width=WIDTH)
  tx = train.make_optimizer(config.optim, info.steps_per_epoch, STEPS)
  state = train.init_state(_init_key(0), model, method, tx, (8, 8, 1), info)
  step = train.make_step(model, method, tx, train.AttackSettings.resolve(config.attack, method),
                         teacher_model, crop_padding=1, flip=False)
  step_fn = train.jit_step(step, mesh)
  losses = []
  for _ in range(STEPS):
    state, metrics = step_fn(state, teacher_vars, batch, jax.random.key(3))
    losses.append(float(metrics["loss"]))
  assert all(math.isfinite(l) for l in losses), losses
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  assert int(state["step"]) == STEPS
