"""The composable PGD: threat-model constraints, loss increase, and FGSM as a special case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from gacd_jax import attacks
from gacd_jax import errors
from gacd_jax import losses


@pytest.fixture(scope="module")
def linear_model():
  """A softmax classifier trained on digits by plain gradient descent: `x [B, 8, 8, 1] -> logits`."""
  digits = load_digits()
  x = jnp.asarray(digits.images[:600, :, :, None] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target[:600])

  def apply(w, xx):
    return xx.reshape(xx.shape[0], -1) @ w["kernel"] + w["bias"]

  w = {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros(10)}
  grad = jax.jit(jax.grad(lambda w: losses.cross_entropy(apply(w, x), y).mean()))
  for _ in range(200):
    w = jax.tree.map(lambda p, g: p - 0.5 * g, w, grad(w))
  assert losses.accuracy(apply(w, x), y) > 0.9
  return (lambda xx: apply(w, xx)), x[:64], y[:64]


@pytest.mark.parametrize("norm,start", [("linf", "uniform"), ("linf", "gaussian"),
                                        ("linf", "none"), ("l2", "uniform"), ("l2", "none")])
def test_pgd_stays_in_the_ball_and_the_image_range(linear_model, norm, start):
  f, x, y = linear_model
  eps = 0.1 if norm == "linf" else 0.5
  x_adv = attacks.pgd(attacks.cross_entropy_objective(f, y), x, jax.random.key(0), eps=eps,
                      step_size=eps / 3, steps=5, norm=norm, start=start)
  x_adv, x = np.asarray(x_adv), np.asarray(x)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  delta = (x_adv - x).reshape(len(x), -1)
  if norm == "linf":
    assert np.abs(delta).max() <= eps + 1e-6
  else:
    assert np.linalg.norm(delta, axis=1).max() <= eps + 1e-5
  assert np.abs(delta).max() > 0  # it moved


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_raises_the_loss_of_a_trained_model(linear_model, norm):
  f, x, y = linear_model
  eps = 0.1 if norm == "linf" else 1.0
  x_adv = attacks.pgd(attacks.cross_entropy_objective(f, y), x, jax.random.key(1), eps=eps,
                      step_size=eps / 4, steps=10, norm=norm)
  clean, adv = losses.cross_entropy(f(x), y).mean(), losses.cross_entropy(f(x_adv), y).mean()
  assert adv > clean + 0.5
  assert losses.accuracy(f(x_adv), y) < losses.accuracy(f(x), y)


def test_fgsm_equals_one_signed_step_from_the_clean_input(linear_model):
  f, x, y = linear_model
  eps = 0.07
  g = jax.grad(lambda xx: losses.cross_entropy(f(xx), y).sum())(x)
  expected = np.clip(np.asarray(x) + eps * np.sign(np.asarray(g)), 0.0, 1.0)
  got = attacks.fgsm(attacks.cross_entropy_objective(f, y), x, eps=eps)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  got_pgd = attacks.pgd(attacks.cross_entropy_objective(f, y), x, eps=eps, step_size=eps,
                        steps=1, start="none")
  np.testing.assert_array_equal(got, got_pgd)


def test_rolled_and_unrolled_loops_agree(linear_model):
  f, x, y = linear_model
  kw = dict(eps=0.1, step_size=0.03, steps=4)
  a = attacks.pgd(attacks.margin_objective(f, y), x, jax.random.key(2), unroll=True, **kw)
  b = attacks.pgd(attacks.margin_objective(f, y), x, jax.random.key(2), unroll=False, **kw)
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_output_is_behind_stop_gradient(linear_model):
  f, x, y = linear_model
  def through(xx):
    return attacks.pgd(attacks.cross_entropy_objective(f, y), xx, eps=0.1, step_size=0.05,
                       steps=2, start="none").sum()
  assert float(jnp.abs(jax.grad(through)(x)).sum()) == 0.0


@pytest.mark.parametrize("eps", [-0.1, 1.5, "8/255"])
def test_eps_outside_unit_interval_is_a_config_error(linear_model, eps):
  f, x, y = linear_model
  with pytest.raises(errors.ConfigError, match=r"\[0, 1\]"):
    attacks.pgd(attacks.cross_entropy_objective(f, y), x, eps=eps, step_size=0.1, steps=1)


def test_unknown_start_is_a_config_error(linear_model):
  f, x, y = linear_model
  with pytest.raises(errors.ConfigError, match="uniform"):
    attacks.pgd(attacks.cross_entropy_objective(f, y), x, eps=0.1, step_size=0.1, steps=1,
                start="zeros")


def test_one_norm_spelling_and_the_autoattack_one_accepted(linear_model):
  """'linf' / 'l2' everywhere in gacd_jax; AutoAttack's 'Linf' / 'L2' (any case) mean the same."""
  from gacd_jax import autoattack  # pylint: disable=g-import-not-at-top
  f, x, y = linear_model
  assert attacks.NORMS == autoattack.NORMS == ("linf", "l2")
  names = [attacks.norm_name(n) for n in ("Linf", "L2", "LINF", "l2")]
  assert names == ["linf", "l2", "linf", "l2"]
  objective = attacks.cross_entropy_objective(f, y)
  for ours, theirs in (("linf", "Linf"), ("l2", "L2")):
    np.testing.assert_array_equal(
        attacks.pgd(objective, x, jax.random.key(0), eps=0.1, step_size=0.05, steps=2, norm=ours),
        attacks.pgd(objective, x, jax.random.key(0), eps=0.1, step_size=0.05, steps=2,
                    norm=theirs))
    np.testing.assert_array_equal(autoattack.distance(x + 0.05, x, ours),
                                  autoattack.distance(x + 0.05, x, theirs))
  with pytest.raises(errors.ConfigError, match="unknown norm 'l1'"):
    attacks.norm_name("l1")


@pytest.mark.parametrize("draw", [jax.random.uniform, jax.random.normal])
def test_the_flat_random_start_draws_what_a_shaped_draw_does(draw):
  """The random starts are drawn flat (they compile faster): the numbers must not change."""
  rng, shape = jax.random.key(5), (3, 4, 4, 2)
  flat = attacks.flat_draw(draw, rng, shape, jnp.float32)
  np.testing.assert_array_equal(flat, draw(rng, shape, jnp.float32))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_autoattacks_flat_random_start_draws_what_a_shaped_draw_does(norm):
  from gacd_jax.autoattack import common  # pylint: disable=import-outside-toplevel
  keys, x = jax.random.split(jax.random.key(2), 3), jnp.full((3, 4, 4, 2), 0.5)
  draw = ((lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1.0, 1.0)) if norm == "linf"
          else (lambda k: jax.random.normal(k, x.shape[1:], x.dtype)))
  shaped = jnp.clip(x + 0.1 * common.normalize(jax.vmap(draw)(keys), norm), 0.0, 1.0)
  np.testing.assert_array_equal(common.random_start(keys, x, 0.1, norm), shaped)
