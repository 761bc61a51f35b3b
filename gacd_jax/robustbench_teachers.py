"""RobustBench models as teachers: which architecture each name is, and importing its weights.

`import_teacher(name, checkpoint, out_dir, dataset=...)` turns the PyTorch weights of a RobustBench
model-zoo entry into a teacher run, as `gacd-jax import-teacher --robustbench NAME
--torch_checkpoint FILE --out DIR` does: it picks the architecture, depth, width, activation,
input normalisation and number of classes from the table below, unwraps the checkpoint as
RobustBench's own loader does, and refuses weights whose keys or shapes do not fit, listing them.
Nothing is downloaded: the user brings the file (the one RobustBench's `load_model` saves under
`models/<dataset>/Linf/<name>.pt`).

The table covers every CIFAR-10 and CIFAR-100 Linf entry of robustbench 1.1.1
(`robustbench/model_zoo/cifar10.py` and `cifar100.py`) built from WideResNet, DMWideResNet,
DMPreActResNet, PreActResNet-18 or ResNet-18 with at most a fixed mean/std normalisation; the
entries' facts are copied from those files (tests/test_robustbench.py compares them).
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, NamedTuple

from gacd_jax import errors
from gacd_jax import torch_convert

ROBUSTBENCH_VERSION = '1.1.1'
DATASETS = {'cifar10': 10, 'cifar100': 100}  # name -> number of classes
IMAGE_SHAPE = (32, 32, 3)

_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))  # dm_wide_resnet.CIFAR10_MEAN/STD
_CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))  # CIFAR100_MEAN/STD
_CIFAR100_FULL = ((0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
                  (0.2673342858792401, 0.2564384629170883, 0.27615047132568404))
_CIFAR100_CHEN = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Hendrycks2019Using's `2 x - 1`
_NONE = ((), ())


class Entry(NamedTuple):
  """A RobustBench model as a gacd_jax architecture."""
  arch: str                         # a `gacd_jax.models` name
  options: dict[str, Any]           # its options (depth, width, activation, ...)
  norm: tuple[tuple[float, ...], tuple[float, ...]] = _NONE  # (mean, std), () for none
  # The RobustBench class holds mean/std as `mu` / `sigma` buffers; a checkpoint that carries
  # them overrides the class's values, as in RobustBench's loader.
  buffers: bool = False
  inside: str | None = None         # the checkpoint keeps the weights under this key


def _wrn(depth: int, width: int, norm=_NONE, buffers: bool = False) -> Entry:
  return Entry('wrn', {'depth': depth, 'widen_factor': width}, norm, buffers)


def _dm(depth: int, width: int, activation: str, norm) -> Entry:
  return Entry('dm_wrn', {'depth': depth, 'width': width, 'activation': activation}, norm)


def _dm_r18(norm) -> Entry:
  return Entry('dm_preact_resnet', {'depth': 18, 'activation': 'swish'}, norm)


_RESNET18 = Entry('resnet18', {})

CIFAR10 = {
    'Andriushchenko2020Understanding': Entry('preact_resnet18_fast', {}, inside='last'),
    'Carmon2019Unlabeled': _wrn(28, 10),
    'Sehwag2020Hydra': _wrn(28, 10),
    'Wang2020Improving': _wrn(28, 10),
    'Hendrycks2019Using': _wrn(28, 10, _HALF),
    'Rice2020Overfitting': _wrn(34, 20, _CIFAR10, buffers=True),
    'Zhang2019Theoretically': _wrn(34, 10),
    'Huang2020Self': _wrn(34, 10),
    'Wong2020Fast': Entry('preact_resnet18_fast', {}, _CIFAR10, buffers=True),
    'Zhang2019You': _wrn(34, 10),
    'Zhang2020Attacks': _wrn(34, 10),
    'Wu2020Adversarial_extra': _wrn(28, 10),
    'Wu2020Adversarial': _wrn(34, 10),
    'Gowal2020Uncovering_70_16': _dm(70, 16, 'swish', _CIFAR10),
    'Gowal2020Uncovering_70_16_extra': _dm(70, 16, 'swish', _CIFAR10),
    'Gowal2020Uncovering_34_20': _dm(34, 20, 'swish', _CIFAR10),
    'Gowal2020Uncovering_28_10_extra': _dm(28, 10, 'swish', _CIFAR10),
    'Sehwag2021Proxy': _wrn(34, 10),
    'Sehwag2021Proxy_R18': _RESNET18,
    'Sitawarin2020Improving': _wrn(34, 10),
    'Chen2020Efficient': _wrn(34, 10, _CIFAR10, buffers=True),
    'Cui2020Learnable_34_20': _wrn(34, 20),
    'Cui2020Learnable_34_10': _wrn(34, 10),
    'Zhang2020Geometry': _wrn(28, 10),
    'Rebuffi2021Fixing_28_10_cutmix_ddpm': _dm(28, 10, 'swish', _CIFAR10),
    'Rebuffi2021Fixing_106_16_cutmix_ddpm': _dm(106, 16, 'swish', _CIFAR10),
    'Rebuffi2021Fixing_70_16_cutmix_ddpm': _dm(70, 16, 'swish', _CIFAR10),
    'Rebuffi2021Fixing_70_16_cutmix_extra': _dm(70, 16, 'swish', _CIFAR10),
    'Sridhar2021Robust': _wrn(28, 10),
    'Sridhar2021Robust_34_15': _wrn(34, 15),
    'Rebuffi2021Fixing_R18_ddpm': _dm_r18(_CIFAR10),
    'Rade2021Helper_R18_extra': _dm_r18(_CIFAR10),
    'Rade2021Helper_R18_ddpm': _dm_r18(_CIFAR10),
    'Rade2021Helper_extra': _dm(34, 10, 'swish', _CIFAR10),
    'Rade2021Helper_ddpm': _dm(28, 10, 'swish', _CIFAR10),
    'Addepalli2021Towards_RN18': _RESNET18,
    'Addepalli2021Towards_WRN34': _wrn(34, 10),
    'Gowal2021Improving_70_16_ddpm_100m': _dm(70, 16, 'swish', _CIFAR10),
    'Gowal2021Improving_28_10_ddpm_100m': _dm(28, 10, 'swish', _CIFAR10),
    'Gowal2021Improving_R18_ddpm_100m': _dm_r18(_CIFAR10),
    'Chen2021LTD_WRN34_10': _wrn(34, 10),
    'Chen2021LTD_WRN34_20': _wrn(34, 20),
    'Standard': _wrn(28, 10),
    'Jia2022LAS-AT_34_10': _wrn(34, 10),
    'Jia2022LAS-AT_70_16': _wrn(70, 16),
    'Pang2022Robustness_WRN28_10': _dm(28, 10, 'swish', _CIFAR10),
    'Pang2022Robustness_WRN70_16': _dm(70, 16, 'swish', _CIFAR10),
    'Addepalli2022Efficient_RN18': _RESNET18,
    'Addepalli2022Efficient_WRN_34_10': _wrn(34, 10),
    'Wang2023Better_WRN-28-10': _dm(28, 10, 'silu', _CIFAR10),
    'Wang2023Better_WRN-70-16': _dm(70, 16, 'silu', _CIFAR10),
    'Xu2023Exploring_WRN-28-10': _dm(28, 10, 'silu', _CIFAR10),
    'Cui2023Decoupled_WRN-28-10': _dm(28, 10, 'silu', _CIFAR10),
    'Cui2023Decoupled_WRN-34-10': _wrn(34, 10),
    'Chen2024Data_WRN_34_10': _wrn(34, 10),
    'Chen2024Data_WRN_34_20': _wrn(34, 20),
    'Bartoldson2024Adversarial_WRN-94-16': _dm(94, 16, 'silu', _CIFAR10),
    'Bartoldson2024Adversarial_WRN-82-8': _dm(82, 8, 'silu', _CIFAR10),
}

CIFAR100 = {
    'Gowal2020Uncovering': _dm(70, 16, 'swish', _CIFAR100),
    'Gowal2020Uncovering_extra': _dm(70, 16, 'swish', _CIFAR100),
    'Cui2020Learnable_34_20_LBGAT6': _wrn(34, 20),
    'Cui2020Learnable_34_10_LBGAT0': _wrn(34, 10),
    'Cui2020Learnable_34_10_LBGAT6': _wrn(34, 10),
    'Chen2020Efficient': _wrn(34, 10, _CIFAR100_CHEN, buffers=True),
    'Wu2020Adversarial': _wrn(34, 10, _CIFAR100_FULL, buffers=True),
    'Sehwag2021Proxy': _wrn(34, 10),
    'Sitawarin2020Improving': _wrn(34, 10),
    'Hendrycks2019Using': _wrn(28, 10, _HALF),
    # PreActBlock with out_shortcut=True and bn_before_fc=True: gacd_jax's preact_resnet18.
    'Rice2020Overfitting': Entry('preact_resnet18', {}, _CIFAR100_FULL, buffers=True),
    'Rebuffi2021Fixing_70_16_cutmix_ddpm': _dm(70, 16, 'swish', _CIFAR100),
    'Rebuffi2021Fixing_28_10_cutmix_ddpm': _dm(28, 10, 'swish', _CIFAR100),
    'Rebuffi2021Fixing_R18_ddpm': _dm_r18(_CIFAR100),
    'Rade2021Helper_R18_ddpm': _dm_r18(_CIFAR100),
    # PreActBlockV2 (shortcut on the activated input) with bn_before_fc=True: preact_resnet18.
    'Addepalli2021Towards_PARN18': Entry('preact_resnet18', {}),
    'Addepalli2021Towards_WRN34': _wrn(34, 10),
    'Chen2021LTD_WRN34_10': _wrn(34, 10),
    'Pang2022Robustness_WRN28_10': _dm(28, 10, 'swish', _CIFAR100),
    'Pang2022Robustness_WRN70_16': _dm(70, 16, 'swish', _CIFAR100),
    'Jia2022LAS-AT_34_10': _wrn(34, 10),
    'Jia2022LAS-AT_34_20': _wrn(34, 20),
    'Addepalli2022Efficient_RN18': _RESNET18,
    'Addepalli2022Efficient_WRN_34_10': _wrn(34, 10),
    'Cui2020Learnable_34_10_LBGAT9_eps_8_255': _wrn(34, 10),
    'Wang2023Better_WRN-28-10': _dm(28, 10, 'silu', _CIFAR100),
    'Wang2023Better_WRN-70-16': _dm(70, 16, 'silu', _CIFAR100),
    'Cui2023Decoupled_WRN-28-10': _dm(28, 10, 'silu', _CIFAR100),
    'Cui2023Decoupled_WRN-34-10': _wrn(34, 10),
    'Cui2023Decoupled_WRN-34-10_autoaug': _wrn(34, 10),
    'Chen2024Data_WRN_34_10': _wrn(34, 10),
}

TABLE = {'cifar10': CIFAR10, 'cifar100': CIFAR100}


def entry(name: str, dataset: str = 'cifar10') -> Entry:
  """The architecture of RobustBench's Linf model `name` on `dataset`; `ConfigError` if the
  table does not have it, with the closest names."""
  if dataset not in TABLE:
    raise errors.ConfigError(f'unknown RobustBench dataset {dataset!r}; supported: '
                             f'{", ".join(TABLE)}')
  if name in TABLE[dataset]:
    return TABLE[dataset][name]
  hints = []
  close = difflib.get_close_matches(name, list(TABLE[dataset]), n=3)
  if close:
    hints.append(f'did you mean {", ".join(close)}?')
  other = [d for d in TABLE if d != dataset and name in TABLE[d]]
  if other:
    hints.append(f'it is a {other[0]} model: add --dataset {other[0]}')
  hints.append('`gacd-jax import-teacher --robustbench list` prints the supported names (Linf '
               'entries built from WideResNet, DMWideResNet, DMPreActResNet, PreActResNet-18 '
               'and ResNet-18)')
  raise errors.ConfigError(f'{name!r} is not a supported RobustBench {dataset} Linf model; '
                           + '; '.join(hints))


def describe(e: Entry) -> str:
  """'dm_wrn depth=70 width=16 activation=swish, mean/std': the architecture, for people."""
  options = ''.join(f' {k}={v}' for k, v in e.options.items())
  mean, std = e.norm
  norm = (', normalised: mean ' + ' '.join(f'{m:g}' for m in mean) + ', std '
          + ' '.join(f'{s:g}' for s in std)) if mean else ''
  return f'{e.arch}{options}{norm}'


def listing() -> str:
  """The supported names, per dataset, with their architectures."""
  lines = [f'RobustBench {ROBUSTBENCH_VERSION} Linf models that `gacd-jax import-teacher '
           '--robustbench NAME [--dataset cifar100]` converts (bring the weights file):']
  for dataset, table in TABLE.items():
    lines.append(f'\n{dataset} ({len(table)}):')
    width = max(map(len, table))
    lines += [f'  {name:<{width}}  {describe(e)}' for name, e in table.items()]
  return '\n'.join(lines)


def read_checkpoint(name: str, path: str | os.PathLike, dataset: str = 'cifar10'
                    ) -> tuple[dict[str, Any], tuple[tuple[float, ...], tuple[float, ...]]]:
  """The weights of RobustBench's `name` in `path` and the input (mean, std) they go with.

  Unwraps as RobustBench's `load_model` does: the 'last' model where the entry keeps two, a
  'state_dict' nesting, `module.` (DataParallel) and then one `model.` prefix; the `mu` / `sigma`
  buffers, where the RobustBench class has them and the file carries them, replace the class's
  mean/std. The file is read with `torch.load(weights_only=True)` (pickled code is refused).
  """
  e = entry(name, dataset)
  state_dict = torch_convert.read_torch_checkpoint(path, inside=e.inside)
  state_dict = {re.sub(r'^model\.', '', key): value for key, value in state_dict.items()}
  mean, std = e.norm
  if e.buffers and 'mu' in state_dict and 'sigma' in state_dict:
    mean = tuple(float(v) for v in state_dict.pop('mu').reshape(-1))
    std = tuple(float(v) for v in state_dict.pop('sigma').reshape(-1))
  return state_dict, (mean, std)


def import_teacher(name: str, checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike,
                   dataset: str = 'cifar10') -> Entry:
  """Converts the weights of RobustBench's Linf model `name` on `dataset` into a teacher run in
  `out_dir` (see `torch_convert.import_teacher`), recording the name in run.json.

  Returns the table entry. Raises `ConfigError` for a name the table does not have,
  `CheckpointError` for an unreadable file or weights that do not fit the entry's architecture
  (every missing, unexpected and misshapen key listed), `WorkdirError` for an unusable `out_dir`.
  """
  e = entry(name, dataset)
  state_dict, (mean, std) = read_checkpoint(name, checkpoint_path, dataset)
  norm = {'input_mean': mean, 'input_std': std} if mean else {}
  try:
    torch_convert.import_teacher(
        e.arch, checkpoint_path, out_dir, DATASETS[dataset], IMAGE_SHAPE, state_dict=state_dict,
        source={'robustbench': {'name': name, 'dataset': dataset, 'threat_model': 'Linf',
                                'version': ROBUSTBENCH_VERSION}},
        **e.options, **norm)
  except torch_convert.WeightsMismatch as error:
    raise torch_convert.WeightsMismatch(
        f'{checkpoint_path} is not RobustBench\'s {dataset} {name} ({describe(e)}): '
        f'{error}') from None
  return e
