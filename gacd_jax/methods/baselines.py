"""Baselines whose public code pins them down exactly (METHODS.md section 5).

`REGISTRY` maps a method name to its factory; `DEFAULTS` holds each method's switches, which
become `config.method.<name>` in every config. Every KL term is reduced by the shared switch
`config.method.kl_reduction`; each docstring says which reduction the method's own code used, so
its loss weights mean what they meant there.

Each docstring also records what was checked against the method's public code and what differs.
Differences common to all: the attack's step size, radius and step count come from
`config.attack`, not from the method; the random start is clipped to [0, 1] before the first step
(the PyTorch code clips only after it); an attack in BatchNorm train mode does not update the
running statistics (the PyTorch code does, at every attack step); and a clean forward the PyTorch
code runs twice in train mode (TRADES, IAD) runs once here: both give the same output, so the loss
and its gradient are unchanged and only one running-statistics update is spared.
"""

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from gacd_jax import errors
from gacd_jax import losses
from gacd_jax.methods.base import Context, InitInfo, Method, PyTree, student_on_clean


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
  clean_bn_update = bool(cfg.get("clean_bn_update", True))

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
      clean_logits, _ = student_on_clean(ctx, clean_bn_update)
      ce = losses.cross_entropy(clean_logits, ctx.batch["label"]).mean()
      total = total + (1.0 - alpha) * ce
      metrics.update(ce=ce, logits_clean=clean_logits)
    return total, metrics, ctx.state

  return Method("ard", loss, objective, attack_start="uniform", attack_bn="train",
                uses_teacher=True)




def trades(cfg: ConfigDict) -> Method:
  """TRADES (Zhang et al. 2019), as `trades.py` and `train_trades_cifar10.py` of yaodongyu/TRADES.

  Attack: maximise KL(p_S(x) || p_S(x')) per example from x + 0.001 N(0, 1), with BatchNorm on its
  running statistics (`model.eval()`) for both x' and the target p_S(x). Loss:
  CE(S(x), y) + beta * KL(p_S(x) || p_S(x')), beta = 6 (their CIFAR-10 default). Their KL is
  `KLDivLoss(size_average=False) / batch_size`, i.e. 'batchmean'.

  Verified in their code: the target p_S(x) of the loss's KL term is *not* detached, so the
  gradient reaches the student through both arguments; it is not detached here either. Their
  CIFAR-10 attack uses eps 0.031 and step 0.007 (ours: `config.attack`).
  """
  beta = float(cfg.trades.beta)
  reduction = cfg.kl_reduction
  clean_bn_update = bool(cfg.get("clean_bn_update", True))

  def objective(ctx: Context):
    # Constant in x', so computed once rather than at every PGD step as their loop does.
    clean_logits, _ = ctx.student(ctx.batch["image"])
    return lambda x: losses.kl_divergence(clean_logits, ctx.student(x)[0])

  def loss(ctx: Context, x_adv: jax.Array):
    clean_logits, _ = student_on_clean(ctx, clean_bn_update)
    adv_logits, _ = ctx.student(x_adv)
    ce = losses.cross_entropy(clean_logits, ctx.batch["label"]).mean()
    kl = losses.reduce_kl(losses.kl_divergence_per_class(clean_logits, adv_logits), reduction)
    metrics = {"ce": ce, "kl": kl, "logits_clean": clean_logits, "logits_adv": adv_logits}
    return ce + beta * kl, metrics, ctx.state

  return Method("trades", loss, objective, attack_start="gaussian", attack_bn="eval")


RSLAD_ATTACK_OBJECTIVES = ("kl", "ce")


def rslad(cfg: ConfigDict) -> Method:
  """RSLAD (Zi et al. 2021), as `rslad_loss.py` and `resnet18_rslad_cifar10.py` of zibojia/RSLAD.

  Attack: maximise KL(p_T(x) || p_S(x')) per example from x + 0.001 N(0, 1), student BatchNorm on
  running statistics (`model.eval()`), the teacher's clean output as the fixed target. Loss:
  adv_weight * KL(p_T(x) || p_S(x')) + clean_weight * KL(p_T(x) || p_S(x)), weights 5/6 and 1/6,
  the student's forward on x' before the one on x as in their code. Their KL is averaged over
  batch x classes ('mean') and adds 1e-5 inside the log of the teacher's probabilities; that shifts
  the value by a constant of the teacher alone and leaves the gradient unchanged, so it is omitted.

  `attack_objective='ce'` (not RSLAD's; a tuning switch of this library) makes the attack
  maximise the student's CE on the labels instead, as PGD-AT's and ARD's do.
  """
  adv_weight = float(cfg.rslad.adv_weight)
  clean_weight = float(cfg.rslad.clean_weight)
  reduction = cfg.kl_reduction
  clean_bn_update = bool(cfg.get("clean_bn_update", True))
  attack_objective = cfg.rslad.attack_objective
  if attack_objective not in RSLAD_ATTACK_OBJECTIVES:
    raise errors.ConfigError(
        f"config.method.rslad.attack_objective={attack_objective!r} is not one of "
        f"{', '.join(RSLAD_ATTACK_OBJECTIVES)}")

  def objective(ctx: Context):
    if attack_objective == "ce":
      return lambda x: losses.cross_entropy(ctx.student(x)[0], ctx.batch["label"])
    teacher_logits, _ = ctx.teacher_clean
    return lambda x: losses.kl_divergence(teacher_logits, ctx.student(x)[0])

  def loss(ctx: Context, x_adv: jax.Array):
    teacher_logits, _ = ctx.teacher_clean
    adv_logits, _ = ctx.student(x_adv)
    clean_logits, _ = student_on_clean(ctx, clean_bn_update)
    kl_adv = losses.reduce_kl(losses.kl_divergence_per_class(teacher_logits, adv_logits), reduction)
    kl_clean = losses.reduce_kl(
        losses.kl_divergence_per_class(teacher_logits, clean_logits), reduction)
    metrics = {"kl_adv": kl_adv, "kl_clean": kl_clean, "logits_adv": adv_logits,
               "logits_clean": clean_logits}
    return adv_weight * kl_adv + clean_weight * kl_clean, metrics, ctx.state

  return Method("rslad", loss, objective, attack_start="gaussian", attack_bn="eval",
                uses_teacher=True)


def iad(cfg: ConfigDict) -> Method:
  """IAD, introspective adversarial distillation (Zhu et al. 2022), as `IAD-I.py` of ZFancy/IAD.

  Attack: as ARD (student CE, BatchNorm in train mode, uniform start). Loss, with w_i =
  p_T(y_i | x'_i)^beta behind stop_gradient (`.item()` in their code):

    alpha * T^2 * KL(p_T(x)/T || p_S(x')/T)
      + [step >= warmup] * alpha * KL_w(p_S(x) || p_S(x'))  with per-example weights 1 - w_i
      + (1 - alpha) * CE(S(x), y)

  Defaults as their argparse: T = 1, alpha = 1, beta = 0.1, warmup = 60 epochs (`--begin`; their
  0-based `epoch >= begin`, so the term is on from step 60 * steps_per_epoch). Verified in their
  code: both KL terms are summed over classes and divided by the batch ('batchmean'); the target
  p_S(x) of the introspection term is *not* detached (kept so here); the teacher term is not
  weighted by w in IAD-I (IAD-II, with a second teacher, weights it by w). The clean forward and the
  teacher's forward on x' run at every step, also before the warmup, as in their code.

  The warmup is counted in steps from `InitInfo.steps_per_epoch` and kept in the method state.
  """
  alpha = float(cfg.iad.alpha)
  temperature = float(cfg.iad.temperature)
  beta = float(cfg.iad.beta)
  warmup_epochs = int(cfg.iad.warmup_epochs)
  reduction = cfg.kl_reduction
  clean_bn_update = bool(cfg.get("clean_bn_update", True))

  def init(rng: jax.Array, info: InitInfo) -> tuple[PyTree, PyTree]:
    del rng
    steps_per_epoch = getattr(info, "steps_per_epoch", None)
    if steps_per_epoch is None:
      raise ValueError(
          "iad starts its introspection term after config.method.iad.warmup_epochs epochs and "
          "needs InitInfo.steps_per_epoch to count them in steps; the training loop must set it")
    return {}, {"introspection_start": jnp.asarray(warmup_epochs * steps_per_epoch, jnp.int32)}

  def objective(ctx: Context):
    return lambda x: losses.cross_entropy(ctx.student(x)[0], ctx.batch["label"])

  def loss(ctx: Context, x_adv: jax.Array):
    labels = ctx.batch["label"]
    teacher_logits, _ = ctx.teacher_clean
    adv_logits, _ = ctx.student(x_adv)
    clean_logits, _ = student_on_clean(ctx, clean_bn_update)
    kl = losses.reduce_kl(
        losses.kl_divergence_per_class(teacher_logits, adv_logits, temperature), reduction)
    # The teacher's confidence in the true label on x': an unreliable teacher hands more of the
    # target to the student's own clean prediction.
    teacher_adv_probs = jax.nn.softmax(ctx.teacher(x_adv)[0].astype(jnp.float32))
    true_prob = jnp.take_along_axis(teacher_adv_probs, labels[:, None], axis=-1)[:, 0]
    weight = jax.lax.stop_gradient(true_prob**beta)
    introspection = losses.reduce_kl(
        (1.0 - weight)[:, None] * losses.kl_divergence_per_class(clean_logits, adv_logits),
        reduction)
    introspection = jnp.where(ctx.step >= ctx.state["introspection_start"], introspection, 0.0)
    ce = losses.cross_entropy(clean_logits, labels).mean()
    total = alpha * temperature**2 * kl + alpha * introspection + (1.0 - alpha) * ce
    metrics = {"kl": kl, "introspection": introspection, "ce": ce,
               "teacher_confidence": weight.mean(), "logits_adv": adv_logits,
               "logits_clean": clean_logits}
    return total, metrics, ctx.state

  return Method("iad", loss, objective, attack_start="uniform", attack_bn="train",
                uses_teacher=True, init=init)


def adaad(cfg: ConfigDict) -> Method:
  """AdaAD (Huang et al. 2023), as `AT_helper.adaad_inner_loss` and `main.py` of boyellow/AdaAD.

  Attack: maximise KL(p_T(x') || p_S(x')) per example, the teacher run on x' too, from
  x + 0.001 N(0, 1) (`random_init=True`), student BatchNorm on running statistics
  (`BN_eval=True`), teacher in eval mode. In their code the input gradient flows through both
  networks; here it does so only if `ctx.teacher` is differentiable in its input (variables frozen,
  outputs not behind stop_gradient), otherwise only the student's side moves x'. Loss:
  alpha * KL(p_T(x') || p_S(x')) + (1 - alpha) * KL(p_T(x) || p_S(x)), alpha = 1 (their
  default; with alpha = 1 the clean forward only moved BatchNorm statistics and is skipped). Their
  CIFAR-10 branch reduces with `nn.KLDivLoss()` ('mean'), the CIFAR-100 branch by the batch
  ('batchmean'). Uncertain: their argparse defaults are eps 16/255 and step 4/255; the paper's
  CIFAR settings are not in the repository.
  """
  alpha = float(cfg.adaad.alpha)
  reduction = cfg.kl_reduction
  clean_bn_update = bool(cfg.get("clean_bn_update", True))

  def objective(ctx: Context):
    return lambda x: losses.kl_divergence(ctx.teacher(x)[0], ctx.student(x)[0])

  def loss(ctx: Context, x_adv: jax.Array):
    metrics = {}
    clean_term = 0.0
    # Clean before adversarial, the order of their forwards.
    if alpha < 1.0:
      teacher_clean_logits, _ = ctx.teacher_clean
      clean_logits, _ = student_on_clean(ctx, clean_bn_update)
      kl_clean = losses.reduce_kl(
          losses.kl_divergence_per_class(teacher_clean_logits, clean_logits), reduction)
      clean_term = (1.0 - alpha) * kl_clean
      metrics.update(kl_clean=kl_clean, logits_clean=clean_logits)
    teacher_adv_logits, _ = ctx.teacher(x_adv)
    adv_logits, _ = ctx.student(x_adv)
    kl = losses.reduce_kl(losses.kl_divergence_per_class(teacher_adv_logits, adv_logits), reduction)
    metrics.update(kl=kl, logits_adv=adv_logits)
    return alpha * kl + clean_term, metrics, ctx.state

  return Method("adaad", loss, objective, attack_start="gaussian", attack_bn="eval",
                uses_teacher=True)


def kd(cfg: ConfigDict) -> Method:
  """Hinton knowledge distillation on clean inputs, no attack.

  Loss: alpha * T^2 * KL(p_T(x)/T || p_S(x)/T) + (1 - alpha) * CE(S(x), y). Defaults T = 4,
  alpha = 0.9: the KD setup of RepDistiller (HobbitLong/RepDistiller, the CRD reference code:
  `--kd_T 4`, run with `-r 0.1 -a 0.9`), whose `DistillKL` reduces by the batch ('batchmean')
  and multiplies by T^2 itself.
  """
  alpha = float(cfg.kd.alpha)
  temperature = float(cfg.kd.temperature)
  reduction = cfg.kl_reduction

  def loss(ctx: Context, x_adv):
    del x_adv
    teacher_logits, _ = ctx.teacher_clean
    logits, _ = ctx.student(ctx.batch["image"])
    kl = losses.reduce_kl(
        losses.kl_divergence_per_class(teacher_logits, logits, temperature), reduction)
    ce = losses.cross_entropy(logits, ctx.batch["label"]).mean()
    total = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    return total, {"kl": kl, "ce": ce, "logits_clean": logits}, ctx.state

  return Method("kd", loss, uses_teacher=True)


REGISTRY = {"natural": natural, "pgd_at": pgd_at, "ard": ard, "trades": trades, "rslad": rslad,
            "iad": iad, "adaad": adaad, "kd": kd}
DEFAULTS = {
    "ard": {"alpha": 1.0, "temperature": 30.0},
    "trades": {"beta": 6.0},
    "rslad": {"adv_weight": 5 / 6, "clean_weight": 1 / 6, "attack_objective": "kl"},
    "iad": {"alpha": 1.0, "temperature": 1.0, "beta": 0.1, "warmup_epochs": 60},
    "adaad": {"alpha": 1.0},
    "kd": {"alpha": 0.9, "temperature": 4.0},
}
