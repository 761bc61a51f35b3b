"""The checks of the official AutoAttack package: warnings that robustness may be overestimated."""

from __future__ import annotations

from typing import Sequence
import warnings

import jax
import numpy as np

from gacd_jax import losses
from gacd_jax.autoattack.common import Model, dlr_loss


class AutoAttackWarning(UserWarning):
  """A sign that AutoAttack may overestimate robustness (the official package's checks)."""


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
