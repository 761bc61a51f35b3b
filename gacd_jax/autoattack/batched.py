"""One attack over padded batches: the batch shapes (`bucket`), the per-batch jit cache
(`_batch_attack`), host loops (`_host_loop_attack`) and the batches they shrink (`_Compacting`).

The ensemble driver, `gacd_jax.autoattack.evaluate`, calls `_batch_attack` once per attack and
batch; the package docstring says how the pieces fit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gacd_jax import evaluator
from gacd_jax.autoattack.apgd import apgd, apgd_loops, apgd_program
from gacd_jax.autoattack.common import Model, Norm, argmax_differs, distance
from gacd_jax.autoattack.fab import fab, fab_loops, fab_program
from gacd_jax.autoattack.square import square, square_loops, square_program

# An adversarial example counts if its distance is at most eps plus this much float32 rounding
# (x + delta - x is not exactly delta).
_BALL_TOLERANCE = 1e-6


def bucket(n: int, batch_size: int, n_devices: int = 1) -> int:
  """The batch shape for `n` examples: the smallest `n_devices * 2^k >= n`, at most `batch_size`.

  Batches come in these few shapes, each compiled once, so a short last batch or a small set of
  examples still to attack is padded to the next bucket, not to `batch_size`.
  """
  size = n_devices
  while size < n:
    size *= 2
  return min(size, batch_size)


def _batches(indices: np.ndarray, batch_size: int, n_devices: int):
  """`(indices, mask)` batches of `batch_size`, the last one padded to its `bucket`."""
  for start in range(0, len(indices), batch_size):
    part = indices[start:start + batch_size]
    size = bucket(len(part), batch_size, n_devices)
    yield np.pad(part, (0, size - len(part))), np.arange(size) < len(part)


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


@evaluator.cache_if_hashable(maxsize=32)
def _jitted(fn: _WithParams) -> Callable:
  """`fn` compiled, one per equal model function: the official checks' forward and gradient
  passes, run op by op, cost seconds per `evaluate` call on a CPU (6.4 s of 60 for APGD-CE on
  32 CIFAR images with a ResNet-18)."""
  return jax.jit(fn)


@dataclasses.dataclass(frozen=True)
class _Predict:
  """The predicted class of each example of a batch (`evaluator.map_batches`' function)."""
  fn: _WithParams

  def __call__(self, params, x, y, key):
    return {"prediction": jnp.argmax(self.fn(params, x, key), -1)}


# The attacks that gain from host loops: those that take gradients. Square only runs forward
# passes, which XLA's loops run at full speed, and its host loop would synchronise every query
# to ask whether an example is left (91 s in an XLA loop against 116 s from the host, 5,000
# queries on two batches of 128 28x28 images, small_cnn width 8, 2 cores).
_HOST_LOOP_ATTACKS = (apgd, fab)

# Each attack as `(program, loops)` for host loops (`runtime.host_attack_loops`): its `Program`
# builder and the static loops of that program.
_PROGRAMS = {apgd: (apgd_program, apgd_loops), fab: (fab_program, fab_loops),
             square: (square_program, square_loops)}


def _attack_inputs(fn: _WithParams, params, index, batch_number, run_number, attack_key):
  """`(model, keys, model_key, check_key)` of a batch: per-example keys from the example
  indices; the model's keys from the run and the batch number."""
  model: Model = functools.partial(fn, params)
  example_root, model_root = jax.random.split(attack_key)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(example_root, index)
  model_root = jax.random.fold_in(model_root, run_number)
  model_key, check_key = jax.random.split(jax.random.fold_in(model_root, batch_number))
  return model, keys, model_key, check_key


def _broken(model: Model, x_adv, fooled, x, y, mask, check_key, eps, norm: Norm) -> jax.Array:
  """The attack's claim `fooled` re-checked: misclassified by a fresh forward pass, within eps."""
  wrong = argmax_differs(model(x_adv, check_key), y)
  within = distance(x_adv, x, norm) <= eps + _BALL_TOLERANCE
  return mask & fooled & wrong & within


@evaluator.cache_if_hashable(maxsize=32)
def _batch_attack(fn: _WithParams, attack: Callable, settings: tuple[tuple[str, object], ...],
                  norm: Norm, by_run: bool, host_loops: bool = False) -> Callable:
  """`(params, x, y, mask, index, batch_number, run, attack_key, eps) -> (x_adv, broken)` for one
  padded batch; with `by_run`, only run number `run` of the attack's restarts/targets.

  One jit with the attack's loops inside; with `host_loops`, the attack's `Program` with one
  jitted call per iteration instead (`runtime.host_attack_loops`). Cached per model function,
  attack and settings, so evaluating the same `apply_fn` again (with other params, another seed
  or eps) reuses the compilation (one per batch shape). `broken` re-checks the attack's claim:
  misclassified by a fresh forward pass and within eps.
  """
  if host_loops:
    return _host_loop_attack(fn, attack, settings, norm, by_run)

  @jax.jit
  def run(params, x, y, mask, index, batch_number, run_number, attack_key, eps):
    model, keys, model_key, check_key = _attack_inputs(fn, params, index, batch_number,
                                                       run_number, attack_key)
    runs = {"runs": (run_number, run_number + 1)} if by_run else {}
    x_adv, fooled = attack(model, x, y, keys, model_key, eps=eps, norm=norm, active=mask,
                           **dict(settings), **runs)
    return x_adv, _broken(model, x_adv, fooled, x, y, mask, check_key, eps, norm)

  return run


def _host_loop_attack(fn: _WithParams, attack: Callable,
                      settings: tuple[tuple[str, object], ...], norm: Norm,
                      by_run: bool) -> Callable:
  """`_batch_attack` with the loops on the host: the attack's `Program` as three jits (its
  start, one iteration with the state donated, its end), each compiled once per batch shape.

  On XLA:CPU a convolution inside a while loop runs ~2x slower than the same computation as a
  jitted function called in a Python loop (the README's AutoAttack section), so the iterations
  are Python calls; the computation is the same as the device loops' (tested).
  """
  build_program, loops_of = _PROGRAMS[attack]
  kw = dict(settings)
  loops = loops_of(**kw)

  def program(args):
    params, x, y, mask, index, batch_number, run_number, attack_key, eps = args
    model, keys, model_key, check_key = _attack_inputs(fn, params, index, batch_number,
                                                       run_number, attack_key)
    runs = {"run": run_number} if by_run else {}
    return build_program(model, x, y, keys, model_key, eps=eps, norm=norm, active=mask, **kw,
                         **runs), model, check_key

  def left(prog, state):
    """What the host reads after each call: the examples still attacked, whether any is (a
    program without `remaining`), or None (one that always goes on: no sync with the host)."""
    if prog.remaining is not None:
      return prog.remaining(state)
    return None if prog.going is None else prog.going(state)

  @jax.jit
  def init(args):
    prog = program(args)[0]
    state = prog.init()
    return state, left(prog, state)

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
  def step(loop, args, i, state):
    prog = program(args)[0]
    state = prog.body(loop, i, state)
    return state, left(prog, state)

  @jax.jit
  def finish(args, state):
    prog, model, check_key = program(args)
    x_adv, fooled = prog.finish(state)
    _, x, y, mask, *_, eps = args
    return x_adv, _broken(model, x_adv, fooled, x, y, mask, check_key, eps, norm)

  def run(*args):
    batch = _Compacting(args, finish, compact=not fn.randomized)
    state, todo = init(args)
    for loop, (start, stop) in enumerate(loops):
      for i in range(start, stop):
        if todo is not None:
          todo = np.asarray(todo)
          if not todo.any():
            break
          state = batch.compact(state, todo)
        state, todo = step(loop, batch.args, np.int32(i), state)
    return batch.finish(state)

  return run


class _Compacting:
  """A padded batch that host loops shrink to the examples still attacked.

  When the examples a `Program` still attacks (`remaining`) fit a bucket at most half the
  batch's, the others are finished and set aside, and the batch (the per-example arguments and
  every leaf of the state) is gathered down to that bucket, so the iterations that follow cost
  what is left. An example's computation does not depend on the others in its batch (per-example
  keys), so the outputs are those of the uncompacted batch; a randomized model's draws depend on
  the batch's shape, so its batches are not compacted.
  """

  def __init__(self, args: tuple, finish: Callable, compact: bool):
    self.args, self._finish, self._compact = args, finish, compact
    self._rows = np.arange(len(args[1]))  # the original row of each row now; -1: padding
    self._x_adv = self._broken = None     # the whole batch's outputs, once one was set aside
    sharding = args[1].sharding
    self._n_devices = sharding.mesh.devices.size if hasattr(sharding, "mesh") else 1
    self._sharding = sharding

  def compact(self, state, todo: np.ndarray):
    """`state`, gathered down to the examples `todo` (per example) if their bucket is at most
    half the batch; else as it is (also where `todo` only says whether any is left)."""
    if not self._compact or todo.ndim != 1:
      return state
    size = bucket(int(todo.sum()), len(todo), self._n_devices)
    if size > len(todo) // 2:
      return state
    self._set_aside(*self._finish(self.args, state))
    keep = np.flatnonzero(todo)
    take = np.pad(keep, (0, size - len(keep)))
    params, x, y, mask, index, *scalars = self.args
    gathered = jax.device_put(
        (x[take], y[take], mask[take] & (np.arange(size) < len(keep)), index[take]),
        self._sharding)
    self.args = (params, *gathered, *scalars)
    self._rows = np.where(np.arange(size) < len(keep), self._rows[take], -1)
    return jax.device_put(jax.tree.map(lambda leaf: leaf[take], state), self._sharding)

  def _set_aside(self, x_adv, broken) -> None:
    x_adv, broken = np.asarray(x_adv), np.asarray(broken)
    if self._x_adv is None:
      self._x_adv, self._broken = x_adv.copy(), broken.copy()
      return
    rows = self._rows >= 0
    self._x_adv[self._rows[rows]] = x_adv[rows]
    self._broken[self._rows[rows]] = broken[rows]

  def finish(self, state):
    outputs = self._finish(self.args, state)
    if self._x_adv is None:
      return outputs
    self._set_aside(*outputs)
    return self._x_adv, self._broken
