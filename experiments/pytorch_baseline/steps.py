"""Training steps written the way the public PyTorch codebases write them: eager PyTorch, the
attack as a Python loop (`attacks.pgd`), the teacher in eval mode under `torch.no_grad()`, then
`optimizer.zero_grad(); loss.backward(); optimizer.step()` with `torch.optim.SGD`.

Each mirrors the math of the gacd_jax method of the same name (gacd_jax/methods/), so that
tests/test_parity.py can compare losses and gradients and experiments/benchmark.py can time the
same work in both frameworks. Models are the zoo of `models.py`: `model(x) -> (logits, features)`,
`x [B, C, H, W]` in [0, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from experiments.pytorch_baseline import attacks
from experiments.pytorch_baseline import crd


@dataclasses.dataclass(frozen=True)
class AttackSettings:
  """L-inf PGD of the training attack (gacd_jax's `config.attack` defaults)."""
  eps: float = 8 / 255
  step_size: float = 2 / 255
  steps: int = 10
  start: str = "uniform"  # the method's public code's start; 'none' makes a step deterministic


def sgd(params: Iterable[torch.Tensor], lr: float = 0.1, momentum: float = 0.9,
        weight_decay: float = 2e-4) -> torch.optim.SGD:
  """The optimizer of ARD, TRADES and RepDistiller (and gacd_jax's default recipe)."""
  return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def natural_step(student: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor) -> float:
  """One step of CE on clean inputs; returns the loss."""
  student.train()
  logits, _ = student(x)
  loss = F.cross_entropy(logits, y)
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return loss.item()


# ---------------------------------------------------------------------------------------------
# ARD.


def ard_loss(student: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
             teacher_logits: torch.Tensor, *, alpha: float = 1.0, temperature: float = 30.0,
             kl_reduction: str = "batchmean") -> torch.Tensor:
  """ARD's loss: alpha T^2 KL(p_T(x)/T || p_S(x')/T) + (1 - alpha) CE(S(x), y).

  The student runs in its current mode (train, in the step), x' before x as in ARD's code. ARD
  reduces its KL with `nn.KLDivLoss()` ('mean'); gacd_jax's default is 'batchmean'. With alpha = 1
  the clean forward is skipped, as in gacd_jax (ARD runs it; it only moves BatchNorm statistics).
  """
  adv_logits, _ = student(x_adv)
  kl = F.kl_div(F.log_softmax(adv_logits / temperature, dim=1),
                F.softmax(teacher_logits / temperature, dim=1), reduction=kl_reduction)
  loss = alpha * temperature * temperature * kl
  if alpha < 1.0:
    clean_logits, _ = student(x)
    loss = loss + (1.0 - alpha) * F.cross_entropy(clean_logits, y)
  return loss


def ard_step(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
             x: torch.Tensor, y: torch.Tensor, attack: AttackSettings = AttackSettings(), *,
             alpha: float = 1.0, temperature: float = 30.0,
             kl_reduction: str = "batchmean") -> float:
  """One ARD step (Goldblum et al. 2020): PGD on the student's CE with BatchNorm in train mode
  (by default from a uniform start), the teacher's clean logits, then `ard_loss`. Returns the
  loss.

  As in ARD's code (and unlike gacd_jax), every attack forward also moves the student's BatchNorm
  running statistics; the loss and its gradient do not depend on them.
  """
  student.train()
  x_adv = attacks.pgd(attacks.cross_entropy_objective(student, y), x, eps=attack.eps,
                      step_size=attack.step_size, steps=attack.steps, start=attack.start)
  teacher.eval()
  with torch.no_grad():
    teacher_logits, _ = teacher(x)
  optimizer.zero_grad()
  loss = ard_loss(student, x, y, x_adv, teacher_logits, alpha=alpha, temperature=temperature,
                  kl_reduction=kl_reduction)
  loss.backward()
  optimizer.step()
  return loss.item()


# ---------------------------------------------------------------------------------------------
# GACD, with gacd_jax's defaults: anchor e_T(x), NCE with memory banks, guided attack on the
# contrastive loss, reweighting by the teacher's probability of the label, CE + 0.8 contrastive.


def teacher_prob_weights(teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
  """w_i = p_T(y_i | x_i) rescaled to mean 1 over the batch, detached: `[B]`."""
  probs = F.softmax(teacher_logits.float(), dim=1)
  weights = probs.gather(1, y[:, None])[:, 0]
  return (weights / torch.clamp(weights.mean(), min=1e-12)).detach()


def gacd_objective(student: nn.Module, contrast: crd.ContrastiveDistillation,
                   teacher_features: torch.Tensor, index: torch.Tensor,
                   contrast_index: torch.Tensor) -> attacks.Objective:
  """The guided attack's per-example objective: the unweighted contrastive loss of the student's
  embedding of x' against the teacher anchor; the memory is read, not updated."""
  return lambda x_adv: contrast(student(x_adv)[1], teacher_features, index, contrast_index,
                                update=False)


def gacd_loss(student: nn.Module, contrast: crd.ContrastiveDistillation, x_adv: torch.Tensor,
              y: torch.Tensor, index: torch.Tensor, contrast_index: torch.Tensor,
              teacher_logits: torch.Tensor, teacher_features: torch.Tensor, *,
              ce_weight: float = 1.0, contrastive_weight: float = 0.8) -> torch.Tensor:
  """ce_weight CE(S(x'), y) + contrastive_weight mean_i(weighted NCE_i); updates the memory.

  Args:
    student: in its current mode (train, in the step).
    contrast: heads and memory; its banks and Z are updated.
    x_adv: `[B, C, H, W]`; y, index: `[B]` int64; contrast_index: `[B, K + 1]` int64.
    teacher_logits, teacher_features: the teacher on the clean batch.
  """
  adv_logits, adv_features = student(x_adv)
  weights = teacher_prob_weights(teacher_logits, y)
  contrastive = contrast(adv_features, teacher_features, index, contrast_index, weights).mean()
  return ce_weight * F.cross_entropy(adv_logits, y) + contrastive_weight * contrastive


def gacd_step(student: nn.Module, teacher: nn.Module, contrast: crd.ContrastiveDistillation,
              optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              index: torch.Tensor, attack_index: torch.Tensor, loss_index: torch.Tensor,
              attack: AttackSettings = AttackSettings()) -> float:
  """One GACD step; returns the loss.

  The teacher's clean logits and features (eval, no_grad); PGD (by default from a uniform start)
  maximising the contrastive loss with the student's BatchNorm on running statistics
  (`student.eval()`); then `gacd_loss` in train mode and an SGD update of the student and both
  heads.
  `attack_index` and `loss_index` `[B, K + 1]` are the attack's and the loss's negatives
  (`crd.NegativeSampler`), two draws as gacd_jax makes.
  """
  teacher.eval()
  with torch.no_grad():
    teacher_logits, teacher_features = teacher(x)
  student.eval()
  objective = gacd_objective(student, contrast, teacher_features, index, attack_index)
  x_adv = attacks.pgd(objective, x, eps=attack.eps, step_size=attack.step_size,
                      steps=attack.steps, start=attack.start)
  student.train()
  optimizer.zero_grad()
  loss = gacd_loss(student, contrast, x_adv, y, index, loss_index, teacher_logits,
                   teacher_features)
  loss.backward()
  optimizer.step()
  return loss.item()


# ---------------------------------------------------------------------------------------------
# RSLAD, as zibojia/RSLAD's `rslad_loss.py` and training loop write it.


def rslad_step(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, attack: AttackSettings = AttackSettings(start="gaussian"), *,
               adv_weight: float = 5 / 6, clean_weight: float = 1 / 6) -> float:
  """One RSLAD step (Zi et al. 2021); returns the loss.

  The teacher's clean logits (eval, no_grad); PGD maximising KL(p_T(x) || p_S(x')) summed over the
  batch, from x + 0.001 N(0, 1), with the student's BatchNorm on running statistics; then, in
  train mode (x' before x, as their loop), adv_weight KL(p_T(x) || p_S(x')) + clean_weight
  KL(p_T(x) || p_S(x)), each averaged over batch x classes (`torch.mean` of the elementwise KL).
  """
  teacher.eval()
  with torch.no_grad():
    teacher_probs = F.softmax(teacher(x)[0], dim=1)
  student.eval()
  objective = lambda x_adv: F.kl_div(F.log_softmax(student(x_adv)[0], dim=1), teacher_probs,
                                     reduction="none").sum(1)
  x_adv = attacks.pgd(objective, x, eps=attack.eps, step_size=attack.step_size,
                      steps=attack.steps, start=attack.start)
  student.train()
  optimizer.zero_grad()
  adv_logits, _ = student(x_adv)
  clean_logits, _ = student(x)
  kl = lambda logits: F.kl_div(F.log_softmax(logits, dim=1), teacher_probs,
                               reduction="none").mean()
  loss = adv_weight * kl(adv_logits) + clean_weight * kl(clean_logits)
  loss.backward()
  optimizer.step()
  return loss.item()
