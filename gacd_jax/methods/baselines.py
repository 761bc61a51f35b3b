"""Baselines whose public code pins them down exactly (METHODS.md section 5).

`REGISTRY` maps a method name to its factory; `DEFAULTS` holds each method's switches, which
become `config.method.<name>` in every config.
"""

import jax
from ml_collections import ConfigDict

from gacd_jax import losses
from gacd_jax.methods.base import Context, Method


def natural(cfg: ConfigDict) -> Method:
  """Natural training: CE on clean inputs, no attack."""
  del cfg

  def loss(ctx: Context, x_adv):
    del x_adv
    logits, _ = ctx.student(ctx.batch["image"])
    ce = losses.cross_entropy(logits, ctx.batch["label"]).mean()
    return ce, {"ce": ce, "logits_clean": logits}, ctx.state

  return Method("natural", loss)


def pgd_at(cfg: ConfigDict) -> Method:
  """PGD adversarial training (Madry et al. 2018): CE on PGD examples that maximise CE."""
  del cfg

  def objective(ctx: Context):
    return lambda x: losses.cross_entropy(ctx.student(x)[0], ctx.batch["label"])

  def loss(ctx: Context, x_adv: jax.Array):
    logits, _ = ctx.student(x_adv)
    ce = losses.cross_entropy(logits, ctx.batch["label"]).mean()
    return ce, {"ce_adv": ce, "logits_adv": logits}, ctx.state

  return Method("pgd_at", loss, objective, attack_start="uniform", attack_bn="eval")


def ard(cfg: ConfigDict) -> Method:
  """ARD (Goldblum et al. 2020).

  Attack: CE of the student with BatchNorm in train mode, uniform start. Loss:
  alpha * T^2 * KL(p_T(x)/T || p_S(x')/T) + (1 - alpha) * CE(S(x), y). Defaults T = 30, alpha = 1.
  """
  alpha = float(cfg.ard.alpha)
  temperature = float(cfg.ard.temperature)
  reduction = cfg.kl_reduction

  def objective(ctx: Context):
    return lambda x: losses.cross_entropy(ctx.student(x)[0], ctx.batch["label"])

  def loss(ctx: Context, x_adv: jax.Array):
    teacher_logits, _ = ctx.teacher_clean
    adv_logits, _ = ctx.student(x_adv)
    kl = losses.reduce_kl(
        losses.kl_divergence_per_class(teacher_logits, adv_logits, temperature), reduction)
    total = alpha * temperature**2 * kl
    metrics = {"kl": kl, "logits_adv": adv_logits}
    # With alpha = 1 the clean term has weight 0 and its forward is skipped (ARD's code runs it,
    # which only moves the BatchNorm running statistics).
    if alpha < 1.0:
      clean_logits, _ = ctx.student(ctx.batch["image"])
      ce = losses.cross_entropy(clean_logits, ctx.batch["label"]).mean()
      total = total + (1.0 - alpha) * ce
      metrics.update(ce=ce, logits_clean=clean_logits)
    return total, metrics, ctx.state

  return Method("ard", loss, objective, attack_start="uniform", attack_bn="train",
                uses_teacher=True)


REGISTRY = {"natural": natural, "pgd_at": pgd_at, "ard": ard}
DEFAULTS = {"ard": {"alpha": 1.0, "temperature": 30.0}}
