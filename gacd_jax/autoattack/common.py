"""What the AutoAttack attacks share: the DLR losses, norms and projections, per-example keys, the
loop over restarts and targets, and `Program`, an attack's code cut at its loops.

The threat model is Linf or L2 (`Norm`, spelled 'linf' and 'l2' as everywhere in gacd_jax; the
public functions also take the AutoAttack package's 'Linf' and 'L2'); a model is
`model(x, key) -> logits` (see the package docstring).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from gacd_jax import attacks
from gacd_jax import losses

Norm = attacks.Norm
Model = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, H, W, C], key) -> logits [B, K]

NORMS = attacks.NORMS


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


def distance(x_adv: jax.Array, x: jax.Array, norm: Norm) -> jax.Array:
  """Per-example Linf or L2 distance: `[B, ...], [B, ...] -> [B]`."""
  delta = (x_adv - x).reshape(x.shape[0], -1)
  if attacks.norm_name(norm) == "linf":
    return jnp.max(jnp.abs(delta), axis=-1)
  return jnp.sqrt(jnp.sum(jnp.square(delta), axis=-1))


def expand(v: jax.Array, ndim: int) -> jax.Array:
  """`[B]` -> `[B, 1, ..., 1]` with `ndim` axes in all, to broadcast against images."""
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def normalize(v: jax.Array, norm: Norm) -> jax.Array:
  """Each example divided by its Linf or L2 norm (zero stays zero)."""
  return v / expand(distance(v, jnp.zeros_like(v), norm) + 1e-12, v.ndim)


def project(x_adv: jax.Array, x: jax.Array, eps, norm: Norm) -> jax.Array:
  return attacks.project(x_adv, x, eps, norm)


def example_keys(keys: jax.Array, salt) -> jax.Array:
  """Each example's key folded with `salt` (a run, an iteration): `[B]` keys."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, salt)


def argmax_differs(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.argmax(logits, axis=-1) != labels


def run_count(n_restarts: int, n_target_classes: int, targeted: bool) -> int:
  """The runs of APGD or FAB: one per restart, per target class when targeted."""
  return n_restarts * (n_target_classes if targeted else 1)


def runs_loop(runs, run: Callable, x: jax.Array, active: jax.Array, carry_extra=()):
  """`run(r, still_active, carry_extra) -> (x_run, fooled_run, carry_extra)` for r in
  `range(*runs)` (`runs` = (first, stop), traced or not), each on the examples not fooled yet,
  stopping early once every example is fooled.

  Returns `(x_out, fooled, carry_extra)`: an example's `x_out` comes from the run that fooled it,
  else from the last run it took part in.
  """
  def cond(state):
    r, _, fooled, _ = state
    return (r < stop) & jnp.any(active & ~fooled)

  def body(state):
    r, x_out, fooled, extra = state
    running = active & ~fooled
    x_run, fooled_run, extra = run(r, running, extra)
    x_out = jnp.where(expand(running, x.ndim), x_run, x_out)
    return r + 1, x_out, fooled | (running & fooled_run), extra

  first, stop = runs
  init = (jnp.asarray(first, jnp.int32), x, jnp.zeros(x.shape[:1], bool), carry_extra)
  _, x_out, fooled, extra = jax.lax.while_loop(cond, body, init)
  return x_out, fooled, extra


def one_run(x: jax.Array, active: jax.Array, x_run: jax.Array, fooled_run: jax.Array):
  """`runs_loop` over the one run whose `(x_run, fooled_run)` is given: `(x_out, fooled)`."""
  return jnp.where(expand(active, x.ndim), x_run, x), active & fooled_run


Loops = tuple[tuple[int, int], ...]  # (start, stop) of each loop, in order


class Program(NamedTuple):
  """An attack cut at its loops, so that a caller chooses how they run.

  `init() -> state`; then for each loop k, `(start, stop) = loops[k]`, for i in range(start,
  stop) while `going(state)` (always, where `going` is None): `state = body(k, i, state)`; then
  `finish(state) -> outputs`. `run_on_device` makes each loop a `lax` loop inside the caller's
  jit; the ensemble driver instead calls a jitted `body` from the host, one iteration at a time
  (`runtime.host_attack_loops`). The functions close over the attack's inputs and settings;
  `loops` depends on the settings only. What the iterations need beyond the inputs (APGD-T's
  targets) `init` computes into the state: with host loops, `body` is a program of its own, and
  anything it closes over would be computed again at every iteration. An attack whose `init`
  would take the model's gradient can leave that to its first `body` step instead (APGD does),
  so that host loops compile one gradient program per batch shape, not two.

  `remaining(state) -> [B]` bool, where given instead of `going`, marks the examples still being
  attacked (the program goes on while any is: `Program.goes`); every leaf of the state is per
  example (leading axis B), and an example's outputs no longer change once it is not remaining.
  The host loops then compact the batch to the examples remaining (`_host_loop_attack`).
  """
  init: Callable[[], Any]
  loops: Loops
  body: Callable[[int, jax.Array, Any], Any]
  finish: Callable[[Any], Any]
  going: Callable[[Any], jax.Array] | None = None
  remaining: Callable[[Any], jax.Array] | None = None

  @property
  def goes(self) -> Callable[[Any], jax.Array] | None:
    """`state -> bool`, whether to go on (`going`, or any example `remaining`); None: always."""
    if self.remaining is None:
      return self.going
    return lambda state: jnp.any(self.remaining(state))


def run_on_device(program: Program):
  """`program`'s outputs, its loops as `lax.fori_loop` (`lax.while_loop` where it `goes`)."""
  state = program.init()
  goes = program.goes
  for k, (start, stop) in enumerate(program.loops):
    body = lambda i, s, k=k: program.body(k, i, s)
    if goes is None:
      state = jax.lax.fori_loop(start, stop, body, state)
    else:
      _, state = jax.lax.while_loop(
          lambda c, stop=stop: (c[0] < stop) & goes(c[1]),
          lambda c, body=body: (c[0] + 1, body(c[0], c[1])), (jnp.int32(start), state))
  return program.finish(state)


def nth_largest(logits: jax.Array, rank) -> jax.Array:
  """The class with the `rank`-th largest logit (1 = the top), per example: `[B]`."""
  order = jnp.argsort(logits, axis=-1)
  return jnp.take(order, logits.shape[-1] - rank, axis=1)


def random_start(keys: jax.Array, x: jax.Array, radius, norm: Norm) -> jax.Array:
  """A random point at distance `radius` from x before clipping to [0, 1]: uniform noise scaled
  to that Linf norm, or a Gaussian direction of that L2 norm (APGD and FAB's restarts)."""
  shape = x.shape[1:]  # each example's noise drawn flat: the same numbers, compiled faster
  if norm == "linf":
    noise = jax.vmap(lambda k: attacks.flat_draw(jax.random.uniform, k, shape, x.dtype, -1.0,
                                                 1.0))(keys)
  else:
    noise = jax.vmap(lambda k: attacks.flat_draw(jax.random.normal, k, shape, x.dtype))(keys)
  return jnp.clip(x + radius * normalize(noise, norm), 0.0, 1.0)
