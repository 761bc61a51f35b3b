"""CIFAR-100: ResNet-18 and MobileNetV2 students from a robust WRN-34-10 teacher of 100 classes,
every method with its paper's recipe (the table in `gacd_jax/recipes.py`; on CIFAR-100 ARD's batch
is 256, AdaAD's KL is reduced by the batch, and RSLAD's and CRDND's KL weights are 10x, as their
code).

The argument after ':' is a comma-separated list: a method (default gacd), a student architecture
(default resnet18; mobilenet_v2 for the other student), 'teacher' for the teacher itself, and
'runlocal' to shrink everything for a laptop. The data is read from `--config.data.data_dir=DIR`
(the official python or binary files, class folders, an .npz or a tfds array_record build;
`gacd_jax/data_files.py`).

  # The teacher: a converted PyTorch WRN-34-10 of 100 classes ...
  gacd-jax import-teacher --arch wrn34_10 --num_classes 100 --torch_checkpoint TEACHER.pt \
      --out runs/cifar100/teacher
  # ... or trained here with TRADES' recipe (or PGD-AT's: `teacher,pgd_at`)
  gacd-jax train --config configs/cifar100.py:teacher --workdir runs/cifar100/teacher

  # Students (any method: natural pgd_at trades ard rslad iad adaad kd gacd crd crdnd)
  gacd-jax train --config configs/cifar100.py:gacd,resnet18 \
      --workdir runs/cifar100/gacd_resnet18 --config.teacher.workdir=runs/cifar100/teacher
  gacd-jax train --config configs/cifar100.py:rslad,mobilenet_v2 \
      --workdir runs/cifar100/rslad_mobilenet_v2 --config.teacher.workdir=runs/cifar100/teacher
  gacd-jax evaluate --config configs/cifar100.py:rslad,mobilenet_v2 \
      --workdir runs/cifar100/rslad_mobilenet_v2

  # A laptop smoke run of the same pipeline (256 examples, one epoch, 2-step attacks)
  gacd-jax train --config configs/cifar100.py:ard,mobilenet_v2,runlocal --workdir /tmp/ard \
      --config.teacher.workdir=runs/cifar100/teacher
"""

from gacd_jax import recipes


def get_config(arg: str = "gacd,resnet18"):
  return recipes.student_config("cifar100", arg)
