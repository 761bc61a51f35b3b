"""Cross-task transfer to STL-10: a student trained on STL-10 (its 5,000 labelled images resized to
32x32) with the features of the robust WRN-34-10 CIFAR-10 teacher (`configs/cifar10.py:teacher`,
or TRADES' imported one).

Only methods that use the teacher's *features* are offered: gacd and crd. STL-10 and CIFAR-10 both
have 10 classes, but not the same ones in the same order (STL-10 has monkey where CIFAR-10 has frog,
and the shared classes sit at other indices), so the teacher's probabilities say nothing about an
STL-10 label: soft-label methods (ard, rslad, iad, adaad, kd, crdnd) are refused, and GACD's sample
reweighting is set to 'none' explicitly (its 'auto' would turn reweighting on, since the class
counts match). Natural, PGD-AT and TRADES students (no teacher) are the reference points. Each
method uses its CIFAR-10 recipe (`gacd_jax/recipes.py`); the contrastive methods draw 4096 negatives
instead of 16384, fewer than the ~4,500 examples of other classes, so they are drawn without
replacement as CRD does.

The argument after ':' is a comma-separated list: a method (default gacd), a student architecture
(default resnet18; mobilenet_v2 for the other student), and 'runlocal' to shrink everything for a
laptop. The data is read from `--config.data.data_dir=DIR` (the official stl10_binary files,
class folders, an .npz or a tfds array_record build; `gacd_jax/data_files.py`).

  gacd-jax train --config configs/stl10.py:gacd,resnet18 --workdir runs/stl10/gacd_resnet18 \
      --config.teacher.workdir=runs/cifar10/teacher
  gacd-jax train --config configs/stl10.py:crd,mobilenet_v2 --workdir runs/stl10/crd_mobilenet_v2 \
      --config.teacher.workdir=runs/cifar10/teacher
  gacd-jax train --config configs/stl10.py:pgd_at,resnet18 --workdir runs/stl10/pgd_at_resnet18
  gacd-jax evaluate --config configs/stl10.py:gacd,resnet18 --workdir runs/stl10/gacd_resnet18
"""

from gacd_jax import recipes
from gacd_jax.methods import gacd as gacd_lib

# Methods that need only the teacher's features, and those without a teacher.
METHODS = ("gacd", "crd", "natural", "pgd_at", "trades")
NUM_NEGATIVES = 4096


def get_config(arg: str = "gacd,resnet18"):
  c = recipes.student_config(
      "stl10", arg, image_size=32, allowed_methods=METHODS,
      why_not="the CIFAR-10 teacher's class probabilities do not describe STL-10's classes, so "
      "only feature-based distillation transfers across the task.",
      teacher_config="configs/cifar10.py:teacher")
  # Cross-task: no teacher probability of an STL-10 label exists, although both have 10 classes,
  # so GACD uses the teacher's features only (no KL attack or term, no reweighting).
  gacd_lib.make_feature_only(c.method.gacd)
  if not recipes.parse_arg(arg).runlocal:  # runlocal sets its own
    c.method.gacd.num_negatives = NUM_NEGATIVES
    c.method.crd.num_negatives = NUM_NEGATIVES
  return c
