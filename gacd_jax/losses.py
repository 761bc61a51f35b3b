"""Loss terms shared by the methods and the attacks.

All functions are pure and per-example unless their name says otherwise: they take logits
`[B, C]` (and integer labels `[B]`) and return `[B]`, so an attack can maximise them per example
and a method can weight or reduce them as its public code does.
"""

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from gacd_jax import errors

KLReduction = Literal["batchmean", "mean"]
KL_REDUCTIONS = ("batchmean", "mean")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example: `[B, C], [B] -> [B]`."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def kl_divergence(target_logits: jax.Array, logits: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
  """KL(softmax(target/T) || softmax(logits/T)) per example, summed over classes: `[B]`."""
  return kl_divergence_per_class(target_logits, logits, temperature).sum(-1)


def kl_divergence_per_class(target_logits: jax.Array, logits: jax.Array,
                            temperature: float = 1.0) -> jax.Array:
  """The summands of KL(softmax(target/T) || softmax(logits/T)): `[B, C]`."""
  target_log_p = jax.nn.log_softmax(target_logits.astype(jnp.float32) / temperature)
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
  return kl_divergence_from_log_probs(target_log_p, log_q)


def kl_divergence_from_log_probs(target_log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """The summands p * (log p - log q) of KL(p || q), with 0 log 0 = 0: `[B, C]`."""
  p = jnp.exp(target_log_p)
  return jnp.where(p > 0, p * (target_log_p - log_q), 0.0)


def reduce_kl(per_class: jax.Array, reduction: KLReduction) -> jax.Array:
  """Reduce `[B, C]` KL summands to a scalar.

  `batchmean`: sum over classes, mean over the batch (the KL divergence proper).
  `mean`: mean over batch x classes, as `nn.KLDivLoss()` in the ARD and RSLAD code; it is the
  `batchmean` value divided by the number of classes, so their loss weights keep their meaning.
  """
  if reduction == "batchmean":
    return per_class.sum(-1).mean()
  if reduction == "mean":
    return per_class.mean()
  raise errors.ConfigError(
      f"unknown KL reduction {reduction!r}; use one of {', '.join(KL_REDUCTIONS)}")


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """CW margin per example, max_{j != y} z_j - z_y: `[B]` (positive means misclassified)."""
  logits = logits.astype(jnp.float32)
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return others.max(-1) - true_logit


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of correct top-1 predictions (scalar)."""
  return (logits.argmax(-1) == labels).mean()
