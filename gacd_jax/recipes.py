"""Each method's published training recipe, the config builder shared by the CIFAR and STL-10
configs, and the small-data settings of the bundled datasets (digits, mnist5k).

The config files in `configs/` (`cifar10.py`, `cifar100.py`, `stl10.py`, `digits.py`,
`mnist5k.py`) build on it; it lives in the library so they can import it.

The recipes (CIFAR-10, from each method's public code; METHODS.md sections 3 and 5). SGD with
momentum 0.9, the learning rate times 0.1 at each milestone. Epochs count from 0 here: milestone m
lowers the rate from the (m + 1)-th epoch on, so a script that counts from 1 and tests
`epoch >= 75` (TRADES) has milestone 74 here.

  method  epochs  milestones       lr     wd     batch  KL reduction  source
  natural  200    100, 150         0.1    5e-4   128    -             common practice (no paper)
  pgd_at   200    100, 150         0.1    2e-4   128    -             MadryLab/cifar10_challenge:
                                                                      80k steps of 128 (~205
                                                                      epochs), x0.1 at 40k, 60k
  trades    76    74               0.1    2e-4   128    batchmean     yaodongyu/TRADES
  ard      200    100, 150         0.1    2e-4   128    mean          goldblum/AdversariallyRobust-
                                                                      Distillation main.py
  rslad    300    215, 260, 285    0.1    2e-4   128    mean          zibojia/RSLAD
  iad      200    100, 150         0.1    2e-4   128    batchmean     ZFancy/IAD IAD-I.py
  adaad    200    100, 150         0.1    5e-4   128    mean          boyellow/AdaAD main.py
  kd       240    150, 180, 210    0.05   5e-4    64    batchmean     HobbitLong/RepDistiller
  crd      240    150, 180, 210    0.05   5e-4    64    -             HobbitLong/RepDistiller
  gacd     200    100, 150         0.1    2e-4   128    -             METHODS.md section 3
  crdnd    300    215, 260, 285    0.1    2e-4   128    mean          RSLAD's (CRDND is its frame)

What changes elsewhere, as in the same code:
  * CIFAR-100: ARD's batch is 256; AdaAD reduces its KL by the batch ('batchmean'); RSLAD (and so
    CRDND) multiplies its 'mean' KL terms by 10 "to keep consistent with CIFAR-10", done here by
    scaling `method.rslad.{adv,clean}_weight` (and CRDND's) by 10.
  * RepDistiller trains MobileNet students (KD, CRD) with lr 0.01 instead of 0.05.
  * Every training attack is L-inf PGD, eps 8/255, step 2/255, 10 steps (the defaults of
    `gacd_jax.config.default()`); start and BatchNorm mode are the method's own.
  * The KL reduction of ARD, RSLAD, AdaAD (CIFAR-10) and CRDND is 'mean' over batch x classes, as
    their `nn.KLDivLoss()` / `torch.mean`, so their loss weights mean what they meant there. CRDND
    has no public code: it follows RSLAD, whose frame it extends (a judgement call; its InfoNCE
    weight 1 is reconstructed either way).
  * STL-10 (5,000 labelled images) uses the CIFAR-10 recipe of the method: no paper publishes its
    own.
  * A method added with `gacd_jax.methods.register` has no published recipe: it gets
    `FALLBACK_RECIPE`, the schedule PGD-AT, ARD, IAD and GACD share (200 epochs, x0.1 at 100 and
    150, lr 0.1, wd 2e-4, batch 128, 'batchmean'), and a log line says so. Override any of it on
    the command line (`--config.train.epochs=...`).

A config argument is a comma-separated list of tokens in any order, e.g.
`ard,mobilenet_v2,runlocal`:
  a method name      the method (default gacd)
  a model name       the student's architecture (default resnet18), any of `gacd_jax.models.names()`
  teacher            the robust teacher itself: wrn34_10 with TRADES (or with pgd_at / natural if
                     named); no distillation method
  runlocal           everything shrunk for a laptop smoke run: 256 examples, batch 32, one epoch,
                     2-step attacks, 64 evaluation examples. It still reads the real dataset.
"""

from typing import NamedTuple, Optional

from absl import logging
from ml_collections import ConfigDict

from gacd_jax import config as config_lib
from gacd_jax import errors
from gacd_jax import methods
from gacd_jax import models


class Recipe(NamedTuple):
  epochs: int
  milestones: tuple[int, ...]
  lr: float
  weight_decay: float
  batch_size: int
  kl_reduction: str = "batchmean"


RECIPES = {
    "natural": Recipe(200, (100, 150), 0.1, 5e-4, 128),
    "pgd_at": Recipe(200, (100, 150), 0.1, 2e-4, 128),
    "trades": Recipe(76, (74,), 0.1, 2e-4, 128),
    "ard": Recipe(200, (100, 150), 0.1, 2e-4, 128, "mean"),
    "rslad": Recipe(300, (215, 260, 285), 0.1, 2e-4, 128, "mean"),
    "iad": Recipe(200, (100, 150), 0.1, 2e-4, 128),
    "adaad": Recipe(200, (100, 150), 0.1, 5e-4, 128, "mean"),
    "kd": Recipe(240, (150, 180, 210), 0.05, 5e-4, 64),
    "crd": Recipe(240, (150, 180, 210), 0.05, 5e-4, 64),
    "gacd": Recipe(200, (100, 150), 0.1, 2e-4, 128),
    "crdnd": Recipe(300, (215, 260, 285), 0.1, 2e-4, 128, "mean"),
}

# The recipe of a registered method that `RECIPES` does not know (see the module docstring).
FALLBACK_RECIPE = RECIPES["pgd_at"]

TEACHER_MODEL = "wrn34_10"
# Methods a 'teacher' variant may train: those that need no teacher themselves.
TEACHER_METHODS = ("trades", "pgd_at", "natural")
# RSLAD's CIFAR-100 code multiplies its 'mean' KL terms by this.
_RSLAD_CIFAR100_SCALE = 10.0


def recipe(method: str, dataset: str, model: str) -> Recipe:
  """The recipe of `method` for a `model` student on `dataset` (see the module docstring);
  `FALLBACK_RECIPE` for a registered method without a published one."""
  if method not in RECIPES:
    if method not in methods.names():
      raise errors.ConfigError(f"unknown method {method!r}; known methods: "
                               f"{', '.join(methods.names())}")
    logging.info("method %r has no published recipe in gacd_jax.recipes; training it with "
                 "FALLBACK_RECIPE %s", method, FALLBACK_RECIPE)
    return FALLBACK_RECIPE
  r = RECIPES[method]
  if dataset == "cifar100":
    if method == "ard":
      r = r._replace(batch_size=256)
    if method == "adaad":
      r = r._replace(kl_reduction="batchmean")
  if method in ("kd", "crd") and model == "mobilenet_v2":
    r = r._replace(lr=0.01)
  return r


class Variant(NamedTuple):
  method: str
  model: str
  teacher: bool
  runlocal: bool


def parse_arg(arg: Optional[str], *, default_method: str = "gacd",
              default_model: str = "resnet18") -> Variant:
  """The variant named by a config argument such as 'ard,mobilenet_v2,runlocal'."""
  method = model = None
  teacher = runlocal = False
  for token in (t.strip() for t in (arg or "").split(",")):
    if not token:
      continue
    if token == "runlocal":
      runlocal = True
    elif token == "teacher":
      teacher = True
    elif token in methods.names():
      if method is not None:
        raise errors.ConfigError(f"the config argument {arg!r} names two methods, {method} and "
                                 f"{token}; name one")
      method = token
    elif token in models.names():
      if model is not None:
        raise errors.ConfigError(f"the config argument {arg!r} names two models, {model} and "
                                 f"{token}; name one")
      model = token
    else:
      raise errors.ConfigError(
          f"unknown token {token!r} in the config argument {arg!r}; use a method "
          f"({', '.join(methods.names())}), a model ({', '.join(models.names())}), 'teacher' or "
          "'runlocal', separated by commas")
  if teacher:
    method = method or TEACHER_METHODS[0]
    model = model or TEACHER_MODEL
    if method not in TEACHER_METHODS:
      raise errors.ConfigError(
          f"'teacher' trains the teacher itself with one of {', '.join(TEACHER_METHODS)}, not "
          f"with {method!r}, which distils from a teacher")
  return Variant(method or default_method, model or default_model, teacher, runlocal)


def uses_teacher(method_config: ConfigDict) -> bool:
  return methods.build(method_config).uses_teacher


def student_config(dataset: str, arg: Optional[str], *, image_size: int = 0,
                   allowed_methods: Optional[tuple[str, ...]] = None, why_not: str = "",
                   teacher_config: Optional[str] = None) -> ConfigDict:
  """A config for the variant `arg` names on `dataset` (cifar10, cifar100 or stl10), with its method's recipe.

  Args:
    dataset: 'cifar10', 'cifar100' or 'stl10'.
    arg: the config argument (see the module docstring).
    image_size: resize the images to this side; 0 keeps the dataset's own.
    allowed_methods: the methods this dataset's config accepts; None for all.
    why_not: the reason given for a method outside `allowed_methods`.
    teacher_config: if set, the 'teacher' variant is refused and this config named instead (the
      teacher is trained on another dataset).
  """
  variant = parse_arg(arg)
  if variant.teacher and teacher_config:
    raise errors.ConfigError(
        f"the teacher of the {dataset} students is not trained on {dataset}: train it with "
        f"{teacher_config} (or import one) and pass --config.teacher.workdir")
  if allowed_methods is not None and variant.method not in allowed_methods:
    raise errors.ConfigError(
        f"method {variant.method!r} is not offered on {dataset}: {why_not} Use one of "
        f"{', '.join(allowed_methods)}")
  r = recipe(variant.method, dataset, variant.model)
  c = config_lib.default()
  c.data.name = dataset
  c.data.image_size = image_size
  c.model.name = variant.model
  c.method.name = variant.method
  c.method.kl_reduction = r.kl_reduction
  if dataset == "cifar100":
    for name in ("rslad", "crdnd"):
      c.method[name].adv_weight *= _RSLAD_CIFAR100_SCALE
      c.method[name].clean_weight *= _RSLAD_CIFAR100_SCALE
  if uses_teacher(c.method):
    c.teacher.model = TEACHER_MODEL
    c.teacher.workdir = ""  # set on the command line: --config.teacher.workdir=DIR
  c.optim.lr = r.lr
  c.optim.weight_decay = r.weight_decay
  c.optim.schedule = "piecewise"
  c.optim.milestones = r.milestones
  c.train.batch_size = r.batch_size
  c.train.epochs = r.epochs
  if variant.runlocal:
    shrink_for_laptop(c)
  return c


def shrink_for_laptop(c: ConfigDict) -> None:
  """The 'runlocal' variant: the same pipeline on 256 examples, one epoch, short attacks."""
  c.data.num_examples = 256
  c.train.batch_size = 32
  c.train.epochs = 1
  c.train.log_every = 2
  c.train.checkpoint_every = 8
  c.attack.steps = 2
  for name in ("gacd", "crd"):
    # Fewer negatives than the ~230 examples of other classes among 256.
    c.method[name].num_negatives = 64
  c.eval.batch_size = 64
  c.eval.max_examples = 64
  c.eval.pgd_steps = 2
  c.eval.cw_steps = 2
  c.eval.eps_curve = (0.0, 8 / 255)


# ---------------------------------------------------------------------------------------------
# The bundled datasets: minutes on a CPU, one schedule for every method.


class SmallData(NamedTuple):
  """How a bundled dataset is trained and attacked (the same for every method on it)."""
  image_size: int
  eps: float           # Linf budget of the training attack and of evaluation
  crop_padding: int    # random-shift augmentation, in pixels
  epochs: int
  batch_size: int
  lr: float            # SGD, momentum 0.9, cosine decay
  weight_decay: float
  teacher_width: int   # small_cnn widths
  student_width: int
  num_negatives: int   # GACD's and CRD's, below the examples of other classes
  eps_warmup_epochs: int = 0  # the training attack's eps grows linearly over these epochs
  ard_temperature: Optional[float] = None  # None: ARD's own (30)
  # Methods whose clean forward leaves BatchNorm's running statistics alone
  # (config.method.clean_bn_update = False); every other method updates them as its code does.
  no_clean_bn_update: tuple[str, ...] = ()


SMALL_DATA = {
    # 8x8 digits with 17 grey levels: the field's 8/255 is below one level, so eps is larger; a
    # 4-px shift would move a digit half off the image.
    "digits": SmallData(image_size=8, eps=0.15, crop_padding=1, epochs=30, batch_size=64,
                        lr=0.05, weight_decay=5e-4, teacher_width=32, student_width=8,
                        num_negatives=1024),
    # 28x28 MNIST digits: the field's MNIST threat model, Linf 0.3 (TRADES, Madry et al.). At
    # the full eps from the first step a PGD-AT small_cnn stayed at chance (loss 2.33 after 2
    # epochs), so eps grows over the first 5 epochs. ARD at T = 30 nearly matches these
    # teachers' logits, too weak a signal for a width-8 student at eps 0.3: one seed of three
    # collapsed (26.4% clean, 0.4% AutoAttack 'fast' on validation); T = 5, chosen on the
    # validation split, is at least as robust on every seed (AutoAttack 16.4 / 17.4 / 17.4
    # against 13.6 / 16.2 / 0.4; experiments/results/mnist5k_ard_temperature.md). RSLAD and
    # CRDND forward the clean batch in train mode besides x' (as their code does), so the running
    # statistics average clean and adversarial activations, which differ a lot at eps 0.3; without
    # the clean forward's update, chosen on the validation split, RSLAD's AutoAttack accuracy rose
    # from 6.7 to 20.5 and CRDND's from 2.6 to 27.6 (experiments/results/mnist5k_clean_bn.md).
    "mnist5k": SmallData(image_size=28, eps=0.3, crop_padding=2, epochs=20, batch_size=64,
                         lr=0.05, weight_decay=5e-4, teacher_width=32, student_width=8,
                         num_negatives=2048, eps_warmup_epochs=5, ard_temperature=5.0,
                         no_clean_bn_update=("rslad", "crdnd")),
}
# Methods that train teachers on the bundled datasets (wide small_cnn); every other method trains
# a narrow student.
SMALL_TEACHER_METHODS = ("pgd_at", "trades")


def small_config(dataset: str, method: str, *, width: int, epochs: int = 0,
                 teacher_workdir: str = "", teacher_model: str = "") -> ConfigDict:
  """A config for `method` on a bundled dataset ('digits' or 'mnist5k') with a `small_cnn` of
  `width` channels, on `SMALL_DATA[dataset]`'s schedule (`epochs`: 0 keeps it)."""
  d = SMALL_DATA[dataset]
  c = config_lib.default()
  c.data.name = dataset
  c.data.image_size = d.image_size
  c.data.channels = 1
  c.data.crop_padding = d.crop_padding
  c.data.flip = False       # mirrored digits are other digits
  c.model.name = "small_cnn"
  c.model.small_cnn.width = width
  c.method.name = method
  c.method.gacd.num_negatives = 256
  c.method.crd.num_negatives = 256
  c.teacher.workdir = teacher_workdir
  c.teacher.model = teacher_model
  c.attack.eps = d.eps
  c.attack.step_size = d.eps / 4
  c.attack.steps = 10
  c.attack.eps_warmup_epochs = d.eps_warmup_epochs
  c.optim.lr = d.lr
  c.optim.weight_decay = d.weight_decay
  c.optim.schedule = "cosine"
  c.train.batch_size = d.batch_size
  c.train.epochs = epochs or d.epochs
  c.train.log_every = 20
  c.train.checkpoint_every = 500
  c.eval.eps = d.eps
  c.eval.pgd_step_size = d.eps / 8
  c.eval.cw_step_size = d.eps / 8
  c.eval.batch_size = 128
  c.eval.eps_curve = tuple(round(d.eps * k / 3, 4) for k in range(6))
  return c


def small_method_config(dataset: str, method: str) -> ConfigDict:
  """What `configs/digits.py:METHOD` and `configs/mnist5k.py:METHOD` train (their docstrings say
  how and why it departs from the CIFAR recipe)."""
  if method not in methods.names():
    raise errors.ConfigError(f"unknown method {method!r} in configs/{dataset}.py:{method}; known "
                             f"methods: {', '.join(methods.names())}")
  d = SMALL_DATA[dataset]
  teacher = method in SMALL_TEACHER_METHODS
  c = small_config(dataset, method, width=d.teacher_width if teacher else d.student_width)
  # 'batchmean' for every method, also those whose CIFAR code averages over batch x classes
  # ('mean'): that divides the KL by the class count, and with ARD's T = 30 the signal is then
  # too weak for a schedule of tens of epochs (ARD ended at 25% clean).
  c.method.kl_reduction = "batchmean"
  if uses_teacher(c.method):
    c.teacher.model = "small_cnn"
  c.method.iad.warmup_epochs = round(c.method.iad.warmup_epochs * d.epochs / RECIPES["iad"].epochs)
  c.method.gacd.num_negatives = d.num_negatives
  c.method.crd.num_negatives = d.num_negatives
  if d.ard_temperature is not None:
    c.method.ard.temperature = d.ard_temperature
  if method in d.no_clean_bn_update:
    c.method.clean_bn_update = False
  return c
