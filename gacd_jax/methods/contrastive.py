"""Contrastive estimators between student and teacher features (METHODS.md section 2).

Two estimators of the same idea, "the student's embedding of a sample should pick out the
teacher's embedding of the same sample":

* CRD's NCE with memory banks (Tian et al. 2020). Exact, per RepDistiller (`crd/criterion.py`,
  `crd/memory.py`, `dataset/cifar100.py`): the heads, the bank initialisation, the sampling of one
  positive (the sample's own index) and K negatives from other classes, the frozen normaliser Z,
  the NCE loss with noise 1/N and m = K (including its 1e-7), and the momentum update of the banks.
* In-batch InfoNCE over the global batch: no bank; both directions of a B x B cross-entropy.

Both return a loss *per example* `[B]` whose batch mean is the loss, so a guided attack can
maximise it per example and a method can weight each sample's positive term.

Embeddings come from heads `Linear(d -> feat_dim)` followed by L2 normalisation, one on student
features and one on teacher features; both are trainable method parameters.
"""

import dataclasses
import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gacd_jax import errors
from gacd_jax.methods.base import InitInfo, PyTree

EstimatorKind = Literal["nce", "infonce"]
ESTIMATORS = ("nce", "infonce")

# RepDistiller's `eps` inside the NCE logs.
_NCE_EPS = 1e-7
# The banks' scores are exp(<., .> / 0.07): a low-precision (e.g. TF32) dot would be amplified
# ~14x in the exponent, so the dots that feed them run in full float32.
_PRECISION = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Heads.


def init_head(rng: jax.Array, in_dim: int, out_dim: int) -> dict[str, jax.Array]:
  """A linear head initialised as PyTorch's `nn.Linear` (RepDistiller's `Embed`): weight and
  bias U(-1/sqrt(in_dim), 1/sqrt(in_dim)). Returns {'kernel': [in_dim, out_dim], 'bias': [out_dim]}.
  """
  bound = 1.0 / math.sqrt(in_dim)
  kernel_rng, bias_rng = jax.random.split(rng)
  return {"kernel": jax.random.uniform(kernel_rng, (in_dim, out_dim), jnp.float32, -bound, bound),
          "bias": jax.random.uniform(bias_rng, (out_dim,), jnp.float32, -bound, bound)}


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm: `[B, D] -> [B, D]` (a zero row stays zero instead of NaN)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def embed(head: dict[str, jax.Array], features: jax.Array) -> jax.Array:
  """`features [B, D] -> [B, feat_dim]`, unit L2 norm."""
  features = features.reshape(features.shape[0], -1).astype(jnp.float32)
  return l2_normalize(jnp.dot(features, head["kernel"], precision=_PRECISION) + head["bias"])


# ---------------------------------------------------------------------------------------------
# CRD: memory banks, negative sampling, NCE.


def init_memory(rng: jax.Array, train_labels: np.ndarray, num_classes: int,
                feat_dim: int) -> dict[str, jax.Array]:
  """The CRD state for a training set of `N = len(train_labels)` examples.

  Returns:
    memory_student, memory_teacher: `[N, feat_dim]` banks of student / teacher embeddings by
      dataset index, U(-stdv, stdv) with stdv = 1 / sqrt(feat_dim / 3) (RepDistiller).
    z_student, z_teacher: the normalisers of the student-anchored / teacher-anchored scores;
      -1 until the first step sets them.
    by_class: `[N]` dataset indices sorted by label (stable); class_start, class_count `[C]`: where
      each class's block starts in `by_class` and its size. Sampling negatives reads these; they
      live in the state because the method only sees the labels at init.
  """
  labels = np.asarray(train_labels, np.int64)
  num_examples = len(labels)
  stdv = 1.0 / math.sqrt(feat_dim / 3)
  student_rng, teacher_rng = jax.random.split(rng)
  counts = np.bincount(labels, minlength=num_classes)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  return {
      "memory_student": jax.random.uniform(student_rng, (num_examples, feat_dim), jnp.float32,
                                           -stdv, stdv),
      "memory_teacher": jax.random.uniform(teacher_rng, (num_examples, feat_dim), jnp.float32,
                                           -stdv, stdv),
      "z_student": jnp.full((), -1.0, jnp.float32),
      "z_teacher": jnp.full((), -1.0, jnp.float32),
      "by_class": jnp.asarray(np.argsort(labels, kind="stable"), jnp.int32),
      "class_start": jnp.asarray(starts, jnp.int32),
      "class_count": jnp.asarray(counts, jnp.int32),
  }


def sample_contrast_index(rng: jax.Array, memory_state: PyTree, index: jax.Array,
                          labels: jax.Array, num_negatives: int,
                          with_replacement: bool = False) -> jax.Array:
  """One positive and `num_negatives` negatives per sample, as RepDistiller's 'exact' mode.

  Column 0 is the sample's own dataset index; columns 1..K are dataset indices drawn uniformly from
  the examples of *other* classes: without replacement (RepDistiller's `np.random.choice`), or with
  replacement for a sample whose other classes hold fewer than K examples (as RepDistiller), or
  for every sample if `with_replacement` (O(B K) instead of a `[B, N]` sort per step).

  An offset o in [0, M), M = N - (own class size), indexes the class-sorted order with the own
  class's block skipped, so no Python loop and no per-class table is needed.

  Args:
    rng: key for the draw.
    memory_state: from `init_memory` (reads by_class, class_start, class_count).
    index: `[B]` dataset indices of the batch.
    labels: `[B]` their labels.
  Returns:
    `[B, K + 1]` int32 dataset indices.
  """
  num_examples = memory_state["by_class"].shape[0]
  start = memory_state["class_start"][labels][:, None]
  count = memory_state["class_count"][labels][:, None]
  num_other = num_examples - count                                    # [B, 1]
  shape = (labels.shape[0], num_negatives)
  replace_rng, subset_rng = jax.random.split(rng)
  offsets = jax.random.randint(replace_rng, shape, 0, jnp.maximum(num_other, 1))
  if not with_replacement and num_negatives <= num_examples:
    # A uniform K-subset of [0, M): the K largest of N uniform keys, the keys past M pushed below.
    keys = jax.random.uniform(subset_rng, (labels.shape[0], num_examples))
    keys = jnp.where(jnp.arange(num_examples) < num_other, keys, -1.0)
    subset = jax.lax.top_k(keys, num_negatives)[1]
    offsets = jnp.where(num_other >= num_negatives, subset, offsets)
  positions = jnp.where(offsets < start, offsets, offsets + count)
  negatives = memory_state["by_class"][positions]
  return jnp.concatenate([index[:, None].astype(jnp.int32), negatives], axis=1)


def bank_scores(memory: jax.Array, anchor: jax.Array, contrast_index: jax.Array,
                temperature: float) -> jax.Array:
  """exp(<memory[j], anchor_i> / tau) for the `[B, K + 1]` indices j of each row i.

  The bank is read behind stop_gradient (RepDistiller `.detach()`s it). When K + 1 rows of width D
  outnumber the bank (K D > N, e.g. CIFAR with K = 16384), all N dots `[B, N]` are cheaper in
  memory than gathering `[B, K + 1, D]`; both give the same scores.
  """
  memory = jax.lax.stop_gradient(memory)
  num_examples, dim = memory.shape
  if contrast_index.shape[1] * dim > num_examples:
    dots = jnp.dot(anchor, memory.T, precision=_PRECISION)
    dots = jnp.take_along_axis(dots, contrast_index, axis=1)
  else:
    dots = jnp.einsum("bkd,bd->bk", memory[contrast_index], anchor, precision=_PRECISION)
  return jnp.exp(dots / temperature)


def resolve_normalizer(z: jax.Array, scores: jax.Array, num_examples: int) -> jax.Array:
  """Z: the stored value, or on the first step (z < 0) mean(scores) * N, a constant."""
  first = jax.lax.stop_gradient(scores.mean()) * num_examples
  return jnp.where(z < 0, first, z)


def nce_per_example(probs: jax.Array, num_examples: int,
                    weights: Optional[jax.Array] = None) -> jax.Array:
  """CRD's NCE loss (RepDistiller `ContrastLoss`) per sample: `[B, K + 1] -> [B]`.

  With noise Pn = 1/N and m = K, sample i contributes
  -( w_i log(P_i0 / (P_i0 + m Pn)) + sum_k log(m Pn / (P_ik + m Pn)) ); the batch mean is the loss.

  Args:
    probs: P = score / Z, column 0 the positive.
    num_examples: N, the dataset size.
    weights: `[B]` multipliers of each sample's positive term, or None for 1.
  """
  m = probs.shape[1] - 1
  noise = m / num_examples
  log_d1 = jnp.log(probs[:, 0] / (probs[:, 0] + noise + _NCE_EPS))
  log_d0 = jnp.log(noise / (probs[:, 1:] + noise + _NCE_EPS))
  if weights is not None:
    log_d1 = weights * log_d1
  return -(log_d1 + log_d0.sum(1))


def update_memory(memory: jax.Array, index: jax.Array, embedding: jax.Array,
                  momentum: float) -> jax.Array:
  """Rows `index` become normalise(momentum * old + (1 - momentum) * embedding); no gradient.

  A dataset index repeated within one batch keeps one of its updates (as PyTorch's `index_copy_`);
  the epoch sampler never repeats one.
  """
  rows = momentum * memory[index] + (1.0 - momentum) * jax.lax.stop_gradient(embedding)
  return memory.at[index].set(l2_normalize(rows))


def crd_nce(memory_state: PyTree, student_embedding: jax.Array, teacher_embedding: jax.Array,
            index: jax.Array, contrast_index: jax.Array, *, temperature: float,
            momentum: float, weights: Optional[jax.Array] = None) -> tuple[jax.Array, PyTree]:
  """CRD's two-sided NCE and the updated state.

  Teacher-anchored: e_T against the student bank; student-anchored: e_S against the teacher bank
  (RepDistiller's out_v2 and out_v1). Each side is normalised by its own Z, frozen after the first
  call that updates the state.

  Args:
    memory_state: from `init_memory` or a previous call.
    student_embedding, teacher_embedding: `[B, feat_dim]`, unit norm.
    index: `[B]` dataset indices of the batch; contrast_index: `[B, K + 1]` from
      `sample_contrast_index`.
    weights: `[B]` multipliers of each sample's positive terms (both sides), or None.
  Returns:
    (`[B]` loss per sample, summed over both sides; the new state with updated banks and Z).
  """
  num_examples = memory_state["memory_student"].shape[0]
  teacher_scores = bank_scores(memory_state["memory_student"], teacher_embedding, contrast_index,
                               temperature)
  student_scores = bank_scores(memory_state["memory_teacher"], student_embedding, contrast_index,
                               temperature)
  z_teacher = resolve_normalizer(memory_state["z_teacher"], teacher_scores, num_examples)
  z_student = resolve_normalizer(memory_state["z_student"], student_scores, num_examples)
  per_example = (nce_per_example(teacher_scores / z_teacher, num_examples, weights)
                 + nce_per_example(student_scores / z_student, num_examples, weights))
  new_state = dict(
      memory_state,
      memory_student=update_memory(memory_state["memory_student"], index, student_embedding,
                                   momentum),
      memory_teacher=update_memory(memory_state["memory_teacher"], index, teacher_embedding,
                                   momentum),
      z_student=z_student, z_teacher=z_teacher)
  return per_example, new_state


# ---------------------------------------------------------------------------------------------
# InfoNCE.


def info_nce_from_logits(logits: jax.Array, weights: Optional[jax.Array] = None) -> jax.Array:
  """Symmetric in-batch InfoNCE per sample: `[B, B] -> [B]`.

  `logits[i, j]` scores teacher i against student j. Sample i's loss is the mean of its row term
  -log softmax_j(logits[i])[i] and its column term -log softmax_j(logits[:, i])[i], times w_i; the
  batch mean is the mean of the two directions' cross-entropies.
  """
  diagonal = jnp.diagonal(logits)
  row = jax.nn.logsumexp(logits, axis=1) - diagonal
  column = jax.nn.logsumexp(logits, axis=0) - diagonal
  per_example = 0.5 * (row + column)
  return per_example if weights is None else weights * per_example


def info_nce(student_embedding: jax.Array, teacher_embedding: jax.Array, temperature: float,
             weights: Optional[jax.Array] = None) -> jax.Array:
  """InfoNCE with logits <e_T_i, e_S_j> / tau over the (global) batch: `[B, D] x 2 -> [B]`."""
  logits = jnp.dot(teacher_embedding, student_embedding.T, precision=_PRECISION) / temperature
  return info_nce_from_logits(logits, weights)


# ---------------------------------------------------------------------------------------------
# The estimator a method holds.


@dataclasses.dataclass(frozen=True)
class Estimator:
  """A contrastive estimator with its heads: what GACD, CRD and CRDND share.

  Attributes:
    kind: 'nce' (CRD, memory banks) or 'infonce' (in-batch, no state).
    feat_dim: embedding width (RepDistiller 128).
    temperature: tau (RepDistiller 0.07).
    num_negatives: K for 'nce' (RepDistiller 16384).
    momentum: bank momentum for 'nce' (RepDistiller 0.5).
    with_replacement: 'nce' negatives drawn with replacement (see `sample_contrast_index`).
  """
  kind: EstimatorKind = "nce"
  feat_dim: int = 128
  temperature: float = 0.07
  num_negatives: int = 16384
  momentum: float = 0.5
  with_replacement: bool = False

  def __post_init__(self):
    if self.kind not in ESTIMATORS:
      raise errors.ConfigError(
          f"unknown contrastive estimator {self.kind!r}; use one of {', '.join(ESTIMATORS)}")
    if self.feat_dim <= 0 or self.num_negatives <= 0:
      raise errors.ConfigError(
          f"feat_dim={self.feat_dim} and num_negatives={self.num_negatives} must be positive")
    if self.temperature <= 0:
      raise errors.ConfigError(f"temperature={self.temperature} must be positive")
    if not 0.0 <= self.momentum < 1.0:
      raise errors.ConfigError(f"momentum={self.momentum} must be in [0, 1)")

  def init(self, rng: jax.Array, info: InitInfo) -> tuple[PyTree, PyTree]:
    """Heads (params) and, for 'nce', the memory banks (state)."""
    student_rng, teacher_rng, memory_rng = jax.random.split(rng, 3)
    params = {"student_head": init_head(student_rng, info.student_feature_dim, self.feat_dim),
              "teacher_head": init_head(teacher_rng, info.teacher_feature_dim, self.feat_dim)}
    state = {}
    if self.kind == "nce":
      state = init_memory(memory_rng, info.train_labels, info.num_classes, self.feat_dim)
    return params, state

  def sample(self, state: PyTree, batch: dict[str, jax.Array],
             rng: jax.Array) -> Optional[jax.Array]:
    """The NCE positive and negatives `[B, K + 1]` for the batch ('index', 'label'); None for
    'infonce'. Drawn once per objective, so every step of an attack sees the same ones."""
    if self.kind == "infonce":
      return None
    return sample_contrast_index(rng, state, batch["index"], batch["label"], self.num_negatives,
                                 self.with_replacement)

  def __call__(self, params: PyTree, state: PyTree, student_features: jax.Array,
               teacher_features: jax.Array, index: jax.Array,
               contrast_index: Optional[jax.Array] = None,
               weights: Optional[jax.Array] = None) -> tuple[jax.Array, PyTree]:
    """The loss per sample `[B]` (its mean is the loss) and the new state.

    Args:
      params, state: from `init` (or the previous step).
      student_features: `[B, D_S]` (e.g. on x'); teacher_features: `[B, D_T]` (the anchor).
      index: `[B]` dataset indices (the rows of the NCE banks to update).
      contrast_index: from `sample` ('nce' only).
      weights: `[B]` multipliers of each sample's positive term(s), or None.
    """
    e_s = embed(params["student_head"], student_features)
    e_t = embed(params["teacher_head"], teacher_features)
    if self.kind == "infonce":
      return info_nce(e_s, e_t, self.temperature, weights), state
    return crd_nce(state, e_s, e_t, index, contrast_index, temperature=self.temperature,
                   momentum=self.momentum, weights=weights)
