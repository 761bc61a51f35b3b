"""The train step and loop: learning, a frozen teacher, 1 vs 8 devices, resume, NaN, workdirs."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gacd_jax import checkpoints
from gacd_jax import config as config_lib
from gacd_jax import data
from gacd_jax import errors
from gacd_jax import methods
from gacd_jax import models
from gacd_jax import sharding
from gacd_jax import rundir
from gacd_jax import train
from gacd_jax.methods import gacd as gacd_lib
from tests import helpers


def _step_setup(method_name: str, width: int = 8, dtype=jnp.float32, clean_bn_update=True):
  config = helpers.tiny_config(method_name, width=width)
  config.method.clean_bn_update = clean_bn_update
  config.method.gacd.update(gacd_lib.RECONSTRUCTION)  # the memory-bank form (NCE)
  source = data.build("digits", "train", image_size=8, channels=1, num_examples=128)
  method = methods.build(config.method)
  model = models.build("small_cnn", 10, width=width, dtype=dtype)
  tx = train.make_optimizer(config.optim, 4, 100)
  teacher_model = models.build("small_cnn", 10, width=16, dtype=dtype)
  info = methods.InitInfo(num_examples=128, train_labels=train.all_labels(source), num_classes=10,
                          steps_per_epoch=4,
                          student_feature_dim=models.feature_dim(model, (8, 8, 1)),
                          teacher_feature_dim=models.feature_dim(teacher_model, (8, 8, 1)),
                          teacher_num_classes=10)
  state = train.init_state(jax.random.key(0), model, method, tx, (8, 8, 1), info)
  teacher_vars = teacher_model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), train=False)
  step = train.make_step(model, method, tx, train.AttackSettings.resolve(config.attack, method),
                         teacher_model, crop_padding=1, flip=False)
  batch = source.get(np.arange(32))
  return state, teacher_vars, step, batch


@pytest.mark.parametrize("method,factor", [("natural", 0.6), ("pgd_at", 0.95)])
def test_loss_falls_on_a_fixed_batch(method, factor):
  state, teacher_vars, step, batch = _step_setup(method)
  mesh = sharding.make_mesh()
  step_fn = train.jit_step(step, mesh)
  batch = data.to_global(batch, sharding.batch_sharding(mesh))
  losses = []
  for _ in range(25):
    state, metrics = step_fn(state, teacher_vars, batch, jax.random.key(3))
    losses.append(float(metrics["loss"]))
  assert all(math.isfinite(l) for l in losses)
  assert np.mean(losses[-5:]) < factor * np.mean(losses[:3])
  assert {"loss", "grad_norm"} <= set(metrics)
  assert ("adv_acc" in metrics) == (method == "pgd_at")
  assert int(state["step"]) == 25


def test_teacher_is_bit_identical_after_a_step_and_not_in_the_optimizer():
  state, teacher_vars, step, batch = _step_setup("ard")
  before = jax.tree.map(np.array, teacher_vars)
  mesh = sharding.make_mesh()
  batch = data.to_global(batch, sharding.batch_sharding(mesh))
  new_state, metrics = train.jit_step(step, mesh)(state, teacher_vars, batch, jax.random.key(0))
  after = jax.tree.map(np.array, teacher_vars)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert float(metrics["kl"]) > 0
  # the optimizer holds the student's parameters only (and the method's, empty for ARD)
  assert set(new_state["params"]) == {"student", "method"} and new_state["params"]["method"] == {}
  n_teacher = sum(x.size for x in jax.tree.leaves(teacher_vars["params"]))
  n_opt = sum(x.size for x in jax.tree.leaves(new_state["opt_state"]) if x.ndim)  # not counters
  n_student = sum(x.size for x in jax.tree.leaves(new_state["params"]))
  assert n_opt == n_student and n_teacher != n_student


ONE_VS_EIGHT = """
import jax, numpy as np
from gacd_jax import data, sharding, train
from tests.test_train import _step_setup
assert len(jax.devices()) == 8
state, teacher_vars, step, batch = _step_setup("{method}")
results = []
for devices in (jax.devices()[:1], jax.devices()):
  mesh = sharding.make_mesh(devices)
  s = jax.tree.map(lambda x: x.copy(), state)
  g = data.to_global(batch, sharding.batch_sharding(mesh))
  fn = train.jit_step(step, mesh)
  s, m = fn(s, teacher_vars, g, jax.random.key(5))
  results.append(jax.device_get((s["params"], s["batch_stats"], s["method_state"], m["loss"])))
one, eight = results
# per leaf, relative to the leaf's scale where it exceeds 1 (the NCE normaliser Z is ~N)
diff = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                 / max(1.0, float(np.abs(np.asarray(a, np.float64)).max())))
           for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)))
# rows of each memory bank the 8-device step wrote, against the batch's dataset indices
written = []
for path, bank in jax.tree_util.tree_flatten_with_path(eight[2])[0]:
  if "memory" in jax.tree_util.keystr(path):
    before = np.asarray(jax.tree_util.tree_flatten_with_path(state["method_state"])[0][
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
            state["method_state"])[0]].index(jax.tree_util.keystr(path))][1])
    rows = np.flatnonzero(np.any(np.asarray(bank) != before, axis=1))
    written.append(sorted(rows.tolist()) == sorted(batch["index"].tolist()))
print(diff, all(written), len(written))
"""


def test_a_student_forward_can_leave_the_running_statistics_alone():
  model = models.build("small_cnn", 10, width=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  x1, x2 = jax.random.uniform(jax.random.key(1), (2, 16, 8, 8, 1))
  student = train.StudentForward(model, variables["params"], variables["batch_stats"])
  student(x1)
  after_x1 = student.batch_stats
  logits, _ = student(x2, update_stats=False)
  assert student.batch_stats is after_x1
  (expected, _), updated = model.apply({"params": variables["params"], "batch_stats": after_x1},
                                       x2, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(logits, expected)  # batch statistics, as in train mode
  student(x2)
  jax.tree.map(np.testing.assert_array_equal, student.batch_stats, updated["batch_stats"])
  assert not np.allclose(jax.tree.leaves(updated)[0], jax.tree.leaves(after_x1)[0])


def test_a_clean_forward_that_keeps_no_statistics_changes_them_and_nothing_else():
  """RSLAD with `config.method.clean_bn_update=False`: the same loss and update of the
  parameters, other running statistics."""
  mesh = sharding.make_mesh()
  results = []
  for keep in (True, False):
    state, teacher_vars, step, batch = _step_setup("rslad", clean_bn_update=keep)
    batch = data.to_global(batch, sharding.batch_sharding(mesh))
    state, metrics = train.jit_step(step, mesh)(state, teacher_vars, batch, jax.random.key(3))
    results.append(jax.device_get((metrics["loss"], state["params"], state["batch_stats"])))
  (loss, params, stats), (loss_no, params_no, stats_no) = results
  np.testing.assert_allclose(loss_no, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               params_no, params)
  gaps = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(stats_no), jax.tree.leaves(stats))]
  assert min(gaps) > 1e-4, gaps  # every BatchNorm layer's statistics moved differently


@pytest.mark.parametrize("method,banks", [("ard", 0), ("gacd", 2)])
def test_one_device_and_eight_fake_devices_agree(method, banks):
  out = helpers.run_python(ONE_VS_EIGHT.format(method=method), devices=8)
  diff, rows_ok, n_banks = out.split()[-3:]
  assert float(diff) < 1e-5  # params, BatchNorm statistics, method state and loss
  assert int(n_banks) == banks and rows_ok == "True"


def _final_params(workdir):
  _, raw = checkpoints.restore(workdir)
  return raw["params"], raw["batch_stats"], raw["opt_state"]


def test_a_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(tmp_path):
  config = helpers.tiny_config("pgd_at", epochs=2)  # 8 steps over 2 epochs
  train.train(config, str(tmp_path / "straight"), progress=False)
  train.train(config, str(tmp_path / "resumed"), progress=False, stop_after=3)
  assert checkpoints.latest_step(tmp_path / "resumed") == 3
  train.train(config, str(tmp_path / "resumed"), progress=False)
  assert checkpoints.latest_step(tmp_path / "resumed") == 8
  a, b = _final_params(tmp_path / "straight"), _final_params(tmp_path / "resumed")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)
  lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["step"] == 8
  assert list((tmp_path / "straight").glob("events.out.tfevents.*"))


def test_a_workdir_of_another_config_is_refused_unless_overwritten(tmp_path):
  config = helpers.tiny_config("natural")
  train.train(config, str(tmp_path), progress=False, stop_after=2)
  other = helpers.tiny_config("natural", width=6)
  with pytest.raises(errors.ConfigError, match="model.small_cnn.width"):
    train.train(other, str(tmp_path), progress=False)
  train.train(other, str(tmp_path), progress=False, overwrite=True, stop_after=2)
  assert json.loads((tmp_path / "config.json").read_text())["model"]["small_cnn"]["width"] == 6
  # more epochs on the same run is a resumption, not another config
  more = helpers.tiny_config("natural", width=6, epochs=2)
  train.train(more, str(tmp_path), progress=False)
  assert checkpoints.latest_step(tmp_path) == 8


def test_a_non_finite_loss_stops_the_run_with_its_step():
  class Bar:
    def set_postfix(self, **_):
      pass
  loss_code = 1 + [group for group, _ in train.NONFINITE_GROUPS].index("loss")
  pending = [(10, {"loss": np.float32(1.0), "nonfinite": np.int32(0)}),
             (11, {"loss": np.float32(np.nan), "nonfinite": np.int32(loss_code)}),
             (12, {"loss": np.float32(np.nan), "nonfinite": np.int32(loss_code)})]
  # pending holds 0-based step indices; the error names the step count, as checkpoints and logs do
  with pytest.raises(train.NonFiniteError, match="the loss became nan at step 12;"):
    train._flush(pending, None, Bar(), 0.0)


def test_a_method_with_a_teacher_needs_one(tmp_path):
  with pytest.raises(errors.ConfigError, match="teacher.workdir"):
    train.train(helpers.tiny_config("ard"), str(tmp_path), progress=False)


def test_eps_warmup_scales_the_training_attack_by_the_step():
  """With a warm-up of W steps, step s attacks with eps * (s + 1) / W: the first step of a run with
  warm-up equals the first step of a run without it at eps / W (same keys), and from step W on
  the full eps is used."""
  config = helpers.tiny_config("pgd_at")
  method = methods.build(config.method)
  config.attack.eps_warmup_epochs = 2
  warm = train.AttackSettings.resolve(config.attack, method, steps_per_epoch=5)
  assert warm.warmup_steps == 10
  np.testing.assert_allclose([float(warm.scale(jnp.int32(s))) for s in (0, 4, 9, 30)],
                             [0.1, 0.5, 1.0, 1.0], rtol=1e-6)
  config.attack.eps_warmup_epochs = 0
  assert train.AttackSettings.resolve(config.attack, method, steps_per_epoch=5).scale(0) == 1.0

  state, teacher_vars, _, batch = _step_setup("pgd_at")
  model = models.build("small_cnn", 10, width=8)
  tx = train.make_optimizer(config.optim, 4, 100)
  small = dataclasses.replace(warm, eps=warm.eps / 10, step_size=warm.step_size / 10,
                              warmup_steps=0)
  outputs = []
  for settings in (warm, small):
    step = jax.jit(train.make_step(model, method, tx, settings, crop_padding=1, flip=False))
    new_state, _ = step(jax.tree.map(jnp.array, state), teacher_vars, batch, jax.random.key(3))
    outputs.append(new_state["params"])
  for a, b in zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_switch_added_since_a_run_was_made_is_no_difference_at_its_default():
  """A run's config.json written before a switch existed resumes when the switch holds its
  default (the behaviour the run was made with), and not when it is set to something else."""
  new = json.loads(config_lib.to_json(helpers.tiny_config("pgd_at")))
  old = json.loads(json.dumps(new))
  del old["attack"]["eps_warmup_epochs"]
  assert rundir.config_differences(old, new) == []
  new["attack"]["eps_warmup_epochs"] = 3
  assert rundir.config_differences(old, new) == ["attack.eps_warmup_epochs"]
  del new["attack"]["eps_warmup_epochs"]  # a key the new config lacks is always a difference
  old["attack"]["eps_warmup_epochs"] = 0
  assert rundir.config_differences(old, new) == ["attack.eps_warmup_epochs"]


def test_another_methods_settings_are_no_difference():
  """A PGD-AT run does not read `method.ard.*`: a changed ARD default resumes it; its own
  settings and the keys directly under `method` still count."""
  old = json.loads(config_lib.to_json(helpers.tiny_config("trades")))
  new = json.loads(json.dumps(old))
  new["method"]["ard"]["temperature"] = 5.0
  new["method"]["gacd"]["estimator"] = "infonce"
  assert rundir.config_differences(old, new) == []
  new["method"]["trades"]["beta"] = 1.0
  new["method"]["kl_reduction"] = "mean"
  assert rundir.config_differences(old, new) == ["method.kl_reduction", "method.trades.beta"]
  new["method"]["name"] = "ard"  # another method: its name differs, and its settings count
  assert rundir.config_differences(old, new) == ["method.ard.temperature", "method.kl_reduction",
                                                 "method.name"]
