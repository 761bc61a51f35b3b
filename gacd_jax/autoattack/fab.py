"""FAB (Croce & Hein, ICML 2020): the fast adaptive boundary attack, untargeted or targeted."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from gacd_jax import attacks
from gacd_jax.autoattack.common import (Loops, Model, Norm, Program, argmax_differs, distance,
                                        example_keys, expand, nth_largest, one_run, random_start,
                                        run_count, run_on_device, runs_loop)


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
  norm = attacks.norm_name(norm)
  gap = jnp.sum(w * t, axis=-1) - b
  side = jnp.where(gap >= 0, 1.0, -1.0)
  w, gap = w * side[:, None], gap * side  # now w . d must be -gap <= 0: move against w
  room = jnp.where(w < 0, 1.0 - t, t)     # how far each coordinate can move against w
  if norm == "linf":
    # The Linf ball of radius lam: d_i = -sign(w_i) min(lam, room_i).
    lam = _water_level(jnp.abs(w), room, gap)
    return jnp.where(w != 0, -jnp.sign(w) * jnp.minimum(lam[:, None], room), 0.0)
  # The L2 projection d = -lam w, each coordinate stopped at the box:
  # d_i = -w_i min(lam, room_i / |w_i|).
  live = jnp.abs(w) > 1e-8
  limit = jnp.where(live, room / jnp.where(live, jnp.abs(w), 1.0), 0.0)
  lam = _water_level(jnp.where(live, w * w, 0.0), limit, gap)
  return jnp.where(live, -w * jnp.minimum(lam[:, None], limit), 0.0)


def _fab_run(model: Model, x: jax.Array, y: jax.Array, targets: Callable[[], jax.Array],
             x_start: Callable[[], jax.Array], model_key: jax.Array, *, norm: Norm,
             targeted: bool, n_iter: int, alpha_max: float, eta: float, beta: float) -> Program:
  """One FAB run as a `Program` whose outputs are `(x_min [B, H, W, C], dist_min [B])`: the
  closest misclassified iterate and its distance to x (inf and x itself where none was found).
  `targets()` gives the target classes (used when `targeted`), `x_start()` the first iterate."""
  batch = x.shape[0]
  flat_x = x.reshape(batch, -1)
  rows = jnp.arange(batch)

  def linearisation(x1, targets, key):
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

  def body(_, i, s):
    run_targets, x1, x_min, dist_min = s
    df, dg = linearisation(x1, run_targets, jax.random.fold_in(model_key, 2 * i))
    dual = (jnp.sum(jnp.abs(dg), -1) if norm == "linf"
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
    alpha = expand(jnp.clip(a1 / (a1 + a2), 0.0, alpha_max), x.ndim)
    x1 = jnp.clip((x1 + eta * d1.reshape(x.shape)) * (1 - alpha)
                  + (x + eta * d2.reshape(x.shape)) * alpha, 0.0, 1.0)

    adversarial = argmax_differs(model(x1, jax.random.fold_in(model_key, 2 * i + 1)), y)
    dist = distance(x1, x, norm)
    closer = adversarial & (dist < dist_min)
    x_min = jnp.where(expand(closer, x.ndim), x1, x_min)
    dist_min = jnp.where(closer, dist, dist_min)
    # Once across the boundary, step back towards x to look for a closer crossing.
    x1 = jnp.where(expand(adversarial, x.ndim), x + beta * (x1 - x), x1)
    return run_targets, x1, x_min, dist_min

  def init():
    return targets(), x_start(), x, jnp.full(x.shape[:1], jnp.inf, x.dtype)

  return Program(init, fab_loops(n_iter), body, lambda s: s[2:])


def fab_loops(n_iter: int = 100, **_) -> Loops:
  """The loops of a FAB run's `Program`: its `n_iter` steps."""
  return ((0, n_iter),)


def _fab_runs(model: Model, x: jax.Array, y: jax.Array, keys: jax.Array, model_key: jax.Array,
              *, eps, norm: Norm, targeted: bool, n_iter: int, n_restarts: int,
              **run_settings) -> Callable[[jax.Array], Program]:
  """Run number r of FAB as a `Program` whose outputs are `(x_run, dist_run, fooled_run)`."""
  clean_key, runs_key = jax.random.split(model_key)

  def program(r):
    run_key = jax.random.fold_in(runs_key, r)

    def targets():
      return nth_largest(model(x, clean_key), r // n_restarts + 2) if targeted else y

    def x_start():
      return jnp.where(r % n_restarts == 0, x,
                       random_start(example_keys(keys, r), x, 0.5 * eps, norm))
    run = _fab_run(model, x, y, targets, x_start, run_key, norm=norm, targeted=targeted,
                   n_iter=n_iter, **run_settings)

    def finish(s):
      x_run, dist_run = run.finish(s)
      fooled = ((dist_run <= eps)
                & argmax_differs(model(x_run, jax.random.fold_in(run_key, 2 * n_iter)), y))
      return x_run, dist_run, fooled
    return run._replace(finish=finish)
  return program


def _closer(running, x_run, dist_run, x_min, dist_min):
  """The closest point so far, `(x_min, dist_min)`, updated with a run's where `running`."""
  closer = running & (dist_run < dist_min)
  return (jnp.where(expand(closer, x_run.ndim), x_run, x_min),
          jnp.where(closer, dist_run, dist_min))


def fab(model: Model, x: jax.Array, y: jax.Array, keys: jax.Array, model_key: jax.Array, *,
        eps: float, norm: Norm = "linf", targeted: bool = True, n_iter: int = 100,
        n_restarts: int = 1, n_target_classes: int = 9, alpha_max: float = 0.1, eta: float = 1.05,
        beta: float = 0.9, active: jax.Array | None = None,
        runs=None) -> tuple[jax.Array, jax.Array]:
  """FAB (FAB-T with `targeted`) on a batch: a minimal-norm attack; success needs norm <= eps.

  Targeted runs take the classes with the 2nd to (n_target_classes + 1)-th largest clean logit
  in turn; restarts after the first (per target) start at a random point at distance eps / 2.
  Arguments as `apgd`.

  Returns:
    `(x_adv [B, H, W, C], fooled [B])`: the closest misclassified point found over all runs an
    example took part in (x itself if none), in [0, 1] but possibly outside the eps-ball;
    `fooled` where it is misclassified and within eps.
  """
  norm = attacks.norm_name(norm)
  active = jnp.ones(x.shape[:1], bool) if active is None else active
  runs = (0, run_count(n_restarts, n_target_classes, targeted)) if runs is None else runs
  program = _fab_runs(model, x, y, keys, model_key, eps=eps, norm=norm, targeted=targeted,
                      n_iter=n_iter, n_restarts=n_restarts, alpha_max=alpha_max, eta=eta,
                      beta=beta)

  def run(r, running, extra):
    x_run, dist_run, fooled = run_on_device(program(r))
    return x_run, fooled, _closer(running, x_run, dist_run, *extra)

  init = (x, jnp.full(x.shape[:1], jnp.inf, x.dtype))
  _, fooled, (x_min, _) = runs_loop(runs, run, x, active, init)
  return x_min, fooled


def fab_program(model: Model, x: jax.Array, y: jax.Array, keys: jax.Array, model_key: jax.Array,
                *, run: jax.Array, eps: float, norm: Norm = "linf", targeted: bool = True,
                n_iter: int = 100, n_restarts: int = 1, n_target_classes: int = 9,
                alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                active: jax.Array | None = None) -> Program:
  """Run number `run` of `fab` as a `Program` (loops: `fab_loops(n_iter)`) whose outputs equal
  `fab(..., runs=(run, run + 1))`'s. Arguments as `fab`."""
  del n_target_classes  # the runs are numbered by the caller
  norm = attacks.norm_name(norm)
  active = jnp.ones(x.shape[:1], bool) if active is None else active
  program = _fab_runs(model, x, y, keys, model_key, eps=eps, norm=norm, targeted=targeted,
                      n_iter=n_iter, n_restarts=n_restarts, alpha_max=alpha_max, eta=eta,
                      beta=beta)(run)

  def finish(s):
    x_run, dist_run, fooled = program.finish(s)
    x_min, _ = _closer(active, x_run, dist_run, x, jnp.full(x.shape[:1], jnp.inf, x.dtype))
    _, fooled = one_run(x, active, x_run, fooled)
    return x_min, fooled
  return program._replace(finish=finish)
