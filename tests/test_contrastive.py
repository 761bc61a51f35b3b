"""Contrastive estimators and the GACD / CRD / CRDND methods against plain numpy formulas."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gacd_jax import attacks
from gacd_jax import config as config_lib
from gacd_jax import errors
from gacd_jax import losses
from gacd_jax import methods
from gacd_jax import models
from gacd_jax import sharding
from gacd_jax import train
from gacd_jax.methods import contrastive
from gacd_jax.methods import gacd as gacd_lib
from gacd_jax.methods.base import Context, InitInfo
from tests import helpers

N, C, B, K = 64, 4, 8, 8
TAU = 0.07


@pytest.fixture(scope="module")
def labels():
  return np.random.default_rng(0).integers(0, C, N).astype(np.int32)


def _info(labels, student_dim=6, teacher_dim=5, num_classes=C, teacher_num_classes=C):
  return InitInfo(num_examples=len(labels), train_labels=labels, steps_per_epoch=4,
                  num_classes=num_classes,
                  student_feature_dim=student_dim, teacher_feature_dim=teacher_dim,
                  teacher_num_classes=teacher_num_classes)


def _method_config(name, **switches):
  cfg = config_lib.default().method
  cfg.name = name
  for key, value in switches.items():
    cfg[name][key] = value
  return cfg


# ---------------------------------------------------------------------------------------------
# Independent numpy references, from METHODS.md section 2.


def _np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_embed(head, f):
  return _np_normalize(f @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"]))


def _np_nce(probs, n_data, w):
  m = probs.shape[1] - 1
  pn = 1.0 / n_data
  log_d1 = np.log(probs[:, 0] / (probs[:, 0] + m * pn + 1e-7))
  log_d0 = np.log(m * pn / (probs[:, 1:] + m * pn + 1e-7))
  return -(np.sum(w * log_d1) + np.sum(log_d0)) / probs.shape[0]


def _np_crd_step(mem_s, mem_t, z_s, z_t, e_s, e_t, idx, cidx, w, momentum=0.5):
  """One CRD step: (loss, new banks, Z). Banks are copied, not changed in place."""
  n_data = len(mem_s)
  scores_t = np.exp(np.einsum("bkd,bd->bk", mem_s[cidx], e_t) / TAU)  # teacher anchor
  scores_s = np.exp(np.einsum("bkd,bd->bk", mem_t[cidx], e_s) / TAU)  # student anchor
  z_t = scores_t.mean() * n_data if z_t < 0 else z_t
  z_s = scores_s.mean() * n_data if z_s < 0 else z_s
  loss = _np_nce(scores_t / z_t, n_data, w) + _np_nce(scores_s / z_s, n_data, w)
  mem_s, mem_t = mem_s.copy(), mem_t.copy()
  mem_s[idx] = _np_normalize(momentum * mem_s[idx] + (1 - momentum) * e_s)
  mem_t[idx] = _np_normalize(momentum * mem_t[idx] + (1 - momentum) * e_t)
  return loss, mem_s, mem_t, z_s, z_t


def _np_info_nce(e_s, e_t, w):
  logits = e_t @ e_s.T / TAU
  def ce_rows(z):
    z = z - z.max(1, keepdims=True)
    return -(np.diag(z) - np.log(np.exp(z).sum(1)))
  return np.mean(w * 0.5 * (ce_rows(logits) + ce_rows(logits.T)))


# ---------------------------------------------------------------------------------------------
# Estimators.


@pytest.mark.parametrize("feat_dim", [16, 4])  # 16: all-dots path; 4: gather path
def test_crd_nce_matches_numpy_over_two_steps(labels, feat_dim):
  est = contrastive.Estimator("nce", feat_dim=feat_dim, temperature=TAU, num_negatives=K)
  params, state = est.init(jax.random.key(0), _info(labels))
  stdv = 1 / np.sqrt(feat_dim / 3)
  assert np.abs(state["memory_student"]).max() <= stdv and float(state["z_student"]) == -1.0
  rng = np.random.default_rng(1)
  mem_s, mem_t = (np.asarray(state[k], np.float64) for k in ("memory_student", "memory_teacher"))
  z_s = z_t = -1.0
  call = jax.jit(est.__call__)
  for step in range(2):
    idx = rng.permutation(N)[:B].astype(np.int32)
    f_s, f_t = rng.normal(size=(B, 6)), rng.normal(size=(B, 5))
    w = rng.uniform(0, 2, B)
    cidx = est.sample(state, {"index": jnp.asarray(idx), "label": jnp.asarray(labels[idx])},
                      jax.random.key(step))
    per_example, state = call(params, state, jnp.asarray(f_s, jnp.float32),
                              jnp.asarray(f_t, jnp.float32), jnp.asarray(idx), cidx,
                              jnp.asarray(w, jnp.float32))
    loss, mem_s, mem_t, z_s, z_t = _np_crd_step(
        mem_s, mem_t, z_s, z_t, _np_embed(params["student_head"], f_s),
        _np_embed(params["teacher_head"], f_t), idx, np.asarray(cidx), w)
    np.testing.assert_allclose(float(per_example.mean()), loss, rtol=1e-5)
    np.testing.assert_allclose(state["memory_student"], mem_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["memory_teacher"], mem_t, rtol=1e-5, atol=1e-6)
    # Z is set on the first step and then frozen.
    np.testing.assert_allclose([state["z_student"], state["z_teacher"]], [z_s, z_t], rtol=1e-5)
  assert z_s > 0 and z_t > 0


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(2)
  est = contrastive.Estimator("infonce", feat_dim=16, temperature=TAU)
  params, state = est.init(jax.random.key(0), _info(np.zeros(N, np.int32)))
  f_s, f_t, w = rng.normal(size=(B, 6)), rng.normal(size=(B, 5)), rng.uniform(0, 2, B)
  per_example, new_state = est(params, state, jnp.asarray(f_s, jnp.float32),
                               jnp.asarray(f_t, jnp.float32), jnp.arange(B),
                               weights=jnp.asarray(w, jnp.float32))
  expected = _np_info_nce(_np_embed(params["student_head"], f_s),
                          _np_embed(params["teacher_head"], f_t), w)
  np.testing.assert_allclose(float(per_example.mean()), expected, rtol=1e-5)
  assert state == {} and new_state == {}


@pytest.mark.parametrize("num_negatives,with_replacement", [(8, False), (8, True), (60, False)])
def test_negatives_are_of_other_classes_and_the_positive_is_the_own_index(
    labels, num_negatives, with_replacement):
  state = contrastive.init_memory(jax.random.key(0), labels, C, 16)
  index = jnp.arange(0, N, N // B, dtype=jnp.int32)
  sample = jax.jit(lambda r: contrastive.sample_contrast_index(
      r, state, index, jnp.asarray(labels)[index], num_negatives, with_replacement))
  seen = [set() for _ in range(B)]
  for seed in range(100):
    cidx = np.asarray(sample(jax.random.key(seed)))
    assert cidx.shape == (B, num_negatives + 1)
    np.testing.assert_array_equal(cidx[:, 0], index)
    negatives = cidx[:, 1:]
    assert (labels[negatives] != labels[np.asarray(index)][:, None]).all()
    other_counts = N - np.bincount(labels, minlength=C)[labels[np.asarray(index)]]
    for row, count in zip(negatives, other_counts):
      if not with_replacement and num_negatives <= count:  # RepDistiller: no repeats then
        assert len(set(row)) == num_negatives
    for s, row in zip(seen, negatives):
      s.update(row.tolist())
  # Every example of another class gets drawn: the draw covers the whole other-class set.
  for s, i in zip(seen, np.asarray(index)):
    assert s == set(np.flatnonzero(labels != labels[i]).tolist())


# ---------------------------------------------------------------------------------------------
# Reweighting.


def test_nce_weights_scale_the_gradient_of_the_positive_term():
  probs = jnp.asarray(np.random.default_rng(3).uniform(0.01, 2.0, (B, K + 1)), jnp.float32)
  grad = jax.grad(lambda p, w: contrastive.nce_per_example(p, N, w).mean())
  w = jnp.ones(B).at[2].set(0.0)
  g1, g2 = jax.jit(grad)(probs, w), jax.jit(grad)(probs, 2.0 * w)
  assert float(g1[2, 0]) == 0.0 and float(jnp.abs(g1[:, 0]).min(where=w > 0, initial=1.0)) > 0
  np.testing.assert_allclose(g2[:, 0], 2.0 * g1[:, 0], rtol=1e-6)
  np.testing.assert_allclose(g2[:, 1:], g1[:, 1:], rtol=1e-6)  # negatives are not weighted


def test_info_nce_weights_scale_the_gradient_of_the_positive_term():
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(B, B)), jnp.float32)
  grad = jax.grad(lambda z, w: contrastive.info_nce_from_logits(z, w).mean())
  w = jnp.ones(B).at[5].set(0.0)
  g1, g2 = jax.jit(grad)(logits, w), jax.jit(grad)(logits, 3.0 * w)
  assert float(g1[5, 5]) == 0.0 and float(jnp.abs(jnp.diagonal(g1)).min(where=w > 0,
                                                                        initial=1.0)) > 0
  np.testing.assert_allclose(jnp.diagonal(g2), 3.0 * jnp.diagonal(g1), rtol=1e-5)


def test_sample_weights_are_constant_and_average_one():
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(B, C)) * 3, jnp.float32)
  y = jnp.asarray(rng.integers(0, C, B))
  p_y = np.asarray(jax.nn.softmax(logits))[np.arange(B), np.asarray(y)]
  for mode, raw in [("teacher_prob", p_y), ("power", p_y**2),
                    ("correct", (np.asarray(logits).argmax(1) == np.asarray(y)) * 1.0)]:
    w = gacd_lib.sample_weights(mode, y, logits, gamma=2.0)
    np.testing.assert_allclose(w, raw / raw.mean(), rtol=1e-5)
    # stop-gradient: the teacher's logits get no gradient through the weights
    grad = jax.grad(lambda z, m=mode: jnp.sum(gacd_lib.sample_weights(m, y, z, 2.0)))(logits)
    assert float(jnp.abs(grad).max()) == 0.0
  assert gacd_lib.sample_weights("none", y, logits) is None


# ---------------------------------------------------------------------------------------------
# Methods on tiny linear models.


def _linear_net(rng, in_dim, feature_dim, num_classes):
  """`x [B, 4, 4, 1] -> (logits, features)`: features tanh(x W), logits features V."""
  w_rng, v_rng = jax.random.split(rng)
  w = jax.random.normal(w_rng, (in_dim, feature_dim)) / np.sqrt(in_dim) * 4
  v = jax.random.normal(v_rng, (feature_dim, num_classes))

  def forward(x):
    features = jnp.tanh(x.reshape(x.shape[0], -1) @ w)
    return features @ v, features

  return forward


def _context(labels, method, *, teacher_classes=C, seed=0):
  student = _linear_net(jax.random.key(seed), 16, 6, C)
  teacher = _linear_net(jax.random.key(seed + 1), 16, 5, teacher_classes)
  rng = np.random.default_rng(seed)
  index = rng.permutation(N)[:B].astype(np.int32)
  x = jnp.asarray(rng.uniform(0, 1, (B, 4, 4, 1)), jnp.float32)
  batch = {"image": x, "label": jnp.asarray(labels[index]), "index": jnp.asarray(index)}
  params, state = method.init(jax.random.key(seed + 2),
                              _info(labels, teacher_num_classes=teacher_classes))
  return Context(student=student, teacher=teacher, teacher_clean=teacher(x), batch=batch,
                 params=params, state=state, rng=jax.random.key(seed + 3),
                 step=jnp.zeros((), jnp.int32))


def _small_nce(name="gacd", **switches):
  """A small CRD/GACD config; GACD as METHODS.md section 3 writes it, with `switches` on top."""
  if name == "gacd":
    switches = {**gacd_lib.RECONSTRUCTION, **switches}
  return _method_config(name, feat_dim=16, num_negatives=K, **switches)


@pytest.mark.parametrize("switches", [{"estimator": "nce"}, {"estimator": "infonce"},
                                      {"estimator": "nce", "anchor": "adv"}])
def test_the_guided_attack_raises_the_contrastive_loss_within_the_ball(labels, switches):
  method = methods.build(_small_nce(**switches))
  ctx = _context(labels, method)
  objective = method.objective(ctx)
  x = ctx.batch["image"]
  eps = 8 / 255
  x_adv = jax.jit(lambda r: attacks.pgd(objective, x, r, eps=eps, step_size=2 / 255, steps=5,
                                        unroll=1))(jax.random.key(0))
  assert float(objective(x_adv).mean()) > float(objective(x).mean()) + 1e-3
  assert float(jnp.abs(x_adv - x).max()) <= eps + 1e-6
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_gacd_loss_reports_its_terms_and_updates_the_banks(labels):
  method = methods.build(_small_nce(kl_weight=1.0, clean_ce_weight=0.5))
  ctx = _context(labels, method)
  x_adv = jnp.clip(ctx.batch["image"] + 0.01, 0, 1)
  total, metrics, state = method.loss(ctx, x_adv)
  assert {"ce_adv", "contrastive", "kl", "ce_clean", "logits_adv", "logits_clean"} <= set(metrics)
  expected = (metrics["ce_adv"] + 0.8 * metrics["contrastive"] + metrics["kl"]
              + 0.5 * metrics["ce_clean"])
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
  assert float(state["z_student"]) > 0
  changed = np.flatnonzero(np.any(state["memory_student"] != ctx.state["memory_student"], axis=1))
  np.testing.assert_array_equal(changed, np.sort(np.asarray(ctx.batch["index"])))


def test_crdnd_target_is_a_distribution():
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=(B, C)) * 3, jnp.float32)
  y = jnp.asarray(rng.integers(0, C, B))
  transition = gacd_lib.init_transition(C)
  for mode in gacd_lib.COMPENSATIONS:
    q = np.exp(gacd_lib.compensated_target(logits, y, mode, transition))
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)
  # the transition layer starts near the identity: q is close to the teacher's distribution
  q = np.exp(gacd_lib.compensated_target(logits, y, "transition", transition))
  np.testing.assert_allclose(q, jax.nn.softmax(logits), atol=0.02)


def test_crdnd_target_when_the_teacher_gives_the_label_probability_zero_or_one():
  y = jnp.asarray([0, 2])
  onehot = np.eye(C)[np.asarray(y)]
  zero = jnp.asarray([[-1e4, 1.0, 2.0, 0.0], [3.0, 0.0, -1e4, 1.0]])  # p_T(y) = 0
  p = np.asarray(jax.nn.softmax(zero))
  np.testing.assert_allclose(np.exp(gacd_lib.compensated_target(zero, y, "interpolate")),
                             onehot, atol=1e-6)
  # METHODS.md's normalise(p + (1 - p_y) onehot): half the teacher, half the label at p_y = 0
  np.testing.assert_allclose(np.exp(gacd_lib.compensated_target(zero, y, "additive")),
                             (p + onehot) / 2, atol=1e-6)
  one = jnp.asarray([[1e4, 0.0, 0.0, 0.0], [0.0, 0.0, 1e4, 0.0]])  # p_T(y) = 1
  for mode in ("additive", "interpolate"):
    np.testing.assert_allclose(np.exp(gacd_lib.compensated_target(one, y, mode)), onehot,
                               atol=1e-6)


def test_crdnd_loss_is_rslad_kl_to_the_target_plus_info_nce(labels):
  method = methods.build(_method_config("crdnd", feat_dim=16))
  assert (method.attack_start, method.attack_bn) == ("gaussian", "eval")
  ctx = _context(labels, method)
  x_adv = jnp.clip(ctx.batch["image"] - 0.02, 0, 1)
  total, metrics, _ = method.loss(ctx, x_adv)
  q = gacd_lib.compensated_target(ctx.teacher_clean[0], ctx.batch["label"], "interpolate")
  kl = lambda z: losses.kl_divergence_from_log_probs(q, jax.nn.log_softmax(z)).sum(1).mean()
  np.testing.assert_allclose(metrics["kl_adv"], kl(ctx.student(x_adv)[0]), rtol=1e-5)
  np.testing.assert_allclose(
      float(total), 5 / 6 * kl(ctx.student(x_adv)[0]) + 1 / 6 * kl(ctx.student(
          ctx.batch["image"])[0]) + float(metrics["contrastive"]), rtol=1e-5)


def test_cross_task_turns_default_reweighting_off_and_refuses_forced_reweighting(labels, caplog):
  teacher_classes = 7
  with caplog.at_level(logging.WARNING):
    auto = methods.build(_small_nce())
    ctx = _context(labels, auto, teacher_classes=teacher_classes)
  assert sum("reweighting is off" in r.getMessage() for r in caplog.records) == 1
  off = methods.build(_small_nce(reweighting="none"))
  x_adv = jnp.clip(ctx.batch["image"] + 0.01, 0, 1)
  total_auto, _, _ = auto.loss(ctx, x_adv)
  total_off, _, _ = off.loss(ctx, x_adv)
  assert np.isfinite(float(total_auto))
  np.testing.assert_allclose(float(total_auto), float(total_off), rtol=1e-6)
  info = _info(labels, teacher_num_classes=teacher_classes)
  for name, switches in [("gacd", {"reweighting": "teacher_prob"}),
                         ("gacd", {"reweighting": "correct"}),
                         ("gacd", {"kl_weight": 1.0}),
                         ("gacd", {"attack_objective": "kl"}),
                         ("crdnd", {})]:
    method = methods.build(_small_nce(name, **switches) if name == "gacd" else
                           _method_config(name, feat_dim=16))
    with pytest.raises(errors.ConfigError, match="teacher"):
      method.init(jax.random.key(0), info)


def test_unknown_switch_values_are_config_errors():
  for name, key, value in [("gacd", "anchor", "noisy"), ("gacd", "estimator", "mine"),
                           ("gacd", "reweighting", "focal"), ("crdnd", "compensation", "x")]:
    with pytest.raises(errors.ConfigError, match=key):
      methods.build(_method_config(name, **{key: value}))


# ---------------------------------------------------------------------------------------------
# Through the train step.


def _step_setup(name: str, **switches):
  """A width-4 small_cnn student and a width-8 teacher on random 8x8 images, 64 examples; GACD as
  METHODS.md section 3 writes it (memory banks), with `switches` on top."""
  if name == "gacd":
    switches = {**gacd_lib.RECONSTRUCTION, **switches}
  cfg = _method_config(name, feat_dim=16, **switches)
  if name != "crdnd":
    cfg[name].num_negatives = K
  method = methods.build(cfg)
  rng = np.random.default_rng(7)
  labels = rng.integers(0, C, N).astype(np.int32)
  model, teacher_model = models.build("small_cnn", C, width=4), models.build("small_cnn", C,
                                                                            width=8)
  teacher_vars = teacher_model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), train=False)
  optim = config_lib.default().optim
  optim.schedule = "constant"
  tx = train.make_optimizer(optim, 4, 100)
  info = _info(labels, student_dim=models.feature_dim(model, (8, 8, 1)),
               teacher_dim=models.feature_dim(teacher_model, (8, 8, 1)))
  state = train.init_state(jax.random.key(0), model, method, tx, (8, 8, 1), info)
  attack = config_lib.default().attack
  attack.steps, attack.unroll = 2, False
  step = train.make_step(model, method, tx, train.AttackSettings.resolve(attack, method),
                         teacher_model, crop_padding=1, flip=False)
  index = rng.permutation(N)[:16].astype(np.int32)
  batch = {"image": rng.uniform(0, 1, (16, 8, 8, 1)).astype(np.float32),
           "label": labels[index], "index": index}
  return state, teacher_vars, step, batch


def test_a_jitted_gacd_train_step_updates_the_banks_and_freezes_z():
  state, teacher_vars, step, batch = _step_setup("gacd")
  mesh = sharding.make_mesh()
  step_fn = train.jit_step(step, mesh)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  banks = np.asarray(state["method_state"]["memory_student"])
  zs = []
  for i in range(2):
    state, metrics = step_fn(state, teacher_vars, batch, jax.random.key(i))
    assert np.isfinite(float(metrics["loss"]))
    assert {"ce_adv", "contrastive", "adv_acc"} <= set(metrics)
    zs.append(float(state["method_state"]["z_student"]))
  assert zs[0] == zs[1] > 0
  changed = np.any(np.asarray(state["method_state"]["memory_student"]) != banks, axis=1)
  np.testing.assert_array_equal(np.flatnonzero(changed), np.sort(batch["index"]))
  assert set(state["params"]["method"]) == {"student_head", "teacher_head"}


ONE_VS_EIGHT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from gacd_jax import sharding
from gacd_jax.methods import contrastive
from tests.test_contrastive import _info
assert len(jax.devices()) == 8
rng = np.random.default_rng(0)
labels = rng.integers(0, 4, 64).astype(np.int32)
index = rng.permutation(64)[:16].astype(np.int32)
batch = {"index": index, "label": labels[index], "f_s": rng.normal(size=(16, 6)).astype(np.float32),
         "f_t": rng.normal(size=(16, 5)).astype(np.float32),
         "w": rng.uniform(0, 2, 16).astype(np.float32)}
for kind in ("nce", "infonce"):
  est = contrastive.Estimator(kind, feat_dim=16, num_negatives=8)
  params, state = est.init(jax.random.key(0), _info(labels))

  def loss(params, state, b):
    cidx = est.sample(state, b, jax.random.key(1))
    per_example, new_state = est(params, state, b["f_s"], b["f_t"], b["index"], cidx, b["w"])
    return per_example.mean(), new_state

  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True),
                 in_shardings=(sharding.replicated(mesh), sharding.replicated(mesh),
                               sharding.batch_sharding(mesh)))
    results.append(jax.device_get(fn(params, state, batch)))
  a, b = map(jax.tree.leaves, results)
  print(max(float(np.abs(x - y).max() / (np.abs(y).max() + 1)) for x, y in zip(a, b)))
"""


def test_one_device_and_eight_fake_devices_agree():
  """The global-batch InfoNCE matrix, Z, the negatives and the bank updates do not depend on how
  the batch is split over devices."""
  out = helpers.run_python(ONE_VS_EIGHT, devices=8)
  assert all(float(v) < 1e-6 for v in out.split()[-2:]), out
