"""Any method on scikit-learn's bundled digits with a small CNN (seconds to minutes on a CPU).

  gacd-jax train --config configs/digits.py:pgd_at --workdir runs/teacher
  gacd-jax train --config configs/digits.py:ard --workdir runs/ard \
      --config.teacher.workdir=runs/teacher
  gacd-jax evaluate --config configs/digits.py:ard --workdir runs/ard
  gacd-jax evaluate --config configs/digits.py:ard --workdir runs/ard --config.eval.split=validation

The argument after ':' is the method name (default pgd_at): natural, pgd_at, trades, ard, rslad,
iad, adaad, kd, gacd, crd or crdnd. pgd_at and trades train teachers, small_cnn of width 32; every
other method trains a student of width 8 (natural as the undefended reference), and those that
distil expect a small_cnn teacher (`config.teacher.model`), e.g. the pgd_at run above.

Data: 1,264 training, 178 validation and 355 test digits (8x8, a fixed stratified split,
`gacd_jax.data`). Every method has the same schedule, `recipes.SMALL_DATA['digits']`: 30 epochs,
batch 64, SGD 0.05 with cosine decay, weight decay 5e-4, training attack Linf eps 0.15 in 10 steps
of eps/4 (each method's own start, BatchNorm mode and objective). How this departs from the CIFAR
recipes (`gacd_jax/recipes.py`), and why:
  * the schedule above instead of each method's 76-300 epochs with step decay: minutes, not days;
  * every KL is reduced by 'batchmean' (sum over classes, mean over the batch), also for ARD,
    RSLAD, AdaAD and CRDND, whose code averages over batch x classes ('mean'). 'mean' is
    'batchmean' / 10 here; with ARD's T = 30 the signal was then too weak for 30 epochs (ARD ended
    at 25% clean accuracy). Their loss weights keep their published values;
  * IAD's introspection term starts after 9 of the 30 epochs (60 of 200 in its recipe);
  * GACD and CRD draw 1024 negatives, fewer than the ~1,130 training examples of other classes,
    so they are drawn without replacement as CRD does.
"""

from gacd_jax import recipes


def get_config(method: str = "pgd_at"):
  return recipes.small_method_config("digits", method or "pgd_at")
