"""Every config file and every variant of its argument loads as `--config` does and validates; the
published recipes are spot-checked against the methods' code (gacd_jax/recipes.py)."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from gacd_jax import config as config_lib
from gacd_jax import errors
from gacd_jax import methods
from gacd_jax import models
from gacd_jax.methods import gacd as gacd_lib
from tests import helpers

CONFIGS = os.path.join(helpers.REPO, "configs")
STUDENTS = ("resnet18", "mobilenet_v2")
STL10_METHODS = ("gacd", "crd", "natural", "pgd_at", "trades")
NUM_CLASSES = {"digits": 10, "mnist5k": 10, "cifar10": 10, "cifar100": 100, "stl10": 10}


def load(spec: str, *overrides: str):
  """`spec` ('cifar10.py:ard,resnet18') loaded by ml_collections' `--config` flag, as the CLI
  does."""
  argv = ["test", f"--config={os.path.join(CONFIGS, spec)}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def _variants():
  for small in ("digits", "mnist5k"):
    yield f"{small}.py"
    for method in methods.names():
      yield f"{small}.py:{method}"
  for dataset in ("cifar10", "cifar100"):
    yield f"{dataset}.py"
    for method in methods.names():
      for student in STUDENTS:
        yield f"{dataset}.py:{method},{student}"
        yield f"{dataset}.py:{student},{method},runlocal"
    for arg in ("teacher", "teacher,pgd_at", "teacher,natural", "teacher,runlocal"):
      yield f"{dataset}.py:{arg}"
  yield "stl10.py"
  for method in STL10_METHODS:
    for student in STUDENTS:
      yield f"stl10.py:{method},{student}"
      yield f"stl10.py:{method},{student},runlocal"


VARIANTS = list(_variants())


def test_every_config_file_is_covered():
  files = {name for name in os.listdir(CONFIGS) if name.endswith(".py")}
  assert files == {spec.split(":")[0] for spec in VARIANTS}


@pytest.mark.parametrize("spec", VARIANTS)
def test_every_variant_loads_and_validates(spec):
  c = load(spec)
  config_lib.validate(c)
  dataset = spec.split(".")[0]
  assert c.data.name == dataset
  student = models.build(c.model.name, NUM_CLASSES[dataset], **config_lib.model_kwargs(c.model))
  method = methods.build(c.method)
  if method.uses_teacher:
    assert c.teacher.model and c.teacher.workdir == ""  # the user points at a teacher
    if dataset in ("digits", "mnist5k"):
      assert c.teacher.model == "small_cnn" and c.model.small_cnn.width == 8
    else:
      assert c.teacher.model == "wrn34_10" != c.model.name
  else:
    assert not c.teacher.model
  runlocal = "runlocal" in spec
  if dataset not in ("digits", "mnist5k"):
    assert (c.attack.eps, c.attack.step_size) == (8 / 255, 2 / 255)
    assert c.attack.steps == (2 if runlocal else 10)
    assert c.optim.schedule == "piecewise" and c.optim.momentum == 0.9
    assert (c.data.num_examples, c.train.batch_size, c.train.epochs) == (
        (256, 32, 1) if runlocal else (0, c.train.batch_size, c.train.epochs))
  if runlocal:
    # negatives are drawn without replacement from the ~230 of 256 examples in other classes
    assert c.method.gacd.num_negatives <= 200 and c.method.crd.num_negatives <= 200
  del student


def test_a_config_keeps_every_methods_switches_and_is_locked():
  c = load("cifar10.py:gacd,resnet18", "--config.method.name=rslad",
           "--config.method.gacd.num_negatives=4096", "--config.teacher.workdir=/t")
  assert (c.method.name, c.method.gacd.num_negatives, c.teacher.workdir) == ("rslad", 4096, "/t")
  with pytest.raises((AttributeError, KeyError), match="lerning_rate"):
    load("cifar10.py:gacd,resnet18", "--config.optim.lerning_rate=0.1")


# ---------------------------------------------------------------------------------------------
# Recipes, spot-checked against each method's code (METHODS.md section 5).


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_ard_recipe(dataset):
  c = load(f"{dataset}.py:ard,mobilenet_v2")
  assert (c.train.epochs, c.optim.milestones, c.optim.lr, c.optim.weight_decay) == (
      200, (100, 150), 0.1, 2e-4)
  assert c.train.batch_size == (128 if dataset == "cifar10" else 256)
  assert c.method.kl_reduction == "mean"
  assert (c.method.ard.temperature, c.method.ard.alpha) == (30.0, 1.0)


@pytest.mark.parametrize("dataset,scale", [("cifar10", 1.0), ("cifar100", 10.0)])
def test_rslad_and_crdnd_recipe(dataset, scale):
  for method in ("rslad", "crdnd"):
    c = load(f"{dataset}.py:{method},resnet18")
    assert (c.train.epochs, c.optim.milestones, c.optim.lr, c.optim.weight_decay) == (
        300, (215, 260, 285), 0.1, 2e-4)
    assert c.train.batch_size == 128 and c.method.kl_reduction == "mean"
    assert c.method[method].adv_weight == pytest.approx(scale * 5 / 6)
    assert c.method[method].clean_weight == pytest.approx(scale * 1 / 6)


def test_trades_teacher_recipe():
  c = load("cifar10.py:teacher")
  assert (c.model.name, c.method.name, c.method.trades.beta) == ("wrn34_10", "trades", 6.0)
  # TRADES counts epochs from 1 and lowers the rate at `epoch >= 75`: our 0-based epoch 74.
  assert (c.train.epochs, c.optim.milestones, c.optim.weight_decay) == (76, (74,), 2e-4)
  c = load("cifar100.py:pgd_at,teacher")
  assert (c.model.name, c.method.name, c.train.epochs, c.optim.milestones) == (
      "wrn34_10", "pgd_at", 200, (100, 150))


def test_adaad_iad_gacd_recipes():
  c10, c100 = load("cifar10.py:adaad,resnet18"), load("cifar100.py:adaad,resnet18")
  assert (c10.method.kl_reduction, c100.method.kl_reduction) == ("mean", "batchmean")
  assert (c10.optim.weight_decay, c10.train.epochs, c10.optim.milestones) == (5e-4, 200, (100, 150))
  c = load("cifar10.py:iad,resnet18")
  assert (c.method.iad.warmup_epochs, c.method.kl_reduction, c.train.epochs) == (
      60, "batchmean", 200)
  c = load("cifar10.py:gacd,resnet18")
  assert (c.train.epochs, c.optim.milestones, c.optim.weight_decay, c.train.batch_size) == (
      200, (100, 150), 2e-4, 128)
  assert (c.method.gacd.num_negatives, c.method.gacd.reweighting) == (16384, "auto")


@pytest.mark.parametrize("method", ["kd", "crd"])
def test_repdistiller_recipe(method):
  resnet, mobilenet = (load(f"cifar100.py:{method},{s}") for s in STUDENTS)
  for c in (resnet, mobilenet):
    assert (c.train.epochs, c.optim.milestones, c.optim.weight_decay, c.train.batch_size) == (
        240, (150, 180, 210), 5e-4, 64)
  # RepDistiller trains MobileNet students with 0.01 instead of 0.05.
  assert (resnet.optim.lr, mobilenet.optim.lr) == (0.05, 0.01)


# ---------------------------------------------------------------------------------------------
# STL-10 transfer and digits.


def test_stl10_is_cross_task_feature_distillation_from_the_cifar10_teacher():
  c = load("stl10.py")
  assert (c.method.name, c.data.image_size, c.teacher.model) == ("gacd", 32, "wrn34_10")
  # Same class count as CIFAR-10 but other classes: 'auto' would reweight, so it is off explicitly.
  assert c.method.gacd.reweighting == "none"
  assert gacd_lib.resolve_reweighting(c.method.gacd.reweighting, 10, 10) == "none"
  assert gacd_lib.resolve_reweighting("auto", 10, 10) == "teacher_prob"
  assert c.method.gacd.num_negatives == c.method.crd.num_negatives == 4096  # < ~4,500 others


@pytest.mark.parametrize("arg", ["ard", "rslad,mobilenet_v2", "iad", "adaad", "kd", "crdnd"])
def test_stl10_refuses_soft_label_methods(arg):
  with pytest.raises(errors.ConfigError, match="class probabilities"):
    load(f"stl10.py:{arg}")


def test_stl10_has_no_teacher_variant_of_its_own():
  with pytest.raises(errors.ConfigError, match="configs/cifar10.py:teacher"):
    load("stl10.py:teacher")


@pytest.mark.parametrize("arg,match", [
    ("gacd,resnet19", "unknown token 'resnet19'"),
    ("gacd,ard", "two methods"),
    ("teacher,ard", "distils from a teacher"),
])
def test_a_bad_argument_is_one_clear_error(arg, match):
  with pytest.raises(errors.ConfigError, match=match):
    load(f"cifar10.py:{arg}")


@pytest.mark.parametrize("dataset,eps,iad_warmup,ard_temperature,no_clean_bn_update",
                         [("digits", 0.15, 9, 30.0, set()),
                          ("mnist5k", 0.3, 6, 5.0, {"rslad", "crdnd"})])
def test_small_data_teachers_and_students(dataset, eps, iad_warmup, ard_temperature,
                                          no_clean_bn_update):
  widths = {m: load(f"{dataset}.py:{m}").model.small_cnn.width for m in methods.names()}
  assert {m for m, w in widths.items() if w == 32} == {"pgd_at", "trades"}
  assert {m for m, w in widths.items() if w == 8} == set(methods.names()) - {"pgd_at", "trades"}
  # Every KL by 'batchmean' on the short schedule (with ARD's 'mean' it ended at 25% clean).
  assert {load(f"{dataset}.py:{m}").method.kl_reduction for m in methods.names()} == {"batchmean"}
  # 60 of IAD's 200 epochs, scaled to the dataset's schedule
  assert load(f"{dataset}.py:iad").method.iad.warmup_epochs == iad_warmup
  ard = load(f"{dataset}.py:ard")
  assert ard.attack.eps == ard.eval.eps == eps and ard.teacher.model == "small_cnn"
  assert ard.method.ard.temperature == ard_temperature  # mnist5k's chosen on validation
  # mnist5k's clean forwards that leave BatchNorm's statistics alone, chosen on validation
  assert {m for m in methods.names()
          if not load(f"{dataset}.py:{m}").method.clean_bn_update} == no_clean_bn_update
  with pytest.raises(errors.ConfigError, match="unknown method"):
    load(f"{dataset}.py:gacdd")


def test_validation_split_needs_a_dataset_that_holds_one():
  config_lib.validate(load("mnist5k.py:ard", "--config.eval.split=validation"))
  with pytest.raises(errors.ConfigError, match="eval.split='validation'.*no validation split"):
    config_lib.validate(load("cifar10.py:ard", "--config.eval.split=validation"))
