"""Any method on scikit-learn's bundled digits with a small CNN (seconds to minutes on a CPU).

  gacd-jax train --config configs/digits.py:pgd_at --workdir runs/teacher
  gacd-jax train --config configs/digits.py:ard --workdir runs/ard \
      --config.teacher.workdir=runs/teacher
  gacd-jax evaluate --config configs/digits.py:ard --workdir runs/ard

The argument after ':' is the method name (default pgd_at): natural, pgd_at, trades, ard, rslad,
iad, adaad, kd, gacd, crd or crdnd. pgd_at and trades train teachers, small_cnn of width 32; every
other method trains a student of width 8 (natural as the undefended reference), and those that
distil expect a small_cnn teacher (`config.teacher.model`), e.g. the pgd_at run above.

Each method keeps the loss conventions of its code, as in the CIFAR configs (`gacd_jax/recipes.py`):
the KL reduction ('mean' over batch x classes for ARD, RSLAD, AdaAD, CRDND). Scaled to digits: the
schedule is `demo.digits_config`'s (30 epochs, cosine, eps 0.15); IAD's introspection term starts
after 9 of the 30 epochs (60 of 200 in its recipe); GACD and CRD draw 1024 negatives, fewer than
the ~1,290 training examples of other classes, so they are drawn without replacement as CRD does.
"""

from gacd_jax import demo
from gacd_jax import errors
from gacd_jax import methods
from gacd_jax import recipes

EPOCHS = 30
TEACHER_WIDTH, STUDENT_WIDTH = 32, 8
TEACHER_METHODS = ("pgd_at", "trades")
NUM_NEGATIVES = 1024


def get_config(method: str = "pgd_at"):
  method = method or "pgd_at"
  if method not in methods.names():
    raise errors.ConfigError(f"unknown method {method!r} in configs/digits.py:{method}; known "
                             f"methods: {', '.join(methods.names())}")
  teacher = method in TEACHER_METHODS
  c = demo.digits_config(method, width=TEACHER_WIDTH if teacher else STUDENT_WIDTH, epochs=EPOCHS)
  c.method.kl_reduction = recipes.RECIPES[method].kl_reduction
  if recipes.uses_teacher(c.method):
    c.teacher.model = "small_cnn"
  iad = recipes.RECIPES["iad"]
  c.method.iad.warmup_epochs = round(c.method.iad.warmup_epochs * EPOCHS / iad.epochs)
  c.method.gacd.num_negatives = NUM_NEGATIVES
  c.method.crd.num_negatives = NUM_NEGATIVES
  return c
