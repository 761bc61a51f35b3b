"""Square Attack (Andriushchenko et al., ECCV 2020): score-based random search, Linf and L2."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gacd_jax import losses
from gacd_jax import attacks
from gacd_jax.autoattack.common import (Loops, Model, Norm, Program, argmax_differs, distance,
                                        example_keys, expand, normalize, project, run_on_device)


def _margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """z_y - max_{i != y} z_i: `[B]`, <= 0 when misclassified (Square minimises it)."""
  return -losses.margin(logits, labels)



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
  return jnp.clip(x + eps * normalize(delta, "l2"), 0.0, 1.0)


def _square_linf_candidate(key, x, x_best, eps, size):
  """A window of side `size` at a random place moved to a random vertex (a sign per channel)."""
  _, height, width, channels = x.shape

  def draw(k):
    k_pos, k_sign = jax.random.split(k)
    pos = _window_corners(k_pos, 1, size, height, width)[0]
    return pos, jax.random.rademacher(k_sign, (channels,), x.dtype)

  pos, signs = jax.vmap(draw)(key)
  window = _window_mask(pos[:, 0], pos[:, 1], size, height, width)
  return project(x_best + window * 2 * eps * signs[:, None, None, :], x, eps, "linf")


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

  image_norm = expand(distance(x_best, x, "l2"), 4)
  union_norm = channel_norm(jnp.where(first | second, delta, 0.0))
  old = jnp.where(first, delta, 0.0)
  new = placed[..., None] * signs[:, None, None, :] + old / (1e-12 + channel_norm(old))
  budget = jnp.sqrt(jnp.maximum(eps ** 2 - image_norm ** 2, 0.0) / channels + union_norm ** 2)
  new = new / (1e-12 + channel_norm(new)) * budget
  delta = jnp.where(first, new, jnp.where(second, 0.0, delta))
  return jnp.clip(x + eps * normalize(delta, "l2"), 0.0, 1.0)


def square_loops(n_queries: int = 5000, p_init: float = 0.8, **_) -> Loops:
  """The loops of Square's `Program`: one per phase of `square_schedule`."""
  return tuple((start, end) for start, end, _ in square_schedule(n_queries, p_init))


def square_program(model: Model, x: jax.Array, y: jax.Array, keys: jax.Array,
                   model_key: jax.Array, *, eps: float, norm: Norm = "linf",
                   n_queries: int = 5000, p_init: float = 0.8,
                   active: jax.Array | None = None) -> Program:
  """`square` as a `Program` (loops: `square_loops(n_queries, p_init)`, going while an active
  example is still classified correctly); the same arguments and outputs."""
  norm = attacks.norm_name(norm)
  active = jnp.ones(x.shape[:1], bool) if active is None else active
  _, height, width, _ = x.shape
  candidates = []
  for _, _, p in square_schedule(n_queries, p_init):
    size = int(round(np.sqrt(p * height * width)))
    if norm == "linf":
      size = min(max(size, 1), height, width)
      candidates.append(functools.partial(_square_linf_candidate, eps=eps, size=size))
    else:
      size = max(size, 3)
      size = min(size + 1 - size % 2, height, width)  # odd, so the pattern has a centre
      candidates.append(functools.partial(_square_l2_candidate, eps=eps, size=size))

  def init():
    if norm == "linf":
      stripes = jax.vmap(lambda k: jax.random.rademacher(k, (1, width, x.shape[-1]),
                                                         x.dtype))(keys)
      x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
    else:
      x_best = _square_l2_start(keys, x, eps)
    return x_best, _margin(model(x_best, jax.random.fold_in(model_key, n_queries)), y)

  def body(phase, i, state):
    x_best, margin = state
    x_new = candidates[phase](example_keys(keys, i), x, x_best)
    new_margin = _margin(model(x_new, jax.random.fold_in(model_key, i)), y)
    better = active & (margin > 0) & (new_margin < margin)
    return (jnp.where(expand(better, x.ndim), x_new, x_best),
            jnp.where(better, new_margin, margin))

  def going(state):
    return jnp.any(active & (state[1] > 0))

  def finish(state):
    x_best, _ = state
    model_out = model(x_best, jax.random.fold_in(model_key, n_queries + 1))
    return x_best, active & argmax_differs(model_out, y)

  return Program(init, square_loops(n_queries, p_init), body, finish, going)


def square(model: Model, x: jax.Array, y: jax.Array, keys: jax.Array, model_key: jax.Array, *,
           eps: float, norm: Norm = "linf", n_queries: int = 5000, p_init: float = 0.8,
           active: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Square Attack on a batch: random search on the margin loss z_y - max_{i != y} z_i.

  Each query changes a square window (side sqrt(p H W), p from `square_schedule`) at a random
  place; it is kept if the margin drops. An example stops once misclassified. Linf starts from
  vertical stripes of +-eps; L2 from a grid of `square_l2_pattern` windows. Arguments as `apgd`.

  Returns:
    `(x_adv [B, H, W, C], fooled [B])`, x_adv always in the eps-ball and in [0, 1].
  """
  return run_on_device(square_program(model, x, y, keys, model_key, eps=eps, norm=norm,
                                      n_queries=n_queries, p_init=p_init, active=active))
