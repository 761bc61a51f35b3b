"""One composable projected gradient attack; FGSM, PGD-k and CW-inf are configurations of it.

An attack maximises a per-example objective `x -> [B]` (built by the caller from a model and a
loss, so the caller decides how BatchNorm behaves during the attack). The parts are independent
switches: the start (uniform in the ball, a small Gaussian, or the clean input), the step rule
(sign of the gradient, or the L2-normalised gradient), the projection (Linf or L2 ball), the number
of steps and the step size. The result is always inside the eps-ball around `x`, inside [0, 1],
and behind `stop_gradient`.
"""

import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from gacd_jax import errors
from gacd_jax import losses

Objective = Callable[[jax.Array], jax.Array]
Norm = Literal["linf", "l2"]
Start = Literal["uniform", "gaussian", "none"]
StepRule = Literal["sign", "l2"]

# The package's spelling of the threat models; `norm_name` also takes any other case ('Linf',
# 'L2', as the AutoAttack package writes them).
NORMS = ("linf", "l2")
STARTS = ("uniform", "gaussian", "none")
STEP_RULES = ("sign", "l2")


def check_eps(eps: float, name: str = "eps") -> None:
  """Raise a ConfigError unless `eps` is a number in [0, 1] (inputs live in [0, 1])."""
  if not isinstance(eps, (int, float)) or not 0.0 <= eps <= 1.0:
    raise errors.ConfigError(
        f"{name}={eps!r} is outside [0, 1]; images are in [0, 1], so write e.g. 8/255 for 8 "
        "pixel levels")


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
  if value not in choices:
    raise errors.ConfigError(f"unknown {name} {value!r}; use one of {', '.join(choices)}")


def norm_name(norm: str) -> Norm:
  """`norm` in the package's spelling: 'linf' or 'l2', from any case ('Linf', 'L2', 'LINF')."""
  name = norm.lower() if isinstance(norm, str) else norm
  _check_choice(name, NORMS, "norm")
  return name


def _per_example_l2(v: jax.Array) -> jax.Array:
  """L2 norm of each example, shaped to broadcast against `v`."""
  norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))
  return norm


def project(x_adv: jax.Array, x: jax.Array, eps: float, norm: Norm) -> jax.Array:
  """Project `x_adv` onto the eps-ball around `x` intersected with [0, 1]."""
  delta = x_adv - x
  if norm_name(norm) == "linf":
    delta = jnp.clip(delta, -eps, eps)
  else:
    delta = delta * jnp.minimum(1.0, eps / (_per_example_l2(delta) + 1e-12))
  return jnp.clip(x + delta, 0.0, 1.0)


def flat_draw(draw: Callable[..., jax.Array], rng: jax.Array, shape: tuple[int, ...],
              *args) -> jax.Array:
  """`draw(rng, shape, *args)` (a `jax.random` sampler), drawn flat and reshaped: the same
  numbers, but on the CPU (jax 0.10) XLA compiles a draw of three or more dimensions seconds
  slower, in every program that holds an attack."""
  return draw(rng, (math.prod(shape),), *args).reshape(shape)


def _start(rng: jax.Array | None, x: jax.Array, eps: float, norm: Norm, start: Start,
           gaussian_std: float) -> jax.Array:
  if start == "none":
    return x
  if rng is None:
    raise ValueError(f"start={start!r} needs an rng key")
  if start == "gaussian":
    noise = gaussian_std * flat_draw(jax.random.normal, rng, x.shape, x.dtype)
    return jnp.clip(x + noise, 0.0, 1.0)
  if norm == "linf":
    noise = flat_draw(jax.random.uniform, rng, x.shape, x.dtype, -eps, eps)
  else:  # a uniformly random direction at a uniformly random radius in the L2 ball
    direction_rng, radius_rng = jax.random.split(rng)
    direction = flat_draw(jax.random.normal, direction_rng, x.shape, x.dtype)
    direction = direction / (_per_example_l2(direction) + 1e-12)
    radius = flat_draw(jax.random.uniform, radius_rng, (x.shape[0],) + (1,) * (x.ndim - 1),
                        x.dtype)
    noise = direction * radius * eps
  return project(x + noise, x, eps, norm)


def pgd(objective: Objective, x: jax.Array, rng: jax.Array | None = None, *, eps: float,
        step_size: float, steps: int, norm: Norm = "linf", start: Start = "uniform",
        step_rule: StepRule | None = None, gaussian_std: float = 0.001,
        unroll: bool | int = True) -> jax.Array:
  """Projected gradient ascent on `objective`, summed over the batch.

  Args:
    objective: `x_adv [B, H, W, C] -> [B]` per-example loss to maximise.
    x: clean inputs `[B, H, W, C]` in [0, 1].
    rng: key for the random start (unused with `start='none'`).
    eps: radius of the threat model ball, in [0, 1] (a float, or a scalar array).
    step_size: size of each step (Linf: per pixel; L2: per example).
    steps: number of gradient steps; 0 returns the start point.
    norm: threat model, 'linf' or 'l2' (any case).
    start: 'uniform' in the ball, 'gaussian' (x + gaussian_std * N(0, 1), as TRADES and RSLAD), or
      'none' (the clean input).
    step_rule: 'sign' or 'l2' (normalised gradient); defaults to the one matching `norm`.
    unroll: passed to `lax.fori_loop`. Unrolled runs faster (training's short attacks; the
      README's benchmark section); a rolled loop compiles faster (long evaluation attacks).

  Returns:
    `x_adv`, same shape as `x`, in the eps-ball around `x` and in [0, 1], behind `stop_gradient`.
  """
  if not isinstance(eps, jax.Array):  # a traced eps (e.g. an eps sweep in one jit) is the caller's
    check_eps(eps)
  norm = norm_name(norm)
  _check_choice(start, STARTS, "start")
  step_rule = step_rule or ("sign" if norm == "linf" else "l2")
  _check_choice(step_rule, STEP_RULES, "step rule")
  x = jax.lax.stop_gradient(x)
  grad_fn = jax.grad(lambda xa: jnp.sum(objective(xa)))

  def body(_, x_adv):
    g = grad_fn(x_adv)
    if step_rule == "sign":
      update = jnp.sign(g)
    else:
      update = g / (_per_example_l2(g) + 1e-12)
    return project(x_adv + step_size * update, x, eps, norm)

  x_adv = _start(rng, x, eps, norm, start, gaussian_std)
  if steps > 0:
    x_adv = jax.lax.fori_loop(0, steps, body, x_adv, unroll=unroll if steps > 1 else 1)
  return jax.lax.stop_gradient(x_adv)


def fgsm(objective: Objective, x: jax.Array, *, eps: float) -> jax.Array:
  """FGSM: one signed step of size eps from the clean input."""
  return pgd(objective, x, None, eps=eps, step_size=eps, steps=1, start="none")


def cross_entropy_objective(apply_fn: Callable[[jax.Array], jax.Array],
                            labels: jax.Array) -> Objective:
  """Untargeted CE objective for a function from images to logits."""
  return lambda x: losses.cross_entropy(apply_fn(x), labels)


def margin_objective(apply_fn: Callable[[jax.Array], jax.Array], labels: jax.Array) -> Objective:
  """CW margin objective (max other logit - true logit) for a function from images to logits."""
  return lambda x: losses.margin(apply_fn(x), labels)
