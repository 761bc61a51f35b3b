"""L-inf PGD written the way the public PyTorch codebases write it (ARD's `AttackPGD`, TRADES'
`trades_loss`): an eager Python loop of `requires_grad_`, `torch.autograd.grad`, a signed step and
two clamps.

It mirrors `gacd_jax.attacks.pgd` for the L-inf threat model: same starts, same step, same
projection, and, like gacd_jax, the random start is clamped to [0, 1] before the first step (the
public code clamps only after it).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# `x_adv [B, C, H, W] -> [B]`: the per-example loss the attack maximises.
Objective = Callable[[torch.Tensor], torch.Tensor]


def pgd(objective: Objective, x: torch.Tensor, *, eps: float, step_size: float, steps: int,
        start: str = "uniform", gaussian_std: float = 0.001) -> torch.Tensor:
  """Projected sign-gradient ascent on `objective(x_adv).sum()`.

  Args:
    objective: per-example loss `x_adv [B, C, H, W] -> [B]`; the caller puts the model in the
      BatchNorm mode the method attacks in (`model.eval()` or `model.train()`).
    x: clean inputs `[B, C, H, W]` in [0, 1].
    eps: L-inf radius, in [0, 1].
    step_size: per-pixel step.
    steps: number of gradient steps; 0 returns the start point.
    start: 'uniform' (x + U(-eps, eps)), 'gaussian' (x + gaussian_std * N(0, 1)) or 'none' (x),
      drawn from torch's global generator.
    gaussian_std: the standard deviation of the 'gaussian' start.

  Returns:
    `x_adv [B, C, H, W]`, detached, inside the eps-ball around `x` and inside [0, 1].
  """
  x = x.detach()
  if start == "uniform":
    x_adv = x + torch.zeros_like(x).uniform_(-eps, eps)
  elif start == "gaussian":
    x_adv = x + gaussian_std * torch.randn_like(x)
  elif start == "none":
    x_adv = x.clone()
  else:
    raise ValueError(f"unknown start {start!r}; use 'uniform', 'gaussian' or 'none'")
  x_adv = torch.clamp(x_adv, 0.0, 1.0)
  for _ in range(steps):
    x_adv.requires_grad_()
    with torch.enable_grad():
      loss = objective(x_adv).sum()
    grad = torch.autograd.grad(loss, [x_adv])[0]
    x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
  return x_adv.detach()


def cross_entropy_objective(model: torch.nn.Module, labels: torch.Tensor) -> Objective:
  """Untargeted CE of a zoo model (`model(x) -> (logits, features)`): `x_adv -> [B]`."""
  return lambda x_adv: F.cross_entropy(model(x_adv)[0], labels, reduction="none")
