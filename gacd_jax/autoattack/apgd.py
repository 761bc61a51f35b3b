"""APGD (Croce & Hein, ICML 2020): Auto-PGD with the CE, DLR or targeted DLR loss."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gacd_jax import errors
from gacd_jax import losses
from gacd_jax import attacks
from gacd_jax.autoattack.common import (Loops, Model, Norm, Program, argmax_differs, dlr_loss,
                                        dlr_targeted_loss, example_keys, expand, normalize,
                                        nth_largest, one_run, project, random_start, run_count,
                                        run_on_device, runs_loop)

APGD_LOSSES = ("ce", "dlr", "dlr-targeted")


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


def _apgd_run(model: Model, x: jax.Array, y: jax.Array, targets: Callable[[], jax.Array],
              keys: jax.Array, model_key: jax.Array, active: jax.Array, *, eps, norm: Norm,
              loss: str, n_iter: int, eot_iter: int, rho: float, eot_unroll: bool) -> Program:
  """One APGD run (Algorithm 1) from a random start, as a `Program` whose outputs are
  `(x_run, fooled)`: the first misclassified iterate where `fooled`, else the highest-loss one.
  `targets()` gives the classes the loss takes (the labels, or APGD-T's targets).

  The run stops once every `active` example is fooled (`Program.remaining`). The official code
  goes on for all `n_iter` steps and returns an example's last misclassified iterate; which
  examples are fooled is the same either way, and the first misclassified iterate does not
  depend on when the others in its batch are fooled, so results stay independent of batching."""
  loss_fn = _apgd_loss(loss)
  ndim = x.ndim

  def loss_and_grad(x_adv, targets, key):
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
                                              jax.random.split(key, eot_iter),
                                              unroll=eot_iter if eot_unroll else 1)
    return values[-1], logits[-1], grad_sum / eot_iter

  def direction(grad):
    return jnp.sign(grad) if norm == "linf" else normalize(grad, "l2")

  checkpoints = apgd_checkpoints(n_iter)
  is_checkpoint = np.zeros(n_iter, bool)
  is_checkpoint[np.asarray(checkpoints) - 1] = True
  # The number of steps since the previous checkpoint, at each checkpoint.
  window = np.zeros(n_iter, np.float32)
  window[np.asarray(checkpoints) - 1] = np.diff([0] + checkpoints)
  is_checkpoint, window = jnp.asarray(is_checkpoint), jnp.asarray(window)

  # The loop is rotated so that every model evaluation happens in `body`: step j evaluates the
  # point the previous step made (j = 0: the random start, which the algorithm's initialisation
  # evaluates), updates the bookkeeping, then makes the next point. The first evaluation thus
  # compiles with the others, not in a program of its own; the arithmetic is the algorithm's.
  def init():
    x_adv = random_start(keys, x, eps, norm)
    zeros = jnp.zeros(x.shape[:1], x.dtype)
    return dict(
        targets=targets(), x_eval=x_adv, x_adv=x_adv, x_prev=x_adv, grad=jnp.zeros_like(x_adv),
        value=zeros, x_best=x_adv, grad_best=jnp.zeros_like(x_adv), value_best=zeros,
        x_best_adv=x_adv, fooled=jnp.zeros(x.shape[:1], bool),
        step_size=jnp.full(x.shape[:1], 2.0 * eps, x.dtype), n_increase=zeros,
        value_best_at_check=zeros, reduced_at_check=jnp.ones(x.shape[:1], bool))

  def evaluated(i, s, value, logits, grad):
    """The state after evaluating `x_eval`, made by step i - 1 of Algorithm 1 (i >= 1)."""
    i = jnp.maximum(i - 1, 0)
    x_new = s["x_eval"]
    wrong = argmax_differs(logits, y)
    x_best_adv = jnp.where(expand(wrong & ~s["fooled"], ndim), x_new, s["x_best_adv"])
    improved = value > s["value_best"]
    x_best = jnp.where(expand(improved, ndim), x_new, s["x_best"])
    grad_best = jnp.where(expand(improved, ndim), grad, s["grad_best"])
    value_best = jnp.where(improved, value, s["value_best"])
    n_increase = s["n_increase"] + (value > s["value"])

    # At a checkpoint the step size halves where the loss rose in at most a fraction rho of the
    # steps since the last one, or where neither the step size was halved nor the best loss
    # improved since then; those examples restart from their best point.
    check = is_checkpoint[i]
    halve = check & ((n_increase <= window[i] * rho)
                     | (~s["reduced_at_check"] & (s["value_best_at_check"] >= value_best)))
    back = expand(halve, ndim)
    return dict(
        targets=s["targets"], x_eval=x_new, x_adv=jnp.where(back, x_best, x_new),
        x_prev=s["x_adv"], grad=jnp.where(back, grad_best, grad), value=value,
        x_best=x_best, grad_best=grad_best, value_best=value_best, x_best_adv=x_best_adv,
        fooled=s["fooled"] | wrong,
        step_size=jnp.where(halve, s["step_size"] / 2, s["step_size"]),
        n_increase=jnp.where(check, 0.0, n_increase),
        value_best_at_check=jnp.where(check, value_best, s["value_best_at_check"]),
        reduced_at_check=jnp.where(check, halve, s["reduced_at_check"]))

  def started(s, value, logits, grad):
    """The state after evaluating the random start (the algorithm's initialisation)."""
    x_start = s["x_eval"]
    return dict(s, x_adv=x_start, x_prev=x_start, grad=grad, value=value,
                x_best=x_start, grad_best=grad, value_best=value, x_best_adv=x_start,
                fooled=argmax_differs(logits, y), value_best_at_check=value)

  def body(_, i, s):
    # Step i evaluates the point step i - 1 made with the key the unrotated loop gives it.
    key = jax.random.fold_in(model_key, jnp.where(i == 0, n_iter, i - 1))
    value, logits, grad = loss_and_grad(s["x_eval"], s["targets"], key)
    s = jax.tree.map(lambda first, later: jnp.where(i == 0, first, later),
                     started(s, value, logits, grad), evaluated(i, s, value, logits, grad))
    # The next point: momentum 0.75 on the projected step, none on the first step.
    a = jnp.where(i > 0, 0.75, 1.0)
    z = project(s["x_adv"] + expand(s["step_size"], ndim) * direction(s["grad"]), x, eps, norm)
    x_next = project(s["x_adv"] + a * (z - s["x_adv"]) + (1 - a) * (s["x_adv"] - s["x_prev"]),
                     x, eps, norm)
    return dict(s, x_eval=x_next)

  def finish(s):
    return jnp.where(expand(s["fooled"], ndim), s["x_best_adv"], s["x_best"]), s["fooled"]

  def remaining(s):
    return active & ~s["fooled"]

  return Program(init, apgd_loops(n_iter), body, finish, remaining=remaining)


def apgd_loops(n_iter: int = 100, **_) -> Loops:
  """The loops of an APGD run's `Program`: the evaluation of its random start, then its
  `n_iter` steps (each `body` call evaluates one point)."""
  return ((0, n_iter + 1),)


def _apgd_runs(model: Model, x: jax.Array, y: jax.Array, keys: jax.Array, model_key: jax.Array,
               *, loss: str, n_restarts: int,
               **run_settings) -> Callable[[jax.Array, jax.Array], Program]:
  """`(r, active) ->` run number r of APGD on the `active` examples as a `Program`: the restart
  r % n_restarts, on the target ranked r // n_restarts + 2 (2 = the runner-up) for
  'dlr-targeted'."""
  clean_key, runs_key = jax.random.split(model_key)

  def program(r, active):
    def targets():
      if loss != "dlr-targeted":
        return y
      return nth_largest(model(x, clean_key), r // n_restarts + 2)
    return _apgd_run(model, x, y, targets, example_keys(keys, r), jax.random.fold_in(runs_key, r),
                     active, loss=loss, **run_settings)
  return program


def _check_loss(loss: str) -> None:
  if loss not in APGD_LOSSES:
    raise errors.ConfigError(f"unknown APGD loss {loss!r}; use one of {', '.join(APGD_LOSSES)}")


def apgd(model: Model, x: jax.Array, y: jax.Array, keys: jax.Array, model_key: jax.Array, *,
         eps: float, norm: Norm = "linf", loss: str = "ce", n_iter: int = 100,
         n_restarts: int = 1, n_target_classes: int = 9, eot_iter: int = 1, rho: float = 0.75,
         eot_unroll: bool = False, active: jax.Array | None = None,
         runs=None) -> tuple[jax.Array, jax.Array]:
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
    eot_unroll: unroll the loop over those draws (no XLA loop around the model; the same
      result), as the ensemble driver does with `runtime.host_attack_loops`.
    active: `[B]` bool, the examples to attack (default all).
    runs: `(first, stop)`: make only these of the `run_count` runs (restarts, targets), each
      with the keys it has in the full sequence; lets a caller re-batch the examples still robust
      between runs (the ensemble driver does). Default: all.

  Returns:
    `(x_adv [B, H, W, C], fooled [B])`: the first misclassified point where `fooled` (a run
    stops once all its examples are fooled), else the highest-loss point of the example's last
    run; always in the eps-ball and in [0, 1].
  """
  norm = attacks.norm_name(norm)
  _check_loss(loss)
  active = jnp.ones(x.shape[:1], bool) if active is None else active
  if runs is None:
    runs = (0, run_count(n_restarts, n_target_classes, loss == "dlr-targeted"))
  program = _apgd_runs(model, x, y, keys, model_key, eps=eps, norm=norm, loss=loss,
                       n_iter=n_iter, n_restarts=n_restarts, eot_iter=eot_iter, rho=rho,
                       eot_unroll=eot_unroll)

  def run(r, running, extra):
    return (*run_on_device(program(r, running)), extra)

  x_adv, fooled, _ = runs_loop(runs, run, x, active)
  return x_adv, fooled


def apgd_program(model: Model, x: jax.Array, y: jax.Array, keys: jax.Array,
                 model_key: jax.Array, *, run: jax.Array, eps: float, norm: Norm = "linf",
                 loss: str = "ce", n_iter: int = 100, n_restarts: int = 1,
                 n_target_classes: int = 9, eot_iter: int = 1, rho: float = 0.75,
                 eot_unroll: bool = False, active: jax.Array | None = None) -> Program:
  """Run number `run` of `apgd` as a `Program` (loops: `apgd_loops(n_iter)`) whose outputs equal
  `apgd(..., runs=(run, run + 1))`'s. Arguments as `apgd`."""
  del n_target_classes  # the runs are numbered by the caller
  norm = attacks.norm_name(norm)
  _check_loss(loss)
  active = jnp.ones(x.shape[:1], bool) if active is None else active
  program = _apgd_runs(model, x, y, keys, model_key, eps=eps, norm=norm, loss=loss,
                       n_iter=n_iter, n_restarts=n_restarts, eot_iter=eot_iter, rho=rho,
                       eot_unroll=eot_unroll)(run, active)
  return program._replace(finish=lambda s: one_run(x, active, *program.finish(s)))
