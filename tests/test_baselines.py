"""The baselines against independent numpy formulas, and their attacks against their public code.

Student and teacher are linear maps `x -> flatten(x) @ kernel + bias`, evaluated once in JAX (inside
a hand-built `Context`) and once in float64 numpy, so every loss, every attack objective and their
gradients can be checked against formulas written here without `gacd_jax.losses`.
"""

import copy
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from gacd_jax import attacks
from gacd_jax import errors
from gacd_jax import train
from gacd_jax.methods import baselines
from gacd_jax.methods.base import Context

BATCH, IMAGE_SHAPE, CLASSES = 6, (2, 2, 3), 5
DIM = int(np.prod(IMAGE_SHAPE))
REDUCTIONS = ("batchmean", "mean")
ATTACKED = ("pgd_at", "ard", "trades", "rslad", "iad", "adaad")
INTROSPECTION_START = 10


# ---------------------------------------------------------------------------------------------
# Numpy reference, float64.


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl_per_class(target_logits, logits, temperature=1.0):
  log_p = _log_softmax(target_logits / temperature)
  return np.exp(log_p) * (log_p - _log_softmax(logits / temperature))


def _reduce(per_class, reduction):
  return per_class.sum(1).mean() if reduction == "batchmean" else per_class.mean()


def _ce(logits, labels):
  return -_log_softmax(logits)[np.arange(len(labels)), labels]


def _linear_np(params, x):
  return x.reshape(len(x), -1) @ params["kernel"] + params["bias"]


def _np_loss(name, cfg, s, s_adv, t, t_adv, y, introspection_on=True):
  """Each method's training loss from the student's (s) and teacher's (t) logits on x and x'."""
  r = cfg.kl_reduction
  if name == "natural":
    return _ce(s, y).mean()
  if name == "pgd_at":
    return _ce(s_adv, y).mean()
  if name == "ard":
    a, tau = cfg.ard.alpha, cfg.ard.temperature
    return a * tau**2 * _reduce(_kl_per_class(t, s_adv, tau), r) + (1 - a) * _ce(s, y).mean()
  if name == "trades":
    return _ce(s, y).mean() + cfg.trades.beta * _reduce(_kl_per_class(s, s_adv), r)
  if name == "rslad":
    return (cfg.rslad.adv_weight * _reduce(_kl_per_class(t, s_adv), r)
            + cfg.rslad.clean_weight * _reduce(_kl_per_class(t, s), r))
  if name == "iad":
    a, tau = cfg.iad.alpha, cfg.iad.temperature
    w = np.exp(_log_softmax(t_adv))[np.arange(len(y)), y] ** cfg.iad.beta
    loss = a * tau**2 * _reduce(_kl_per_class(t, s_adv, tau), r) + (1 - a) * _ce(s, y).mean()
    if introspection_on:
      loss += a * _reduce((1 - w)[:, None] * _kl_per_class(s, s_adv), r)
    return loss
  if name == "adaad":
    a = cfg.adaad.alpha
    return a * _reduce(_kl_per_class(t_adv, s_adv), r) + (1 - a) * _reduce(_kl_per_class(t, s), r)
  if name == "kd":
    a, tau = cfg.kd.alpha, cfg.kd.temperature
    return a * tau**2 * _reduce(_kl_per_class(t, s, tau), r) + (1 - a) * _ce(s, y).mean()
  raise KeyError(name)


def _np_objective(name, s_adv, t, t_adv, s, y, switches=None):
  """The per-example quantity each method's attack maximises, `[B]`."""
  if name in ("pgd_at", "ard", "iad") or (switches or {}).get("attack_objective") == "ce":
    return _ce(s_adv, y)
  target = {"trades": s, "rslad": t, "adaad": t_adv}[name]
  return _kl_per_class(target, s_adv).sum(1)


def _finite_difference(f, a, h=1e-6):
  grad = np.zeros_like(a)
  for i in np.ndindex(a.shape):
    e = np.zeros_like(a)
    e[i] = h
    grad[i] = (f(a + e) - f(a - e)) / (2 * h)
  return grad


# ---------------------------------------------------------------------------------------------
# The JAX side.


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(BATCH, *IMAGE_SHAPE))
  return types.SimpleNamespace(
      x=x, x_adv=np.clip(x + rng.uniform(-0.3, 0.3, x.shape), 0.0, 1.0),
      y=rng.integers(0, CLASSES, BATCH),
      student={"kernel": rng.normal(size=(DIM, CLASSES)), "bias": rng.normal(size=CLASSES)},
      teacher={"kernel": 2 * rng.normal(size=(DIM, CLASSES)), "bias": rng.normal(size=CLASSES)})


def _linear(params):
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  return lambda x: (x.reshape(x.shape[0], -1) @ params["kernel"] + params["bias"],
                    x.reshape(x.shape[0], -1))


def _context(p, student_kernel=None, step=INTROSPECTION_START):
  """A Context whose student and teacher are the linear maps of `p`.

  The teacher is differentiable in its input (AdaAD's attack differentiates through it).
  """
  student_params = dict(p.student)
  if student_kernel is not None:
    student_params["kernel"] = student_kernel
  teacher = _linear(p.teacher)
  x = jnp.asarray(p.x, jnp.float32)
  batch = {"image": x, "label": jnp.asarray(p.y, jnp.int32), "index": jnp.arange(BATCH)}
  return Context(student=_linear(student_params), teacher=teacher, teacher_clean=teacher(x),
                 batch=batch, params={}, state={"introspection_start": INTROSPECTION_START},
                 rng=jax.random.key(0), step=jnp.asarray(step, jnp.int32))


def _config(name, reduction, **switches):
  cfg = ConfigDict({"name": name, "kl_reduction": reduction,
                    **copy.deepcopy(baselines.DEFAULTS)})
  for key, value in switches.items():
    cfg[name][key] = value
  return cfg


def _logits(p):
  return (_linear_np(p.student, p.x), _linear_np(p.student, p.x_adv),
          _linear_np(p.teacher, p.x), _linear_np(p.teacher, p.x_adv))


# Each method at its defaults and with its switches moved, so every branch is exercised.
CASES = [(name, {}) for name in baselines.REGISTRY] + [
    ("ard", {"alpha": 0.7, "temperature": 3.0}), ("trades", {"beta": 2.5}),
    ("rslad", {"adv_weight": 0.3, "clean_weight": 0.9}),
    ("iad", {"alpha": 0.8, "temperature": 2.0, "beta": 0.5}), ("adaad", {"alpha": 0.6}),
    ("kd", {"alpha": 0.4, "temperature": 2.0})]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,switches", CASES)
def test_loss_and_its_gradient_match_numpy(problem, name, switches, reduction):
  cfg = _config(name, reduction, **switches)
  method = baselines.REGISTRY[name](cfg)
  x_adv = jnp.asarray(problem.x_adv, jnp.float32) if method.objective else None
  s, s_adv, t, t_adv = _logits(problem)
  loss, metrics, state = method.loss(_context(problem), x_adv)
  expected = _np_loss(name, cfg, s, s_adv, t, t_adv, problem.y)
  np.testing.assert_allclose(loss, expected, rtol=2e-5)
  assert state == {"introspection_start": INTROSPECTION_START}  # passed through unchanged

  # The gradient pins what is detached: e.g. TRADES' and IAD's target p_S(x) is not.
  def np_loss_of_kernel(kernel):
    student = dict(problem.student, kernel=kernel)
    return _np_loss(name, cfg, _linear_np(student, problem.x), _linear_np(student, problem.x_adv),
                    t, t_adv, problem.y)

  grad = jax.grad(lambda k: method.loss(_context(problem, k), x_adv)[0])(
      jnp.asarray(problem.student["kernel"], jnp.float32))
  np.testing.assert_allclose(grad, _finite_difference(np_loss_of_kernel, problem.student["kernel"]),
                             rtol=1e-3, atol=1e-5)

  # Accuracies come from the logits each loss computed.
  if "logits_clean" in metrics:
    np.testing.assert_allclose(metrics["logits_clean"], s, rtol=1e-5, atol=1e-5)
  if "logits_adv" in metrics:
    np.testing.assert_allclose(metrics["logits_adv"], s_adv, rtol=1e-5, atol=1e-5)
  assert "logits_adv" in metrics or not method.objective
  for key, value in metrics.items():
    assert key.startswith("logits_") or np.shape(value) == (), key


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_terms_in_metrics_add_up(problem, reduction):
  s, s_adv, t, t_adv = _logits(problem)
  ctx, x_adv = _context(problem), jnp.asarray(problem.x_adv, jnp.float32)
  _, m, _ = baselines.trades(_config("trades", reduction)).loss(ctx, x_adv)
  np.testing.assert_allclose(m["ce"], _ce(s, problem.y).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["kl"], _reduce(_kl_per_class(s, s_adv), reduction), rtol=1e-5)
  _, m, _ = baselines.rslad(_config("rslad", reduction)).loss(ctx, x_adv)
  np.testing.assert_allclose(m["kl_adv"], _reduce(_kl_per_class(t, s_adv), reduction), rtol=1e-5)
  np.testing.assert_allclose(m["kl_clean"], _reduce(_kl_per_class(t, s), reduction), rtol=1e-5)
  _, m, _ = baselines.kd(_config("kd", reduction)).loss(ctx, None)
  np.testing.assert_allclose(m["kl"], _reduce(_kl_per_class(t, s, 4.0), reduction), rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_iad_introspection_is_absent_before_warmup_and_present_after(problem, reduction):
  cfg = _config("iad", reduction)
  method = baselines.iad(cfg)
  s, s_adv, t, t_adv = _logits(problem)
  x_adv = jnp.asarray(problem.x_adv, jnp.float32)
  before, m_before, _ = method.loss(_context(problem, step=INTROSPECTION_START - 1), x_adv)
  after, m_after, _ = method.loss(_context(problem, step=INTROSPECTION_START), x_adv)
  np.testing.assert_allclose(
      before, _np_loss("iad", cfg, s, s_adv, t, t_adv, problem.y, introspection_on=False),
      rtol=2e-5)
  np.testing.assert_allclose(
      after, _np_loss("iad", cfg, s, s_adv, t, t_adv, problem.y, introspection_on=True), rtol=2e-5)
  assert m_before["introspection"] == 0.0 and m_after["introspection"] > 0.0
  np.testing.assert_allclose(after - before, m_after["introspection"], rtol=1e-4)
  w = np.exp(_log_softmax(t_adv))[np.arange(BATCH), problem.y] ** 0.1
  np.testing.assert_allclose(m_after["teacher_confidence"], w.mean(), rtol=1e-5)


def test_iad_counts_its_warmup_in_steps_from_init_info():
  method = baselines.iad(_config("iad", "batchmean", warmup_epochs=3))
  params, state = method.init(jax.random.key(0), types.SimpleNamespace(steps_per_epoch=7))
  assert params == {} and int(state["introspection_start"]) == 21
  with pytest.raises(ValueError, match="steps_per_epoch"):
    method.init(jax.random.key(0), types.SimpleNamespace(num_examples=100))


@pytest.mark.parametrize("name,switches", [(name, {}) for name in ATTACKED]
                         + [("rslad", {"attack_objective": "ce"})])
def test_attack_objective_and_its_input_gradient_match_numpy(problem, name, switches):
  method = baselines.REGISTRY[name](_config(name, "batchmean", **switches))
  objective = method.objective(_context(problem))
  s, s_adv, t, t_adv = _logits(problem)
  x_adv = jnp.asarray(problem.x_adv, jnp.float32)
  np.testing.assert_allclose(objective(x_adv),
                             _np_objective(name, s_adv, t, t_adv, s, problem.y, switches),
                             rtol=1e-4, atol=1e-6)

  # The gradient PGD follows: for AdaAD it runs through the teacher on x' as well.
  def np_objective_of_input(xa):
    return _np_objective(name, _linear_np(problem.student, xa), t, _linear_np(problem.teacher, xa),
                         s, problem.y, switches).sum()

  grad = jax.grad(lambda xa: objective(xa).sum())(x_adv)
  np.testing.assert_allclose(grad, _finite_difference(np_objective_of_input, problem.x_adv),
                             rtol=1e-3, atol=1e-5)


def test_attack_start_bn_mode_and_teacher_follow_the_public_code():
  # (random start, BatchNorm during the attack, uses a teacher); None: no attack.
  expected = {
      "natural": (None, None, False),
      "pgd_at": ("uniform", "eval", False),
      "ard": ("uniform", "train", True),          # ARD: model.train() around its PGD
      "trades": ("gaussian", "eval", False),      # trades.py: 0.001 * randn, model.eval()
      "rslad": ("gaussian", "eval", True),        # rslad_inner_loss: 0.001 * randn, model.eval()
      "iad": ("uniform", "train", True),          # IAD-I.py: AttackPGD under net.train()
      "adaad": ("gaussian", "eval", True),        # adaad_inner_loss: random_init, BN_eval=True
      "kd": (None, None, True),
  }
  assert set(expected) == set(baselines.REGISTRY)
  for name, (start, bn, uses_teacher) in expected.items():
    method = baselines.REGISTRY[name](_config(name, "batchmean"))
    assert method.name == name
    assert method.uses_teacher == uses_teacher, name
    if start is None:
      assert method.objective is None, name
    else:
      assert (method.attack_start, method.attack_bn) == (start, bn), name
      assert start in attacks.STARTS


def test_an_unknown_rslad_attack_objective_is_refused_by_name():
  with pytest.raises(errors.ConfigError, match="rslad.attack_objective='dlr' is not one of kl, ce"):
    baselines.rslad(_config("rslad", "batchmean", attack_objective="dlr"))


def test_defaults_are_those_of_the_public_code():
  d = baselines.DEFAULTS
  assert d["trades"] == {"beta": 6.0}
  assert d["rslad"] == {"adv_weight": 5 / 6, "clean_weight": 1 / 6, "attack_objective": "kl"}
  assert d["iad"] == {"alpha": 1.0, "temperature": 1.0, "beta": 0.1, "warmup_epochs": 60}
  assert d["adaad"] == {"alpha": 1.0}
  assert d["kd"] == {"alpha": 0.9, "temperature": 4.0}


class _TinyNet(nn.Module):
  """Dense, BatchNorm, ReLU, Dense: the smallest network with BatchNorm, to keep compiles short."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    h = nn.Dense(8)(x.reshape(x.shape[0], -1))
    features = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
    return nn.Dense(4)(features), features


@pytest.mark.parametrize("name", ["trades", "rslad", "iad", "adaad", "kd"])
def test_one_jitted_train_step_runs(name):
  """Each method inside the real step: BatchNorm, a teacher, an attack, under jit (natural, pgd_at
  and ard run there in test_train.py)."""
  model = _TinyNet()
  method = baselines.REGISTRY[name](_config(name, "batchmean"))
  tx = optax.sgd(0.1)
  image_shape = (4, 4, 1)
  info = types.SimpleNamespace(steps_per_epoch=1)
  state = train.init_state(jax.random.key(0), model, method, tx, image_shape, info)
  teacher_variables = model.init(jax.random.key(1), jnp.zeros((1, *image_shape)), train=False)
  attack = train.AttackSettings(eps=8 / 255, step_size=2 / 255, steps=1, norm="linf",
                                start=method.attack_start, bn_mode=method.attack_bn, unroll=True)
  step = jax.jit(train.make_step(model, method, tx, attack, model if method.uses_teacher else None,
                                 crop_padding=0))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.uniform(size=(8, *image_shape)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 4, 8), jnp.int32), "index": jnp.arange(8)}
  state, metrics = step(state, teacher_variables, batch, jax.random.key(2))
  assert int(state["step"]) == 1
  assert all(np.isfinite(v) for v in jax.device_get(metrics).values()), metrics
