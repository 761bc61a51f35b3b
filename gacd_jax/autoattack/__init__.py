"""AutoAttack in JAX: APGD-CE, APGD-T, FAB-T and Square, alone or as the ensemble.

The attacks follow Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks" (ICML 2020; APGD and the DLR loss), Croce & Hein, "Minimally
distorted adversarial examples with a fast adaptive boundary attack" (ICML 2020; FAB) and
Andriushchenko et al., "Square Attack" (ECCV 2020), with the settings of the authors' package
(`pyautoattack`), for the Linf and L2 threat models.

`evaluate` runs a version (`standard`, `plus`, `rand`, `fast` or a custom list) on a data set: each
attack is applied, in order, only to the examples that are still robust (compacted on the host, in
batches of a fixed size so each attack compiles once), and an example counts as robust only if
every attack failed on it. Each per-batch attack is one jit over the mesh (batch split on `data`)
with `lax` loops inside and a mask for the padding of the last batch; examples an attack has
already broken stay in its batch, masked, until the batch is done.

Random numbers are drawn per example from `fold_in(key(seed), attack, example index)`, so an
example's attack does not depend on the batch it lands in, the batch size or the device count:
running one attack alone breaks at least the examples it breaks inside the ensemble.

Each per-batch attack (`apgd`, `fab`, `square`) takes the model as `model(x, key) -> logits`, where
`key` feeds the model's own randomness (a randomized defense; deterministic models ignore it), and
returns `(x_adv, fooled)`.

Where this differs from the official code (pyautoattack 0.2.0):
  * APGD's first checkpoint counts loss increases from the starting point, as the paper states;
    the official code compares the first step's loss with 0 (an index wrap-around).
  * Square draws its window and signs per example, not once per batch (the same distribution for
    each example, and no dependence on the batch).
  * The zero-gradient check runs once, on the first batch's clean points; the official one runs
    at every APGD-DLR start.
  * `fab` returns the closest misclassified point even beyond eps (only those within eps count).
  * For a deterministic model, 'rand' takes one gradient per step instead of 20 equal ones.
  * There is no check for dynamic defenses: a jitted function has no Python-level calls to trace.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Literal, Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gacd_jax import attacks
from gacd_jax import errors
from gacd_jax import losses
from gacd_jax import sharding

Norm = Literal["Linf", "L2"]
Model = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, H, W, C], key) -> logits [B, K]

NORMS = ("Linf", "L2")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSIONS = ("standard", "plus", "rand", "fast", "custom")
APGD_LOSSES = ("ce", "dlr", "dlr-targeted")

# The attacks each version runs, in order (the official package's lists; `fast` is ours).
VERSION_ATTACKS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
    "fast": ("apgd-ce", "apgd-t"),
}

# An adversarial example counts if its distance is at most eps plus this much float32 rounding
# (x + delta - x is not exactly delta).
_BALL_TOLERANCE = 1e-6


class AutoAttackWarning(UserWarning):
  """A sign that AutoAttack may overestimate robustness (the official package's checks)."""


# ---------------------------------------------------------------------------------------------
# Losses and norms.


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Difference of logits ratio, -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3): `[B, K], [B] -> [B]`.

  `z_pi1 >= z_pi2 >= ...` are the sorted logits; the loss is invariant to shifting and (positive)
  scaling of the logits. Needs K >= 3.
  """
  z = logits.astype(jnp.float32)
  top = jnp.sort(z, axis=-1)[:, ::-1]
  return losses.margin(z, labels) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """Targeted DLR, -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): `[B, K], [B], [B] -> [B]`.

  Needs K >= 4.
  """
  z = logits.astype(jnp.float32)
  top = jnp.sort(z, axis=-1)[:, ::-1]
  z_y = jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0]
  z_t = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
  return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """z_y - max_{i != y} z_i: `[B]`, <= 0 when misclassified (Square minimises it)."""
  return -losses.margin(logits, labels)


def distance(x_adv: jax.Array, x: jax.Array, norm: Norm) -> jax.Array:
  """Per-example Linf or L2 distance: `[B, ...], [B, ...] -> [B]`."""
  delta = (x_adv - x).reshape(x.shape[0], -1)
  if norm == "Linf":
    return jnp.max(jnp.abs(delta), axis=-1)
  return jnp.sqrt(jnp.sum(jnp.square(delta), axis=-1))


def _expand(v: jax.Array, ndim: int) -> jax.Array:
  """`[B]` -> `[B, 1, ..., 1]` with `ndim` axes in all, to broadcast against images."""
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _normalize(v: jax.Array, norm: Norm) -> jax.Array:
  """Each example divided by its Linf or L2 norm (zero stays zero)."""
  return v / _expand(distance(v, jnp.zeros_like(v), norm) + 1e-12, v.ndim)


def _project(x_adv: jax.Array, x: jax.Array, eps, norm: Norm) -> jax.Array:
  return attacks.project(x_adv, x, eps, "linf" if norm == "Linf" else "l2")


def _example_keys(keys: jax.Array, salt) -> jax.Array:
  """Each example's key folded with `salt` (a run, an iteration): `[B]` keys."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, salt)


def _argmax_differs(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.argmax(logits, axis=-1) != labels


def _runs_loop(n_runs: int, run: Callable, x: jax.Array, active: jax.Array,
               carry_extra=()):
  """`run(r, still_active, carry_extra) -> (x_run, fooled_run, carry_extra)` for r < n_runs,
  each on the examples not fooled yet, stopping early once every example is fooled.

  Returns `(x_out, fooled, carry_extra)`: an example's `x_out` comes from the run that fooled it,
  else from the last run it took part in.
  """
  def cond(state):
    r, _, fooled, _ = state
    return (r < n_runs) & jnp.any(active & ~fooled)

  def body(state):
    r, x_out, fooled, extra = state
    running = active & ~fooled
    x_run, fooled_run, extra = run(r, running, extra)
    x_out = jnp.where(_expand(running, x.ndim), x_run, x_out)
    return r + 1, x_out, fooled | (running & fooled_run), extra

  init = (jnp.int32(0), x, jnp.zeros(x.shape[:1], bool), carry_extra)
  _, x_out, fooled, extra = jax.lax.while_loop(cond, body, init)
  return x_out, fooled, extra


def _nth_largest(logits: jax.Array, rank) -> jax.Array:
  """The class with the `rank`-th largest logit (1 = the top), per example: `[B]`."""
  order = jnp.argsort(logits, axis=-1)
  return jnp.take(order, logits.shape[-1] - rank, axis=1)


# ---------------------------------------------------------------------------------------------
# APGD.


def apgd_checkpoints(n_iter: int) -> list[int]:
  """The step counts after which APGD may halve its step size: `w_j = ceil(p_j * n_iter)`.

  p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06). Computed, as in the
  official code, with integer lengths (floor(0.22 N), shrinking by floor(0.03 N) down to
  floor(0.06 N), each at least 1), which equals the formula when 0.01 N is an integer (N = 100:
  22, 41, 57, 70, 80, 87, 93, 99).
  """
  length = max(int(0.22 * n_iter), 1)
  shrink, shortest = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
  points, step = [], length
  while step <= n_iter:
    points.append(step)
    length = max(length - shrink, shortest)
    step += length
  return points


def _apgd_loss(name: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  if name == "ce":
    return lambda logits, y, t: losses.cross_entropy(logits, y)
  if name == "dlr":
    return lambda logits, y, t: dlr_loss(logits, y)
  return dlr_targeted_loss


def _random_start(keys: jax.Array, x: jax.Array, radius, norm: Norm) -> jax.Array:
  """A random point at distance `radius` from x before clipping to [0, 1]: uniform noise scaled
  to that Linf norm, or a Gaussian direction of that L2 norm (APGD and FAB's restarts)."""
  shape = x.shape[1:]
  if norm == "Linf":
    noise = jax.vmap(lambda k: jax.random.uniform(k, shape, x.dtype, -1.0, 1.0))(keys)
  else:
    noise = jax.vmap(lambda k: jax.random.normal(k, shape, x.dtype))(keys)
  return jnp.clip(x + radius * _normalize(noise, norm), 0.0, 1.0)


def _apgd_run(model: Model, x: jax.Array, y: jax.Array, targets: jax.Array, keys: jax.Array,
              model_key: jax.Array, *, eps, norm: Norm, loss: str, n_iter: int, eot_iter: int,
              rho: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One APGD run (Algorithm 1) from a random start: `(x_best_loss, x_adversarial, fooled)`.

  `x_adversarial` is the last iterate that was misclassified (where `fooled`).
  """
  loss_fn = _apgd_loss(loss)
  ndim = x.ndim

  def loss_and_grad(x_adv, key):
    def one(k):
      def total(xa):
        logits = model(xa, k)
        per_example = loss_fn(logits, y, targets)
        return per_example.sum(), (per_example, logits)
      (_, aux), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
      return aux, grad

    if eot_iter == 1:
      (value, logits), grad = one(key)
      return value, logits, grad

    # Expectation over transformation: the mean gradient over the model's randomness; the loss
    # and logits of the last draw decide improvement and success, as in the official code.
    def accumulate(grad_sum, k):
      aux, grad = one(k)
      return grad_sum + grad, aux
    grad_sum, (values, logits) = jax.lax.scan(accumulate, jnp.zeros_like(x_adv),
                                              jax.random.split(key, eot_iter))
    return values[-1], logits[-1], grad_sum / eot_iter

  def direction(grad):
    return jnp.sign(grad) if norm == "Linf" else _normalize(grad, "L2")

  checkpoints = apgd_checkpoints(n_iter)
  is_checkpoint = np.zeros(n_iter, bool)
  is_checkpoint[np.asarray(checkpoints) - 1] = True
  # The number of steps since the previous checkpoint, at each checkpoint.
  window = np.zeros(n_iter, np.float32)
  window[np.asarray(checkpoints) - 1] = np.diff([0] + checkpoints)
  is_checkpoint, window = jnp.asarray(is_checkpoint), jnp.asarray(window)

  x_adv = _random_start(keys, x, eps, norm)
  value, logits, grad = loss_and_grad(x_adv, jax.random.fold_in(model_key, n_iter))
  fooled = _argmax_differs(logits, y)
  step_size = jnp.full(x.shape[:1], 2.0 * eps, x.dtype)
  state = dict(
      x_adv=x_adv, x_prev=x_adv, grad=grad, value=value,
      x_best=x_adv, grad_best=grad, value_best=value, x_best_adv=x_adv, fooled=fooled,
      step_size=step_size, n_increase=jnp.zeros_like(value),
      value_best_at_check=value, reduced_at_check=jnp.ones_like(fooled))

  def body(i, s):
    # Momentum 0.75 on the projected step, none on the first step.
    a = jnp.where(i > 0, 0.75, 1.0)
    z = _project(s["x_adv"] + _expand(s["step_size"], ndim) * direction(s["grad"]), x, eps, norm)
    x_new = _project(s["x_adv"] + a * (z - s["x_adv"]) + (1 - a) * (s["x_adv"] - s["x_prev"]),
                     x, eps, norm)
    value, logits, grad = loss_and_grad(x_new, jax.random.fold_in(model_key, i))

    wrong = _argmax_differs(logits, y)
    x_best_adv = jnp.where(_expand(wrong, ndim), x_new, s["x_best_adv"])
    improved = value > s["value_best"]
    x_best = jnp.where(_expand(improved, ndim), x_new, s["x_best"])
    grad_best = jnp.where(_expand(improved, ndim), grad, s["grad_best"])
    value_best = jnp.where(improved, value, s["value_best"])
    n_increase = s["n_increase"] + (value > s["value"])

    # At a checkpoint the step size halves where the loss rose in at most a fraction rho of the
    # steps since the last one, or where neither the step size was halved nor the best loss
    # improved since then; those examples restart from their best point.
    check = is_checkpoint[i]
    halve = check & ((n_increase <= window[i] * rho)
                     | (~s["reduced_at_check"] & (s["value_best_at_check"] >= value_best)))
    back = _expand(halve, ndim)
    return dict(
        x_adv=jnp.where(back, x_best, x_new), x_prev=s["x_adv"],
        grad=jnp.where(back, grad_best, grad), value=value,
        x_best=x_best, grad_best=grad_best, value_best=value_best, x_best_adv=x_best_adv,
        fooled=s["fooled"] | wrong,
        step_size=jnp.where(halve, s["step_size"] / 2, s["step_size"]),
        n_increase=jnp.where(check, 0.0, n_increase),
        value_best_at_check=jnp.where(check, value_best, s["value_best_at_check"]),
        reduced_at_check=jnp.where(check, halve, s["reduced_at_check"]))

  state = jax.lax.fori_loop(0, n_iter, body, state)
  return state["x_best"], state["x_best_adv"], state["fooled"]


def apgd(model: Model, x: jax.Array, y: jax.Array, keys: jax.Array, model_key: jax.Array, *,
         eps: float, norm: Norm = "Linf", loss: str = "ce", n_iter: int = 100,
         n_restarts: int = 1, n_target_classes: int = 9, eot_iter: int = 1, rho: float = 0.75,
         active: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """APGD on a batch: step size 2 eps halved at the checkpoints of `apgd_checkpoints`.

  Args:
    model: `(x [B, H, W, C], key) -> logits [B, K]`.
    x: clean images `[B, H, W, C]` in [0, 1].
    y: labels `[B]`.
    keys: one PRNG key per example `[B]` (random starts).
    model_key: a PRNG key for the model's own randomness.
    eps: radius of the Linf or L2 ball.
    loss: 'ce', 'dlr', or 'dlr-targeted' (APGD-T: one run per target, the classes with the 2nd
      to (n_target_classes + 1)-th largest clean logit).
    n_restarts: random restarts (per target for 'dlr-targeted'), each on the examples not yet
      fooled.
    eot_iter: gradients averaged per step over this many draws of the model's randomness.
    active: `[B]` bool, the examples to attack (default all).

  Returns:
    `(x_adv [B, H, W, C], fooled [B])`: the misclassified point where `fooled`, else the
    highest-loss point of the example's last run; always in the eps-ball and in [0, 1].
  """
  if loss not in APGD_LOSSES:
    raise errors.ConfigError(f"unknown APGD loss {loss!r}; use one of {', '.join(APGD_LOSSES)}")
  active = jnp.ones(x.shape[:1], bool) if active is None else active
  targeted = loss == "dlr-targeted"
  n_runs = n_restarts * (n_target_classes if targeted else 1)
  clean_key, runs_key = jax.random.split(model_key)
  clean_logits = model(x, clean_key)

  def run(r, running, extra):
    # Run r attacks the target ranked r // n_restarts + 2 (2 = the runner-up).
    targets = _nth_largest(clean_logits, r // n_restarts + 2) if targeted else y
    x_best, x_best_adv, fooled = _apgd_run(
        model, x, y, targets, _example_keys(keys, r), jax.random.fold_in(runs_key, r),
        eps=eps, norm=norm, loss=loss, n_iter=n_iter, eot_iter=eot_iter, rho=rho)
    return jnp.where(_expand(fooled, x.ndim), x_best_adv, x_best), fooled, extra

  x_adv, fooled, _ = _runs_loop(n_runs, run, x, active)
  return x_adv, fooled


# ---------------------------------------------------------------------------------------------
# FAB.


def _water_level(weights: jax.Array, caps: jax.Array, target: jax.Array) -> jax.Array:
  """Per row, the lam >= 0 with sum_i weights_i * min(lam, caps_i) = target (inf if unreachable).

  weights, caps: `[N, D]` >= 0; target: `[N]` >= 0. The left side is piecewise linear and
  increasing in lam with kinks at the caps, so sorting the caps finds the piece that holds lam.
  """
  order = jnp.argsort(caps, axis=-1)
  c = jnp.take_along_axis(caps, order, axis=-1)
  w = jnp.take_along_axis(weights, order, axis=-1)
  filled_below = jnp.cumsum(w * c, axis=-1) - w * c     # sum_{j < k} w_j c_j
  weight_from = jnp.sum(w, -1, keepdims=True) - jnp.cumsum(w, axis=-1) + w  # sum_{j >= k} w_j
  level_at_cap = filled_below + c * weight_from           # the left side at lam = c_k
  k = jnp.sum(level_at_cap < target[:, None], axis=-1)   # the kinks lam lies beyond
  k_in = jnp.minimum(k, caps.shape[-1] - 1)[:, None]
  lam = ((target - jnp.take_along_axis(filled_below, k_in, -1)[:, 0])
         / jnp.maximum(jnp.take_along_axis(weight_from, k_in, -1)[:, 0], 1e-30))
  return jnp.where(k == caps.shape[-1], jnp.inf, jnp.maximum(lam, 0.0))


def project_onto_hyperplane(t: jax.Array, w: jax.Array, b: jax.Array, norm: Norm) -> jax.Array:
  """The smallest step d (in `norm`) with w . (t + d) = b and t + d in [0, 1]^D, per row.

  Where the box does not reach the hyperplane, d goes to the box corner nearest to it.
  t, w: `[N, D]`; b: `[N]`. Returns d `[N, D]`.
  """
  gap = jnp.sum(w * t, axis=-1) - b
  side = jnp.where(gap >= 0, 1.0, -1.0)
  w, gap = w * side[:, None], gap * side  # now w . d must be -gap <= 0: move against w
  room = jnp.where(w < 0, 1.0 - t, t)     # how far each coordinate can move against w
  if norm == "Linf":
    # The Linf ball of radius lam: d_i = -sign(w_i) min(lam, room_i).
    lam = _water_level(jnp.abs(w), room, gap)
    return jnp.where(w != 0, -jnp.sign(w) * jnp.minimum(lam[:, None], room), 0.0)
  # The L2 projection d = -lam w, each coordinate stopped at the box:
  # d_i = -w_i min(lam, room_i / |w_i|).
  live = jnp.abs(w) > 1e-8
  limit = jnp.where(live, room / jnp.where(live, jnp.abs(w), 1.0), 0.0)
  lam = _water_level(jnp.where(live, w * w, 0.0), limit, gap)
  return jnp.where(live, -w * jnp.minimum(lam[:, None], limit), 0.0)


def _fab_run(model: Model, x: jax.Array, y: jax.Array, targets: jax.Array, x_start: jax.Array,
             model_key: jax.Array, *, norm: Norm, targeted: bool, n_iter: int, alpha_max: float,
             eta: float, beta: float) -> tuple[jax.Array, jax.Array]:
  """One FAB run: `(x_min [B, H, W, C], dist_min [B])`, the closest misclassified iterate and its
  distance to x (inf and x itself where none was found)."""
  batch = x.shape[0]
  flat_x = x.reshape(batch, -1)
  rows = jnp.arange(batch)

  def linearisation(x1, key):
    """Per example the logit differences f_k - f_y and their gradients: `[B, M]`, `[B, M, D]`."""
    if targeted:
      def diff(xx):
        z = model(xx, key)
        d = z[rows, targets] - z[rows, y]
        return d.sum(), d
      grad, d = jax.grad(diff, has_aux=True)(x1)
      return d[:, None], grad.reshape(batch, 1, -1)
    z, vjp = jax.vjp(lambda xx: model(xx, key), x1)
    n_classes = z.shape[-1]
    # The Jacobian, one backward pass per class.
    basis = jnp.broadcast_to(jnp.eye(n_classes, dtype=z.dtype)[:, None, :],
                             (n_classes, batch, n_classes))
    jac = jax.vmap(lambda ct: vjp(ct)[0])(basis).reshape(n_classes, batch, -1)
    jac = jnp.swapaxes(jac, 0, 1)
    df = z - z[rows, y][:, None]
    dg = jac - jac[rows, y][:, None, :]
    # The true class is no boundary to cross.
    return jnp.where(jax.nn.one_hot(y, n_classes, dtype=bool), 1e10, df), dg

  def body(i, s):
    x1, x_min, dist_min = s
    df, dg = linearisation(x1, jax.random.fold_in(model_key, 2 * i))
    dual = (jnp.sum(jnp.abs(dg), -1) if norm == "Linf"
            else jnp.sqrt(jnp.sum(jnp.square(dg), -1)))
    nearest = jnp.argmin(jnp.abs(df) / (dual + 1e-12), axis=-1)  # the closest linearised boundary
    w = dg[rows, nearest]
    b = -df[rows, nearest] + jnp.sum(w * x1.reshape(batch, -1), -1)
    d1 = project_onto_hyperplane(x1.reshape(batch, -1), w, b, norm)
    d2 = project_onto_hyperplane(flat_x, w, b, norm)
    a1 = jnp.maximum(distance(d1, jnp.zeros_like(d1), norm), 1e-8)
    a2 = jnp.maximum(distance(d2, jnp.zeros_like(d2), norm), 1e-8)
    # A convex combination of the projections of the iterate and of the original point, biased
    # towards the original point (alpha_max), with overshoot eta.
    alpha = _expand(jnp.clip(a1 / (a1 + a2), 0.0, alpha_max), x.ndim)
    x1 = jnp.clip((x1 + eta * d1.reshape(x.shape)) * (1 - alpha)
                  + (x + eta * d2.reshape(x.shape)) * alpha, 0.0, 1.0)

    adversarial = _argmax_differs(model(x1, jax.random.fold_in(model_key, 2 * i + 1)), y)
    dist = distance(x1, x, norm)
    closer = adversarial & (dist < dist_min)
    x_min = jnp.where(_expand(closer, x.ndim), x1, x_min)
    dist_min = jnp.where(closer, dist, dist_min)
    # Once across the boundary, step back towards x to look for a closer crossing.
    x1 = jnp.where(_expand(adversarial, x.ndim), x + beta * (x1 - x), x1)
    return x1, x_min, dist_min

  init = (x_start, x, jnp.full(x.shape[:1], jnp.inf, x.dtype))
  _, x_min, dist_min = jax.lax.fori_loop(0, n_iter, body, init)
  return x_min, dist_min


def fab(model: Model, x: jax.Array, y: jax.Array, keys: jax.Array, model_key: jax.Array, *,
        eps: float, norm: Norm = "Linf", targeted: bool = True, n_iter: int = 100,
        n_restarts: int = 1, n_target_classes: int = 9, alpha_max: float = 0.1, eta: float = 1.05,
        beta: float = 0.9, active: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """FAB (FAB-T with `targeted`) on a batch: a minimal-norm attack; success needs norm <= eps.

  Targeted runs take the classes with the 2nd to (n_target_classes + 1)-th largest clean logit
  in turn; restarts after the first (per target) start at a random point at distance eps / 2.
  Arguments as `apgd`.

  Returns:
    `(x_adv [B, H, W, C], fooled [B])`: the closest misclassified point found over all runs an
    example took part in (x itself if none), in [0, 1] but possibly outside the eps-ball;
    `fooled` where it is misclassified and within eps.
  """
  active = jnp.ones(x.shape[:1], bool) if active is None else active
  n_runs = n_restarts * (n_target_classes if targeted else 1)
  clean_key, runs_key = jax.random.split(model_key)
  clean_logits = model(x, clean_key)

  def run(r, running, extra):
    x_min, dist_min = extra
    run_key = jax.random.fold_in(runs_key, r)
    targets = _nth_largest(clean_logits, r // n_restarts + 2) if targeted else y
    x_start = jnp.where(r % n_restarts == 0, x,
                        _random_start(_example_keys(keys, r), x, 0.5 * eps, norm))
    x_run, dist_run = _fab_run(
        model, x, y, targets, x_start, run_key, norm=norm,
        targeted=targeted, n_iter=n_iter, alpha_max=alpha_max, eta=eta, beta=beta)
    closer = running & (dist_run < dist_min)
    x_min = jnp.where(_expand(closer, x.ndim), x_run, x_min)
    dist_min = jnp.where(closer, dist_run, dist_min)
    fooled = ((dist_run <= eps)
              & _argmax_differs(model(x_run, jax.random.fold_in(run_key, 2 * n_iter)), y))
    return x_run, fooled, (x_min, dist_min)

  init = (x, jnp.full(x.shape[:1], jnp.inf, x.dtype))
  _, fooled, (x_min, _) = _runs_loop(n_runs, run, x, active, init)
  return x_min, fooled


# ---------------------------------------------------------------------------------------------
# Square.


def square_schedule(n_queries: int, p_init: float = 0.8) -> list[tuple[int, int, float]]:
  """The phases `(first_iteration, end_iteration, p)` of Square's p schedule (not rescaled to
  `n_queries`, as AutoAttack runs it): p_init up to iteration 10, halved after 10, 50, 200, 500,
  1000, 2000, 4000, 6000 and 8000 iterations."""
  bounds = [0, 11, 51, 201, 501, 1001, 2001, 4001, 6001, 8001]
  phases = []
  for j, start in enumerate(bounds):
    end = min(bounds[j + 1] if j + 1 < len(bounds) else n_queries, n_queries)
    if start < end:
      phases.append((start, end, p_init / 2 ** j))
  return phases


def _square_l2_rectangle(rows: int, cols: int) -> np.ndarray:
  """Concentric rectangles around the centre, weighted 1 / (ring + 1)^2 cumulatively; unit L2."""
  if rows == 0:
    return np.zeros((0, cols), np.float32)
  u = np.abs(np.arange(rows) - rows // 2)[:, None]
  v = np.abs(np.arange(cols) - cols // 2)[None, :]
  ring = np.maximum(u, v)                  # the Chebyshev distance to the centre
  n_rings = max(rows // 2 + 1, cols // 2 + 1)
  weights = 1.0 / np.arange(1, n_rings + 1) ** 2
  tail = np.cumsum(weights[::-1])[::-1]    # sum over the rings from `ring` outwards
  out = tail[ring]
  return (out / np.sqrt(np.sum(out ** 2))).astype(np.float32)


def square_l2_pattern(size: int) -> np.ndarray:
  """Square's L2 window `[size, size]`: a positive top half and a negative bottom half, each a
  stack of concentric rectangles, unit L2 norm."""
  top = _square_l2_rectangle(size // 2, size)
  bottom = -_square_l2_rectangle(size - size // 2, size)
  pattern = np.concatenate([top, bottom], axis=0)
  return (pattern / np.sqrt(np.sum(pattern ** 2))).astype(np.float32)


def _window_corners(key: jax.Array, n: int, size: int, height: int, width: int) -> jax.Array:
  """`n` random (top, left) corners of a `size` window, as `[n, 2]`.

  Drawn from [0, H - size) x [0, W - size) (0 for a full-size window) as in the official code and
  the original Square code, which never put a smaller window on the last row or column; kept so
  that robust accuracies compare with the published ones.
  """
  high = jnp.array([max(height - size, 1), max(width - size, 1)])
  return jax.random.randint(key, (n, 2), 0, high)


def _window_mask(top: jax.Array, left: jax.Array, size: int, height: int,
                 width: int) -> jax.Array:
  """`[B, H, W, 1]` bool: the `size` x `size` window at (top, left) of each example."""
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
  in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
  return (in_rows[:, :, None] & in_cols[:, None, :])[..., None]


def _square_l2_start(keys: jax.Array, x: jax.Array, eps) -> jax.Array:
  """A grid of windows of side H // 5, each the L2 pattern (or its transpose) with a random sign
  per channel, scaled to L2 norm eps."""
  _, height, width, channels = x.shape
  size = max(height // 5, 1)
  offset = (height - 5 * size) // 2
  n_rows, n_cols = height // size, width // size
  pattern = jnp.asarray(square_l2_pattern(size))

  def tiles(key):
    sign_key, flip_key = jax.random.split(key)
    signs = jax.random.rademacher(sign_key, (n_rows, n_cols, channels), x.dtype)
    flips = jax.random.bernoulli(flip_key, 0.5, (n_rows, n_cols))
    windows = jnp.where(flips[..., None, None], pattern.T, pattern)     # [n_rows, n_cols, s, s]
    windows = windows[..., None] * signs[:, :, None, None, :]          # [.., s, s, C]
    return windows.transpose(0, 2, 1, 3, 4).reshape(n_rows * size, n_cols * size, channels)

  grid = jax.vmap(tiles)(keys)
  # The grid starts at (offset, offset) and is cut at the image border.
  grid = grid[:, :height - offset, :width - offset]
  delta = jnp.pad(grid, ((0, 0), (offset, height - offset - grid.shape[1]),
                         (offset, width - offset - grid.shape[2]), (0, 0)))
  return jnp.clip(x + eps * _normalize(delta, "L2"), 0.0, 1.0)


def _square_linf_candidate(key, x, x_best, eps, size):
  """A window of side `size` at a random place moved to a random vertex (a sign per channel)."""
  _, height, width, channels = x.shape

  def draw(k):
    k_pos, k_sign = jax.random.split(k)
    pos = _window_corners(k_pos, 1, size, height, width)[0]
    return pos, jax.random.rademacher(k_sign, (channels,), x.dtype)

  pos, signs = jax.vmap(draw)(key)
  window = _window_mask(pos[:, 0], pos[:, 1], size, height, width)
  return _project(x_best + window * 2 * eps * signs[:, None, None, :], x, eps, "Linf")


def _square_l2_candidate(key, x, x_best, eps, size):
  """Moves the perturbation mass of a second window into the first one, adds a fresh pattern
  there, and rescales the whole perturbation to L2 norm eps."""
  _, height, width, channels = x.shape
  pattern = jnp.asarray(square_l2_pattern(size))

  def draw(k):
    k_pos, k_sign, k_flip = jax.random.split(k, 3)
    pos = _window_corners(k_pos, 2, size, height, width).reshape(4)
    window = jnp.where(jax.random.bernoulli(k_flip), pattern.T, pattern)
    placed = jax.lax.dynamic_update_slice(jnp.zeros((height, width), x.dtype), window,
                                          (pos[0], pos[1]))
    return pos, placed, jax.random.rademacher(k_sign, (channels,), x.dtype)

  pos, placed, signs = jax.vmap(draw)(key)
  first = _window_mask(pos[:, 0], pos[:, 1], size, height, width)
  second = _window_mask(pos[:, 2], pos[:, 3], size, height, width)
  delta = x_best - x

  def channel_norm(v):  # [B, 1, 1, C]
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))

  image_norm = _expand(distance(x_best, x, "L2"), 4)
  union_norm = channel_norm(jnp.where(first | second, delta, 0.0))
  old = jnp.where(first, delta, 0.0)
  new = placed[..., None] * signs[:, None, None, :] + old / (1e-12 + channel_norm(old))
  budget = jnp.sqrt(jnp.maximum(eps ** 2 - image_norm ** 2, 0.0) / channels + union_norm ** 2)
  new = new / (1e-12 + channel_norm(new)) * budget
  delta = jnp.where(first, new, jnp.where(second, 0.0, delta))
  return jnp.clip(x + eps * _normalize(delta, "L2"), 0.0, 1.0)


def square(model: Model, x: jax.Array, y: jax.Array, keys: jax.Array, model_key: jax.Array, *,
           eps: float, norm: Norm = "Linf", n_queries: int = 5000, p_init: float = 0.8,
           active: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Square Attack on a batch: random search on the margin loss z_y - max_{i != y} z_i.

  Each query changes a square window (side sqrt(p H W), p from `square_schedule`) at a random
  place; it is kept if the margin drops. An example stops once misclassified. Linf starts from
  vertical stripes of +-eps; L2 from a grid of `square_l2_pattern` windows. Arguments as `apgd`.

  Returns:
    `(x_adv [B, H, W, C], fooled [B])`, x_adv always in the eps-ball and in [0, 1].
  """
  active = jnp.ones(x.shape[:1], bool) if active is None else active
  _, height, width, channels = x.shape
  if norm == "Linf":
    stripes = jax.vmap(lambda k: jax.random.rademacher(k, (1, width, channels), x.dtype))(keys)
    x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
  else:
    x_best = _square_l2_start(keys, x, eps)
  margin = _margin(model(x_best, jax.random.fold_in(model_key, n_queries)), y)

  for start, end, p in square_schedule(n_queries, p_init):
    size = int(round(np.sqrt(p * height * width)))
    if norm == "Linf":
      size = min(max(size, 1), height, width)
      candidate = functools.partial(_square_linf_candidate, eps=eps, size=size)
    else:
      size = max(size, 3)
      size = min(size + 1 - size % 2, height, width)  # odd, so the pattern has a centre
      candidate = functools.partial(_square_l2_candidate, eps=eps, size=size)

    def cond(state, end=end):
      i, _, margin = state
      return (i < end) & jnp.any(active & (margin > 0))

    def body(state, candidate=candidate):
      i, x_best, margin = state
      x_new = candidate(_example_keys(keys, i), x, x_best)
      new_margin = _margin(model(x_new, jax.random.fold_in(model_key, i)), y)
      better = active & (margin > 0) & (new_margin < margin)
      return (i + 1, jnp.where(_expand(better, x.ndim), x_new, x_best),
              jnp.where(better, new_margin, margin))

    _, x_best, margin = jax.lax.while_loop(cond, body, (jnp.int32(start), x_best, margin))

  fooled = active & _argmax_differs(model(x_best, jax.random.fold_in(model_key, n_queries + 1)),
                                    y)
  return x_best, fooled


# ---------------------------------------------------------------------------------------------
# The checks of the official package.


def _warn(message: str) -> None:
  warnings.warn(AutoAttackWarning(message + " (see the AutoAttack package's flags_doc.md)"),
                stacklevel=3)


def check_randomized(model: Model, x: jax.Array, y: jax.Array, n: int = 5,
                     tolerance: float = 1e-4) -> None:
  """Warn if `n` forward passes (with different model keys) disagree: a randomized defense."""
  outputs = [np.asarray(model(x, jax.random.key(i)), np.float64) for i in range(n)]
  outputs = [o / (np.linalg.norm(o, axis=-1, keepdims=True) + 1e-10) for o in outputs]
  correct = {int(np.sum(o.argmax(-1) == np.asarray(y))) for o in outputs}
  spread = max(np.linalg.norm(a - b, axis=-1).max() for a in outputs for b in outputs)
  if len(correct) > 1 or spread > tolerance:
    _warn("two forward passes of the model disagree: it seems to be a randomized defense; use "
          "version='rand' (and pass randomized=True so the attacks draw new randomness)")


def check_range_output(logits: np.ndarray, tolerance: float = 1e-5) -> None:
  """Warn if the outputs look like probabilities (in [0, 1], rows summing to 1), not logits."""
  logits = np.asarray(logits, np.float64)
  if (logits.max() < 1 + tolerance and logits.min() > -tolerance
      and np.all(np.abs(logits.sum(-1) - 1) < tolerance)):
    _warn("the model's outputs look like a probability distribution; attack the logits "
          "(the losses saturate on probabilities)")


def check_zero_gradients(model: Model, x: jax.Array, y: jax.Array) -> None:
  """Warn if the DLR (CE with fewer than 3 classes) gradient at x is exactly zero for some
  examples: gradient masking that would make the gradient-based attacks fail."""
  def total(xx):
    logits = model(xx, jax.random.key(0))
    loss = dlr_loss(logits, y) if logits.shape[-1] >= 3 else losses.cross_entropy(logits, y)
    return loss.sum()

  grad = np.asarray(jax.grad(total)(x)).reshape(len(x), -1)
  zero = int(np.sum(np.all(grad == 0, axis=-1)))
  if zero:
    _warn(f"{zero} of {len(x)} points ({100 * zero / len(x):.0f}%) have zero gradient: the "
          "gradient-based attacks may be unreliable on this model (gradient masking)")


def check_n_classes(n_classes: int, names: Sequence[str], n_target_classes: int) -> None:
  """Warn about losses or target counts that the number of classes does not allow."""
  if n_classes <= 2 and {"apgd-dlr", "apgd-t"} & set(names):
    _warn(f"with {n_classes} classes the DLR loss is not defined")
  elif n_classes == 3 and "apgd-t" in names:
    _warn("with 3 classes the targeted DLR loss is not defined")
  if {"apgd-t", "fab-t"} & set(names) and n_target_classes > n_classes - 1:
    _warn(f"{n_target_classes} target classes asked for, but only {n_classes - 1} exist; "
          f"using {n_classes - 1}")


def check_square_success(accuracy_after: dict[str, float], tolerance: float = 0.002) -> None:
  """Warn if Square, a black-box attack, broke points that the gradient-based attacks missed."""
  if "square" in accuracy_after and len(accuracy_after) > 1:
    others = min(v for k, v in accuracy_after.items() if k != "square")
    if accuracy_after["square"] < others - tolerance:
      _warn(f"Square lowered the robust accuracy by {100 * (others - accuracy_after['square']):.1f}"
            " points after the gradient-based attacks: the model may mask gradients; consider "
            "more Square queries and restarts or an adaptive attack")


# ---------------------------------------------------------------------------------------------
# The ensemble.


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The outcome of `evaluate` on N examples.

  Attributes:
    robust_accuracy: fraction of examples correctly classified under every attack.
    clean_accuracy: fraction correctly classified without attack.
    x_adv: `[N, H, W, C]` in [0, 1]: the adversarial example that broke each example, the clean
      image where none did (robust or misclassified already).
    robust: `[N]` bool.
    broken_by: `[N]` int: -1 robust, 0 misclassified clean, i >= 1 broken by `attacks[i - 1]`.
    attacks: the attacks run, in order.
    accuracy_after: robust accuracy after each attack (each only attacks what the previous left).
    seconds: wall time per attack (including compilation), and 'clean'.
    version, norm, eps: the settings.
  """
  robust_accuracy: float
  clean_accuracy: float
  x_adv: np.ndarray
  robust: np.ndarray
  broken_by: np.ndarray
  attacks: tuple[str, ...]
  accuracy_after: dict[str, float]
  seconds: dict[str, float]
  version: str
  norm: str
  eps: float

  @property
  def broken_by_name(self) -> list[str]:
    """Per example: the attack's name, 'clean' (misclassified) or '' (robust)."""
    names = ("clean", *self.attacks)
    return [names[i] if i >= 0 else "" for i in self.broken_by]


def _attack_settings(version: str, n_iter: int, n_queries: int, n_target_classes: int,
                     eot_iter: int) -> dict[str, tuple[Callable, dict]]:
  """Per attack name, the batch attack and its settings in `version` (the official values)."""
  restarts = 5 if version == "plus" else 1
  eot = eot_iter if version == "rand" else 1
  apgd_kw = dict(n_iter=n_iter, eot_iter=eot)
  return {
      "apgd-ce": (apgd, dict(apgd_kw, loss="ce", n_restarts=restarts)),
      "apgd-dlr": (apgd, dict(apgd_kw, loss="dlr", n_restarts=restarts)),
      "apgd-t": (apgd, dict(apgd_kw, loss="dlr-targeted", n_restarts=1,
                            n_target_classes=n_target_classes)),
      "fab": (fab, dict(targeted=False, n_iter=n_iter, n_restarts=restarts)),
      "fab-t": (fab, dict(targeted=True, n_iter=n_iter, n_restarts=1,
                          n_target_classes=n_target_classes)),
      "square": (square, dict(n_queries=n_queries)),
  }


def _check_settings(x: np.ndarray, y: np.ndarray, eps: float, norm: str, version: str,
                    names: Sequence[str], batch_size: int, mesh) -> None:
  if norm not in NORMS:
    raise errors.ConfigError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
  if norm == "Linf":
    attacks.check_eps(eps)
  elif not isinstance(eps, (int, float)) or not 0 <= eps < np.inf:
    raise errors.ConfigError(f"eps={eps!r} must be a non-negative number")
  if version not in VERSIONS:
    raise errors.ConfigError(f"unknown version {version!r}; use one of {', '.join(VERSIONS)}")
  unknown = [n for n in names if n not in ATTACKS]
  if unknown or not names:
    raise errors.ConfigError(
        f"unknown attacks {unknown or names}; choose from {', '.join(ATTACKS)}")
  if x.ndim != 4 or y.shape != x.shape[:1] or not len(x):
    raise errors.DataError(f"expected images [N, H, W, C] and labels [N] with N >= 1, got "
                           f"{x.shape} and {y.shape}")
  if x.min() < 0 or x.max() > 1:
    raise errors.DataError(f"images must be in [0, 1], found values in [{x.min()}, {x.max()}]")
  n_devices = mesh.devices.size
  if batch_size <= 0 or batch_size % n_devices:
    raise errors.ConfigError(f"batch_size={batch_size} must be a positive multiple of the "
                             f"{n_devices} devices of the mesh")


def _batches(indices: np.ndarray, batch_size: int):
  """Index batches of exactly `batch_size`, the last one padded: `(indices, mask)` pairs."""
  for start in range(0, len(indices), batch_size):
    part = indices[start:start + batch_size]
    pad = batch_size - len(part)
    yield np.pad(part, (0, pad)), np.arange(batch_size) < len(part)


@dataclasses.dataclass(frozen=True)
class _WithParams:
  """`apply_fn` as `(params, x, key) -> logits`, whatever form the user gave it in. Hashable (and
  equal) whenever `apply_fn` is, so the compiled attacks are cached per model function."""
  apply_fn: Callable
  randomized: bool
  takes_params: bool

  def __call__(self, params, x, key):
    args = (params, x) if self.takes_params else (x,)
    return self.apply_fn(*args, key) if self.randomized else self.apply_fn(*args)


def evaluate(apply_fn: Callable, x, y, *, params=None, eps: float = 8 / 255, norm: Norm = "Linf",
             version: str = "standard", attacks_to_run: Sequence[str] | None = None,
             batch_size: int = 256, seed: int = 0, randomized: bool = False, n_iter: int = 100,
             n_queries: int = 5000, n_target_classes: int = 9, eot_iter: int = 20, mesh=None,
             progress: bool = True) -> Evaluation:
  """AutoAttack robust accuracy of `apply_fn` on `(x, y)`.

  Args:
    apply_fn: images `[B, H, W, C]` in [0, 1] -> logits `[B, K]`; with `randomized`, `(images,
      key) -> logits` for a model with its own randomness. With `params`, `params` comes first:
      `(params, images[, key])`.
    x: `[N, H, W, C]` in [0, 1]; y: `[N]` integer labels.
    params: the model's variables, if `apply_fn` takes them. They are passed to the compiled
      attacks as an argument; a closure over them would compile them in as constants (slow to
      compile, and memory for a second copy): pass large models' weights here.
    eps: radius of the threat model (Linf: in [0, 1]).
    norm: 'Linf' or 'L2'.
    version: 'standard' (APGD-CE, APGD-T, FAB-T, Square), 'plus' (APGD-CE and APGD-DLR with 5
      restarts, FAB with 5, Square, APGD-T, FAB-T), 'rand' (APGD-CE, APGD-DLR with EOT over
      `eot_iter` draws), 'fast' (APGD-CE, APGD-T), or 'custom' with `attacks_to_run`.
    attacks_to_run: names from `ATTACKS` for version 'custom' (standard settings).
    batch_size: examples per jitted call (a multiple of the device count).
    seed: the random starts and queries are a function of it and of each example's index.
    n_iter: APGD and FAB iterations (100 officially); n_queries: Square queries (5000).
    n_target_classes: targets of APGD-T and FAB-T (9, at most K - 1).
    mesh: the device mesh (default: all devices).
    progress: a tqdm bar per attack.

  Returns:
    An `Evaluation`. Warns `AutoAttackWarning` when the official checks flag the model.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  mesh = mesh or sharding.make_mesh()
  if version == "custom":
    names = tuple(attacks_to_run or ())
  elif attacks_to_run is not None:
    raise errors.ConfigError(f"attacks_to_run is for version='custom', not {version!r}")
  else:
    names = VERSION_ATTACKS.get(version, ())
  _check_settings(x, y, eps, norm, version, names, batch_size, mesh)
  fn = _WithParams(apply_fn, randomized, params is not None)
  batch_sharding = sharding.batch_sharding(mesh)
  params = jax.device_put(params, sharding.replicated(mesh))
  model: Model = functools.partial(fn, params)
  n = len(x)

  # The official checks, on the first batch.
  first = jnp.asarray(x[:batch_size])
  if version != "rand":
    check_randomized(model, first, y[:batch_size])
  first_logits = np.asarray(model(first, jax.random.key(0)))
  n_classes = first_logits.shape[-1]
  check_range_output(first_logits)
  check_n_classes(n_classes, names, n_target_classes)
  check_zero_gradients(model, first, jnp.asarray(y[:batch_size]))
  n_target_classes = min(n_target_classes, n_classes - 1)

  tic = time.perf_counter()
  predict = jax.jit(lambda p, xx, key: jnp.argmax(fn(p, xx, key), -1))
  root = jax.random.key(seed)
  clean_root = jax.random.fold_in(root, len(ATTACKS))
  robust = np.zeros(n, bool)
  for b, (index, mask) in enumerate(_batches(np.arange(n), batch_size)):
    pred = predict(params, jax.device_put(x[index], batch_sharding),
                   jax.random.fold_in(clean_root, b))
    robust[index[mask]] = np.asarray(pred)[mask] == y[index[mask]]
  clean_accuracy = float(robust.mean())
  broken_by = np.where(robust, -1, 0)
  x_adv = x.copy()
  accuracy_after, seconds = {}, {"clean": time.perf_counter() - tic}

  settings = _attack_settings(version, n_iter, n_queries, n_target_classes, eot_iter)
  for stage, name in enumerate(names, start=1):
    tic = time.perf_counter()
    attack, kw = settings[name]
    # An unhashable callable (e.g. a dataclass instance) is compiled afresh on each call.
    make = _batch_attack if _hashable(fn) else _batch_attack.__wrapped__
    run = make(fn, attack, tuple(sorted(kw.items())), norm)
    attack_key = jax.random.fold_in(root, ATTACKS.index(name))
    todo = np.flatnonzero(robust)
    n_batches = -(-len(todo) // batch_size)
    for b, (index, mask) in enumerate(tqdm(_batches(todo, batch_size), total=n_batches,
                                           desc=name, disable=not progress, leave=False)):
      inputs = jax.device_put((x[index], y[index], mask, index.astype(np.int32)), batch_sharding)
      adv, broken = run(params, *inputs, jnp.int32(b), attack_key, jnp.float32(eps))
      broken = np.asarray(broken)
      hit = index[broken]
      robust[hit] = False
      broken_by[hit] = stage
      x_adv[hit] = np.asarray(adv)[broken]
    accuracy_after[name] = float(robust.mean())
    seconds[name] = time.perf_counter() - tic

  check_square_success(accuracy_after)
  return Evaluation(
      robust_accuracy=float(robust.mean()), clean_accuracy=clean_accuracy,
      x_adv=x_adv, robust=robust, broken_by=broken_by, attacks=names,
      accuracy_after=accuracy_after, seconds=seconds, version=version, norm=norm, eps=eps)


def _hashable(obj) -> bool:
  try:
    hash(obj)
  except TypeError:
    return False
  return True


@functools.lru_cache(maxsize=32)
def _batch_attack(fn: _WithParams, attack: Callable, settings: tuple[tuple[str, object], ...],
                  norm: Norm) -> Callable:
  """`(params, x, y, mask, index, batch_number, attack_key, eps) -> (x_adv, broken)` for one
  padded batch, jitted.

  Cached per model function, attack and settings, so evaluating the same `apply_fn` again (with
  other params, another seed or eps) reuses the compilation. `broken` re-checks the attack's
  claim: misclassified by a fresh forward pass and within eps.
  """
  @jax.jit
  def run(params, x, y, mask, index, batch_number, attack_key, eps):
    model: Model = functools.partial(fn, params)
    example_root, model_root = jax.random.split(attack_key)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(example_root, index)
    model_key, check_key = jax.random.split(jax.random.fold_in(model_root, batch_number))
    x_adv, fooled = attack(model, x, y, keys, model_key, eps=eps, norm=norm, active=mask,
                           **dict(settings))
    wrong = _argmax_differs(model(x_adv, check_key), y)
    within = distance(x_adv, x, norm) <= eps + _BALL_TOLERANCE
    return x_adv, mask & fooled & wrong & within

  return run
