"""PyTorch reference versions of the gacd_jax model zoo (NCHW).

These exist to load the public PyTorch checkpoints of the field and to check gacd_jax against an
independent implementation, so their state_dict keys follow the public codebases:
  * resnet18, preact_resnet18, mobilenet_v2: pytorch-cifar layout (`conv1.weight`,
    `bn1.running_mean`, `layer1.0.conv1.weight`, `layer1.0.shortcut.0.weight`, `layers.0.conv1`,
    `linear.weight`); preact_resnet18 ends with the BN-ReLU `bn` of the robust-overfitting code.
  * wrn / wrn34_10: TRADES layout (`conv1.weight`, `block1.layer.0.bn1.weight`,
    `block1.layer.0.convShortcut.weight`, `bn1`, `fc`), optionally with TRADES' unused
    `sub_block1` so its released checkpoint loads with `strict=True`.
  * small_cnn: mirrors gacd_jax's SmallCNN (`conv1`, `bn1`, `conv2`, `bn2`, `conv3`, `bn3`, `linear`).

Every `forward(x)` takes `x: [B, 3, H, W]` float in [0, 1] (no normalisation inside) and returns
`(logits [B, num_classes], features [B, D])`, `features` being the pooled input of the last linear
layer. Pooling is a global mean, equal to the references' `avg_pool2d` on 32x32 images.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from gacd_jax.errors import ConfigError


def _conv(in_planes: int, out_planes: int, kernel: int, stride: int = 1,
          groups: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_planes, out_planes, kernel, stride=stride, padding=kernel // 2,
                   groups=groups, bias=False)


def _global_pool(x: torch.Tensor) -> torch.Tensor:
  """[B, C, H, W] -> [B, C] spatial mean."""
  return x.mean(dim=(2, 3))


class SmallCNN(nn.Module):
  """conv3x3(width)-BN-ReLU, conv3x3(2*width, stride 2)-BN-ReLU, conv3x3(4*width, stride 2)-BN-ReLU,
  global mean pool, linear."""

  def __init__(self, num_classes: int, width: int = 16, in_channels: int = 3):
    super().__init__()
    self.conv1 = _conv(in_channels, width, 3)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = _conv(width, 2 * width, 3, stride=2)
    self.bn2 = nn.BatchNorm2d(2 * width)
    self.conv3 = _conv(2 * width, 4 * width, 3, stride=2)
    self.bn3 = nn.BatchNorm2d(4 * width)
    self.linear = nn.Linear(4 * width, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = F.relu(self.bn3(self.conv3(out)))
    features = _global_pool(out)
    return self.linear(features), features


class BasicBlock(nn.Module):
  """Post-activation residual block (pytorch-cifar)."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = _conv(in_planes, planes, 3, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(_conv(in_planes, planes, 1, stride), nn.BatchNorm2d(planes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
  """Pre-activation block; the projection shortcut reads the pre-activated input."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = _conv(in_planes, planes, 3, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(_conv(in_planes, planes, 1, stride))
    else:
      self.shortcut = None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(x))
    shortcut = x if self.shortcut is None else self.shortcut(out)
    out = self.conv1(out)
    out = self.conv2(F.relu(self.bn2(out)))
    return out + shortcut


def _resnet18_layers(block: type[nn.Module]) -> list[nn.Sequential]:
  layers, in_planes = [], 64
  for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
    layers.append(nn.Sequential(block(in_planes, planes, stride), block(planes, planes, 1)))
    in_planes = planes
  return layers


class ResNet18(nn.Module):
  """CIFAR ResNet18 (pytorch-cifar): 3x3 stride-1 stem, no max-pool. Features: [B, 512]."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.conv1 = _conv(3, 64, 3)
    self.bn1 = nn.BatchNorm2d(64)
    self.layer1, self.layer2, self.layer3, self.layer4 = _resnet18_layers(BasicBlock)
    self.linear = nn.Linear(512, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    features = _global_pool(out)
    return self.linear(features), features


class PreActResNet18(nn.Module):
  """CIFAR PreActResNet18 with the final BN-ReLU `bn` (robust-overfitting). Features: [B, 512]."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.conv1 = _conv(3, 64, 3)
    self.layer1, self.layer2, self.layer3, self.layer4 = _resnet18_layers(PreActBlock)
    self.bn = nn.BatchNorm2d(512)
    self.linear = nn.Linear(512, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = self.conv1(x)
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    features = _global_pool(F.relu(self.bn(out)))
    return self.linear(features), features


class WideBlock(nn.Module):
  """TRADES WideResNet block (no dropout); `convShortcut` reads the pre-activated input."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = _conv(in_planes, planes, 3, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3)
    self.convShortcut = None if in_planes == planes else _conv(in_planes, planes, 1, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(x))
    shortcut = x if self.convShortcut is None else self.convShortcut(out)
    out = self.conv1(out)
    out = self.conv2(F.relu(self.bn2(out)))
    return out + shortcut


class NetworkBlock(nn.Module):
  """A stage of wide blocks held in `layer`, as TRADES names it."""

  def __init__(self, num_layers: int, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.layer = nn.Sequential(*(
        WideBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
        for i in range(num_layers)))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.layer(x)


class WideResNet(nn.Module):
  """WideResNet-depth-widen_factor as in TRADES (no dropout). Features: [B, 64 * widen_factor].

  `with_sub_block1=True` adds TRADES' `sub_block1`, which forward never uses but whose weights
  the released TRADES checkpoint contains.
  """

  def __init__(self, num_classes: int, depth: int = 34, widen_factor: int = 10,
               with_sub_block1: bool = False):
    super().__init__()
    if depth < 10 or (depth - 4) % 6:
      raise ConfigError(f'wrn depth must be 6n + 4 with n >= 1 (e.g. 28, 34), got {depth}.')
    if widen_factor < 1:
      raise ConfigError(f'wrn widen_factor must be a positive integer, got {widen_factor}.')
    n = (depth - 4) // 6
    widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    self.conv1 = _conv(3, widths[0], 3)
    self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
    if with_sub_block1:
      self.sub_block1 = NetworkBlock(n, widths[0], widths[1], 1)
    self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
    self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)
    # TRADES' initialisation.
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    features = _global_pool(F.relu(self.bn1(out)))
    return self.fc(features), features


class InvertedResidual(nn.Module):
  """pytorch-cifar MobileNetV2 block; residual only at stride 1, projected if widths differ."""

  def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
    super().__init__()
    planes = expansion * in_planes
    self.stride = stride
    self.conv1 = _conv(in_planes, planes, 1)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3, stride, groups=planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv(planes, out_planes, 1)
    self.bn3 = nn.BatchNorm2d(out_planes)
    self.shortcut = nn.Sequential()
    if stride == 1 and in_planes != out_planes:
      self.shortcut = nn.Sequential(_conv(in_planes, out_planes, 1), nn.BatchNorm2d(out_planes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return out + self.shortcut(x) if self.stride == 1 else out


# (expansion, out_planes, num_blocks, stride of the first block); the CIFAR variant.
_MOBILENET_V2_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                     (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
  """CIFAR MobileNetV2 (pytorch-cifar). Features: [B, 1280]."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.conv1 = _conv(3, 32, 3)
    self.bn1 = nn.BatchNorm2d(32)
    blocks, in_planes = [], 32
    for expansion, out_planes, num_blocks, stride in _MOBILENET_V2_CFG:
      for j in range(num_blocks):
        blocks.append(InvertedResidual(in_planes, out_planes, expansion, stride if j == 0 else 1))
        in_planes = out_planes
    self.layers = nn.Sequential(*blocks)
    self.conv2 = _conv(320, 1280, 1)
    self.bn2 = nn.BatchNorm2d(1280)
    self.linear = nn.Linear(1280, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(self.layers(out))))
    features = _global_pool(out)
    return self.linear(features), features


# name -> (module class, keyword arguments the name pins).
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    'small_cnn': (SmallCNN, {}),
    'resnet18': (ResNet18, {}),
    'preact_resnet18': (PreActResNet18, {}),
    'wrn': (WideResNet, {}),
    'wrn34_10': (WideResNet, {'depth': 34, 'widen_factor': 10}),
    'mobilenet_v2': (MobileNetV2, {}),
}


def names() -> list[str]:
  """The model names `build` accepts, sorted."""
  return sorted(_REGISTRY)


def build(name: str, num_classes: int, **kw: Any) -> nn.Module:
  """Builds the PyTorch model registered as `name` (same names as `gacd_jax.models`).

  Raises:
    ConfigError: unknown name or unknown / pinned keyword argument.
  """
  if name not in _REGISTRY:
    raise ConfigError(f'Unknown model {name!r}; known models: {", ".join(names())}.')
  cls, pinned = _REGISTRY[name]
  allowed = [p for p in inspect.signature(cls.__init__).parameters
             if p not in ('self', 'num_classes') and p not in pinned]
  for key in kw:
    if key not in allowed:
      raise ConfigError(f'Model {name!r} has no option {key!r}; its options are: '
                        f'{", ".join(allowed) or "(none)"}.')
  return cls(num_classes, **pinned, **kw)


class LogitsOnly(nn.Module):
  """`net` (which returns `(logits, features)`) as a model of logits alone, in eval mode: what
  attack packages such as pyautoattack expect."""

  def __init__(self, net: nn.Module):
    super().__init__()
    self.net = net
    self.eval()

  def forward(self, x):
    return self.net(x)[0]
