"""RobustBench's CIFAR architectures that the zoo of `gacd_jax/models.py` does not already have.

  * `DMWideResNet` (`dm_wrn`) and `DMPreActResNet` (`dm_preact_resnet`): the DeepMind
    architectures (Gowal et al. 2020, Rebuffi et al. 2021) that RobustBench's strongest CIFAR
    entries use, as `robustbench/model_zoo/architectures/dm_wide_resnet.py` (robustbench 1.1.1)
    defines them in PyTorch: ReLU, Swish or SiLU activations, TensorFlow-style 'SAME' padding of
    strided convolutions (one zero row and column after the image, none before), and a fixed-size
    average pool.
  * `PreActResNet18Fast` (`preact_resnet18_fast`): the pre-activation ResNet-18 that RobustBench
    builds for Wong2020Fast and Andriushchenko2020Understanding (its `PreActResNet(PreActBlock,
    [2, 2, 2, 2])`): projection shortcuts read the block's raw input and there is no BN-ReLU
    before the pooling, unlike `preact_resnet18`.

RobustBench's mean/std normalisation and input padding are the `input_mean`, `input_std` and
`input_padding` options every zoo model takes (`gacd_jax/input_norm.py`); which RobustBench name
is which architecture is in `gacd_jax/robustbench_teachers.py`. Interface, layers and the naming
convention (Flax path <-> PyTorch key) are those of `gacd_jax/models.py`: `layer.0.block.1.conv_0`
<-> `layer_0/block_1/conv_0`, `layer_2.1.batchnorm_0` <-> `layer_2_1/batchnorm_0`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gacd_jax import models
from gacd_jax.errors import ConfigError

Dtype = Any

# Swish (the DeepMind code's own autograd function) and SiLU (torch.nn.SiLU) are the same
# function, x * sigmoid(x); both names are kept so a RobustBench entry reads as its source does.
ACTIVATIONS = {'relu': nn.relu, 'swish': nn.swish, 'silu': nn.silu}


def _check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ConfigError(f'activation must be one of {", ".join(ACTIVATIONS)}, got {activation!r}')


def _same_padding(stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """The DeepMind code's padding of a 3x3 convolution: (1, 1) at stride 1, (0, 1) at stride 2."""
  pad = (1, 1) if stride == 1 else (0, 1)
  return pad, pad


def _conv(module: nn.Module, features: int, kernel: int, stride: int, name: str,
          padding: tuple[tuple[int, int], tuple[int, int]] | None = None) -> models.Conv:
  return models.Conv(features, kernel, stride, 1, module.dtype, module.store_conv_inputs,
                     padding, name=name)


def _bn(module: nn.Module, train: bool, name: str) -> nn.Module:
  return models._bn(train, module.dtype, name)  # pylint: disable=protected-access


def _pool(x: jax.Array, size: int) -> jax.Array:
  """[B, H, W, C] -> [B, C]: the reference's `avg_pool2d(x, size)` then flatten.

  That is one `size` x `size` window per image, the top-left one, when the final map has `size` to
  2 * size - 1 rows and columns (32x32 inputs with an `input_padding` below 16, for the wide
  nets); on any other size the reference fails or mixes images, and this is the global mean.
  """
  h, w = x.shape[1:3]
  if size <= h < 2 * size and size <= w < 2 * size:
    x = x[:, :size, :size]
  return jnp.mean(x, axis=(1, 2))


class _DMBlock(nn.Module):
  """DMWideResNet block: pre-activation; a width change adds a 1x1 `shortcut` on the activated
  input, otherwise the raw input is added."""
  planes: int
  stride: int
  activation: str
  dtype: Dtype
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    out = act(_bn(self, train, 'batchnorm_0')(x))
    if x.shape[-1] != self.planes:
      x = _conv(self, self.planes, 1, self.stride, 'shortcut')(out)
    out = _conv(self, self.planes, 3, self.stride, 'conv_0', _same_padding(self.stride))(out)
    out = act(_bn(self, train, 'batchnorm_1')(out))
    out = _conv(self, self.planes, 3, 1, 'conv_1')(out)
    return x + out


class _DMBlockGroup(nn.Module):
  """`num_blocks` `_DMBlock`s, children `block_<i>` (the reference's `block.<i>`)."""
  num_blocks: int
  planes: int
  stride: int
  activation: str
  dtype: Dtype
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_blocks):
      x = _DMBlock(self.planes, self.stride if i == 0 else 1, self.activation, self.dtype,
                   self.store_conv_inputs, name=f'block_{i}')(x, train)
    return x


class DMWideResNet(nn.Module):
  """DMWideResNet-depth-width: a 3x3 `init_conv` of 16 channels, three groups `layer_<g>` of
  (depth - 4) / 6 blocks at 16, 32, 64 x width channels (strides 1, 2, 2), activated `batchnorm`,
  an 8x8 average pool (`_pool`), `logits`. Features: [B, 64 * width]."""
  num_classes: int
  depth: int = 28
  width: int = 10
  activation: str = 'relu'
  dtype: Dtype = jnp.float32
  store_conv_inputs: bool = False

  def __post_init__(self):
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ConfigError(f'dm_wrn depth must be 6n + 4 with n >= 1 (e.g. 28, 70), got {self.depth}.')
    if self.width < 1:
      raise ConfigError(f'dm_wrn width must be a positive integer, got {self.width}.')
    _check_activation(self.activation)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = _conv(self, 16, 3, 1, 'init_conv')(x)
    for group, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
      x = _DMBlockGroup((self.depth - 4) // 6, planes * self.width, stride, self.activation,
                        self.dtype, self.store_conv_inputs, name=f'layer_{group}')(x, train)
    x = ACTIVATIONS[self.activation](_bn(self, train, 'batchnorm')(x))
    features = _pool(x, 8)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(features)
    return logits, features


class _DMPreActBlock(nn.Module):
  """DMPreActResNet block: a projection `shortcut` (3x3, padded like `conv_2d_1`) on the *raw*
  input when the stride or width changes."""
  planes: int
  stride: int
  activation: str
  dtype: Dtype
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    padding = _same_padding(self.stride)
    out = act(_bn(self, train, 'batchnorm_0')(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = _conv(self, self.planes, 3, self.stride, 'shortcut', padding)(x)
    out = _conv(self, self.planes, 3, self.stride, 'conv_2d_1', padding)(out)
    out = act(_bn(self, train, 'batchnorm_1')(out))
    out = _conv(self, self.planes, 3, 1, 'conv_2d_2')(out)
    return out + shortcut


_DM_PREACT_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class DMPreActResNet(nn.Module):
  """DMPreActResNet-18 or -34: a 3x3 `conv_2d` of 64 channels, stages `layer_0` .. `layer_3` at
  64, 128, 256, 512 channels (strides 1, 2, 2, 2), activated `batchnorm`, a 4x4 average pool
  (`_pool`), `logits`. Features: [B, 512]."""
  num_classes: int
  depth: int = 18
  activation: str = 'relu'
  dtype: Dtype = jnp.float32
  store_conv_inputs: bool = False

  def __post_init__(self):
    if self.depth not in _DM_PREACT_BLOCKS:
      raise ConfigError(f'dm_preact_resnet depth must be 18 or 34, got {self.depth}.')
    _check_activation(self.activation)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = _conv(self, 64, 3, 1, 'conv_2d')(x)
    stages = zip((64, 128, 256, 512), (1, 2, 2, 2), _DM_PREACT_BLOCKS[self.depth])
    for stage, (planes, stride, num_blocks) in enumerate(stages):
      for i in range(num_blocks):
        x = _DMPreActBlock(planes, stride if i == 0 else 1, self.activation, self.dtype,
                           self.store_conv_inputs, name=f'layer_{stage}_{i}')(x, train)
    x = ACTIVATIONS[self.activation](_bn(self, train, 'batchnorm')(x))
    features = _pool(x, 4)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(features)
    return logits, features


class _FastPreActBlock(nn.Module):
  """Pre-activation block whose 1x1 projection `shortcut_conv` reads the raw input."""
  planes: int
  stride: int
  dtype: Dtype
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = nn.relu(_bn(self, train, 'bn1')(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = _conv(self, self.planes, 1, self.stride, 'shortcut_conv')(x)
    out = _conv(self, self.planes, 3, self.stride, 'conv1')(out)
    out = _conv(self, self.planes, 3, 1, 'conv2')(nn.relu(_bn(self, train, 'bn2')(out)))
    return out + shortcut


class PreActResNet18Fast(nn.Module):
  """RobustBench's `PreActResNet(PreActBlock, [2, 2, 2, 2])` with its default flags: the stages of
  `preact_resnet18` with `_FastPreActBlock`s, then the 4x4 average pool (`_pool`) straight after
  the last block, `linear`. Features: [B, 512]."""
  num_classes: int
  dtype: Dtype = jnp.float32
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = _conv(self, 64, 3, 1, 'conv1')(x)
    for stage, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
      for i in range(2):
        x = _FastPreActBlock(planes, stride if i == 0 else 1, self.dtype, self.store_conv_inputs,
                             name=f'layer{stage}_{i}')(x, train)
    features = _pool(x, 4)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='linear')(features)
    return logits, features


models.register('dm_wrn', DMWideResNet)
models.register('dm_preact_resnet', DMPreActResNet)
models.register('preact_resnet18_fast', PreActResNet18Fast)
