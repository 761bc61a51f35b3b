"""CRD's contrastive estimator written as RepDistiller (HobbitLong/RepDistiller) writes it: `Embed`
heads, a `ContrastMemory` holding two memory banks and the normalisers Z in buffers, the NCE
`ContrastLoss`, and negatives drawn per sample with `np.random.choice` as its dataset does in
'exact' mode.

What differs from RepDistiller, each to mirror `gacd_jax.methods.contrastive` exactly:
  * the NCE loss is returned per sample `[B]` (its mean is RepDistiller's loss), and may weight
    each sample's positive term, as GACD's sample reweighting needs;
  * the memory can score without updating (`update=False`), for the guided attack: the banks and Z
    then stay as they are, and on the first step Z is recomputed from each call's scores instead of
    being stored;
  * when all N dot products `[B, N]` cost less memory than gathering `[B, K + 1, D]` bank rows
    (K D > N, e.g. K = 16384 on CIFAR), scores come from the former, as in gacd_jax; RepDistiller
    always gathers, which at K = 16384, B = 128 copies 1 GB per bank per call;
  * the banks are updated out of place, because with the dot-product scores the backward pass still
    reads the pre-update bank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from gacd_jax import torch_convert

# RepDistiller's `eps` inside the NCE logs.
NCE_EPS = 1e-7


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
  """RepDistiller's `Normalize(2)`: rows `[B, D]` scaled to unit L2 norm."""
  norm = x.pow(2).sum(1, keepdim=True).pow(0.5)
  return x.div(norm)


def nce_loss(probs: torch.Tensor, num_examples: int,
             weights: Optional[torch.Tensor] = None) -> torch.Tensor:
  """RepDistiller's `ContrastLoss`, per sample: `probs [B, K + 1] -> [B]`.

  Noise Pn = 1 / N, m = K; column 0 of `probs` is the positive. `weights [B]` multiply each
  sample's positive term (None: 1).
  """
  m = probs.size(1) - 1
  pn = 1 / float(num_examples)
  p_pos = probs.select(1, 0)
  log_d1 = torch.div(p_pos, p_pos.add(m * pn + NCE_EPS)).log()
  p_neg = probs.narrow(1, 1, m)
  log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + NCE_EPS)).log()
  if weights is not None:
    log_d1 = weights * log_d1
  return -(log_d1 + log_d0.sum(1))


class ContrastMemory(nn.Module):
  """Two memory banks `[N, feat_dim]` (student and teacher embeddings by dataset index) and their
  normalisers, as RepDistiller's `ContrastMemory` (`memory_v1` = `memory_student`, `memory_v2` =
  `memory_teacher`; Z = -1 until the first updating call sets it)."""

  def __init__(self, feat_dim: int, num_examples: int, temperature: float = 0.07,
               momentum: float = 0.5):
    super().__init__()
    self.num_examples = num_examples
    self.temperature = temperature
    self.momentum = momentum
    stdv = 1.0 / math.sqrt(feat_dim / 3)
    self.register_buffer(
        "memory_student", torch.rand(num_examples, feat_dim).mul_(2 * stdv).add_(-stdv))
    self.register_buffer(
        "memory_teacher", torch.rand(num_examples, feat_dim).mul_(2 * stdv).add_(-stdv))
    self.register_buffer("z_student", torch.tensor(-1.0))
    self.register_buffer("z_teacher", torch.tensor(-1.0))

  def _scores(self, memory: torch.Tensor, anchor: torch.Tensor,
              contrast_index: torch.Tensor) -> torch.Tensor:
    """exp(<memory[j], anchor_i> / T) for the `[B, K + 1]` dataset indices j of row i."""
    batch, num_contrast = contrast_index.shape
    dim = memory.size(1)
    if num_contrast * dim > self.num_examples:
      dots = torch.gather(torch.mm(anchor, memory.t()), 1, contrast_index)
    else:
      weight = torch.index_select(memory, 0, contrast_index.view(-1)).detach()
      weight = weight.view(batch, num_contrast, dim)
      dots = torch.bmm(weight, anchor.view(batch, dim, 1)).squeeze(2)
    return torch.exp(torch.div(dots, self.temperature))

  def _normalizer(self, z: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return scores.mean().detach() * self.num_examples if z.item() < 0 else z

  def _updated(self, memory: torch.Tensor, index: torch.Tensor,
               embedding: torch.Tensor) -> torch.Tensor:
    rows = torch.index_select(memory, 0, index).mul(self.momentum)
    rows = rows.add(torch.mul(embedding, 1 - self.momentum))
    return memory.index_copy(0, index, l2_normalize(rows))

  def forward(self, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor,
              index: torch.Tensor, contrast_index: torch.Tensor,
              update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of both anchors, divided by their Z; with `update`, then the momentum update.

    Args:
      student_embedding, teacher_embedding: `[B, feat_dim]`, unit norm.
      index: `[B]` int64 dataset indices of the batch (the bank rows to update).
      contrast_index: `[B, K + 1]` int64, column 0 the positive (from `NegativeSampler`).
      update: update the banks and store Z (the training loss); False leaves them (the attack).

    Returns:
      (teacher-anchored probabilities against the student bank, student-anchored against the
      teacher bank), each `[B, K + 1]` (RepDistiller's out_v2, out_v1).
    """
    teacher_scores = self._scores(self.memory_student, teacher_embedding, contrast_index)
    student_scores = self._scores(self.memory_teacher, student_embedding, contrast_index)
    z_teacher = self._normalizer(self.z_teacher, teacher_scores)
    z_student = self._normalizer(self.z_student, student_scores)
    if update:
      with torch.no_grad():
        self.z_teacher = z_teacher.detach().clone()
        self.z_student = z_student.detach().clone()
        self.memory_student = self._updated(self.memory_student, index, student_embedding)
        self.memory_teacher = self._updated(self.memory_teacher, index, teacher_embedding)
    return teacher_scores / z_teacher, student_scores / z_student


class ContrastiveDistillation(nn.Module):
  """RepDistiller's `CRDLoss`: Linear heads to `feat_dim` then L2 normalisation, the memory, and
  the two-sided NCE. The heads are named as gacd_jax's method parameters (`student_head`,
  `teacher_head`), so `load_gacd_jax` maps them mechanically."""

  def __init__(self, student_dim: int, teacher_dim: int, num_examples: int, feat_dim: int = 128,
               temperature: float = 0.07, momentum: float = 0.5):
    super().__init__()
    self.student_head = nn.Linear(student_dim, feat_dim)
    self.teacher_head = nn.Linear(teacher_dim, feat_dim)
    self.memory = ContrastMemory(feat_dim, num_examples, temperature, momentum)

  def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor,
              index: torch.Tensor, contrast_index: torch.Tensor,
              weights: Optional[torch.Tensor] = None, update: bool = True) -> torch.Tensor:
    """The loss per sample `[B]`, teacher-anchored plus student-anchored; its mean is the loss.

    Args:
      student_features: `[B, D_S]`; teacher_features: `[B, D_T]` (the anchor).
      index, contrast_index, update: as `ContrastMemory.forward`.
      weights: `[B]` multipliers of each sample's positive terms (both sides), or None.
    """
    e_s = l2_normalize(self.student_head(student_features.view(student_features.size(0), -1)))
    e_t = l2_normalize(self.teacher_head(teacher_features.view(teacher_features.size(0), -1)))
    probs_teacher, probs_student = self.memory(e_s, e_t, index, contrast_index, update)
    num_examples = self.memory.num_examples
    return nce_loss(probs_teacher, num_examples, weights) + nce_loss(probs_student, num_examples,
                                                                     weights)

  def load_gacd_jax(self, method_params: Mapping[str, Any],
                    method_state: Mapping[str, Any]) -> None:
    """Load gacd_jax's GACD / CRD heads (`params['method']`) and banks (`method_state`)."""
    # torch_convert maps Flax paths to PyTorch keys mechanically and holds every layout change;
    # the architecture name is only validated, so any zoo name serves for the heads.
    heads = torch_convert.flax_to_torch("small_cnn", {"params": method_params})
    state = {k: torch.from_numpy(np.array(v)) for k, v in heads.items()}
    for name in ("memory_student", "memory_teacher", "z_student", "z_teacher"):
      state[f"memory.{name}"] = torch.from_numpy(np.array(method_state[name], np.float32))
    self.load_state_dict(state, strict=True)


class NegativeSampler:
  """RepDistiller's 'exact' sampling: for each sample its own index, then K dataset indices drawn
  with `np.random.choice` from the examples of other classes (with replacement only if fewer than
  K exist). RepDistiller draws them in `Dataset.__getitem__`; here per batch."""

  def __init__(self, train_labels: np.ndarray, num_negatives: int):
    labels = np.asarray(train_labels)
    self.num_negatives = num_negatives
    self.cls_negative = [np.where(labels != c)[0] for c in range(int(labels.max()) + 1)]

  def __call__(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`index, labels [B] -> [B, K + 1]` int64 dataset indices."""
    rows = []
    for i, target in zip(index.tolist(), labels.tolist()):
      negatives = self.cls_negative[target]
      replace = self.num_negatives > len(negatives)
      neg_idx = np.random.choice(negatives, self.num_negatives, replace=replace)
      rows.append(np.hstack((np.asarray([i]), neg_idx)))
    return torch.from_numpy(np.stack(rows)).long()
