"""CIFAR-10: ResNet-18 and MobileNetV2 students from a robust WRN-34-10 teacher, every method with
its paper's recipe (the table in `gacd_jax/recipes.py`).

The argument after ':' is a comma-separated list: a method (default gacd), a student architecture
(default resnet18; mobilenet_v2 for the other student), 'teacher' for the teacher itself, and
'runlocal' to shrink everything for a laptop. The data is read from `--config.data.data_dir=DIR`:
the official python or binary batches, class folders of images, an .npz or a tfds array_record
build, found there by `--config.data.format=auto` (`gacd_jax/data_files.py`).

  # The teacher: TRADES' published WRN-34-10 (model_cifar_wrn.pt from yaodongyu/TRADES) ...
  gacd-jax import-teacher --arch wrn34_10 --torch_checkpoint model_cifar_wrn.pt \
      --out runs/cifar10/teacher
  # ... or trained here with TRADES' recipe (or PGD-AT's: `teacher,pgd_at`)
  gacd-jax train --config configs/cifar10.py:teacher --workdir runs/cifar10/teacher

  # Students (any method: natural pgd_at trades ard rslad iad adaad kd gacd crd crdnd)
  gacd-jax train --config configs/cifar10.py:gacd,resnet18 --workdir runs/cifar10/gacd_resnet18 \
      --config.teacher.workdir=runs/cifar10/teacher
  gacd-jax train --config configs/cifar10.py:ard,mobilenet_v2 \
      --workdir runs/cifar10/ard_mobilenet_v2 --config.teacher.workdir=runs/cifar10/teacher
  gacd-jax evaluate --config configs/cifar10.py:ard,mobilenet_v2 \
      --workdir runs/cifar10/ard_mobilenet_v2

  # A laptop smoke run of the same pipeline (256 examples, one epoch, 2-step attacks)
  gacd-jax train --config configs/cifar10.py:rslad,resnet18,runlocal --workdir /tmp/rslad \
      --config.teacher.workdir=runs/cifar10/teacher
"""

from gacd_jax import recipes


def get_config(arg: str = "gacd,resnet18"):
  return recipes.student_config("cifar10", arg)
