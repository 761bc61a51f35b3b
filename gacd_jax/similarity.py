"""Two measures of how alike two representations of the same examples are (the structure
analysis of `analysis` uses both): linear CKA and the correlation of pairwise cosine similarities.
Pure functions of feature arrays, compiled once per shape."""

import jax
import jax.numpy as jnp


@jax.jit
def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
  """Linear CKA between two representations of the same examples.

  Computed in feature space, ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X and Y,
  which equals the HSIC form with centred n x n Gram matrices but needs O(d^2), not O(n^2), memory.

  Args:
    x: [n, d1] features of n examples.
    y: [n, d2] features of the same n examples, in the same order.

  Returns:
    A scalar in [0, 1]; NaN if either representation is constant over the examples.
  """
  x = x - x.mean(axis=0)
  y = y - y.mean(axis=0)
  cross = jnp.sum(jnp.square(y.T @ x))
  return cross / (jnp.linalg.norm(x.T @ x) * jnp.linalg.norm(y.T @ y))


@jax.jit
def cosine_similarities(x: jax.Array) -> jax.Array:
  """Pairwise cosine similarities of the rows of `x` [n, d]: [n, n] (an all-zero row gives 0)."""
  unit = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return unit @ unit.T


@jax.jit
def similarity_correlation(x: jax.Array, y: jax.Array) -> jax.Array:
  """Pearson correlation of the pairwise cosine similarities under two representations.

  Args:
    x: [n, d1] features of n >= 3 examples.
    y: [n, d2] features of the same examples, in the same order.

  Returns:
    A scalar in [-1, 1] over the n (n - 1) / 2 pairs above the diagonal (the diagonal is 1 under
    any representation, so it would only inflate the correlation).
  """
  rows, cols = jnp.triu_indices(x.shape[0], k=1)
  a = cosine_similarities(x)[rows, cols]
  b = cosine_similarities(y)[rows, cols]
  return jnp.corrcoef(a, b)[0, 1]
