"""Model zoo: the CIFAR-style networks of the adversarial robustness distillation literature.

Every model is a Flax Linen module called as `module.apply(variables, x, train=...)` with
`x: [B, H, W, C]` float in [0, 1] (normalised inside only with the `input_mean` / `input_std`
options), returning `(logits [B, num_classes], features [B, D])`, where `features` are the pooled
penultimate activations that feed the final linear layer. `train=True` uses batch statistics and
needs `mutable=['batch_stats']`; `train=False` uses the running averages.

The architectures match the public PyTorch code the field trains and releases teachers with
(pytorch-cifar for ResNet18 / MobileNetV2, the robust-overfitting PreActResNet18, the TRADES
WideResNet; RobustBench's own in `gacd_jax/robustbench_models.py`);
`experiments/pytorch_baseline/models.py` holds independent PyTorch versions of this module's with
the same parameter counts. Every padding is explicit and equal to PyTorch's: 'SAME' would pad
strided convolutions asymmetrically and break parity. The final pooling is a global mean, which
equals the references' fixed-size `avg_pool2d` on 32x32 inputs and also works on smaller images.

Naming convention (Flax variable path <-> PyTorch state_dict key):
  * Submodule names are the PyTorch attribute names: `conv1`, `bn1`, `linear`, `fc`,
    `convShortcut`, ...
  * An index into a PyTorch `nn.Sequential` becomes an `_<i>` suffix on the Flax name of the
    enclosing module: `layer1.0.conv1` <-> `layer1_0/conv1`, `layers.3.bn2` <-> `layers_3/bn2`,
    `block1.layer.0.bn1` <-> `block1/layer_0/bn1`, `layer_0.1.conv_2d_1` <-> `layer_0_1/conv_2d_1`
    (the last `_<i>`). The module that holds the variables keeps its PyTorch name verbatim
    (`batchnorm_0`).
  * The pytorch-cifar projection shortcut `shortcut.0` / `shortcut.1` is named `shortcut_conv` /
    `shortcut_bn`.
  * Leaves: Conv `kernel [kh, kw, in/groups, out]` <-> `weight [out, in/groups, kh, kw]`;
    Dense `kernel [in, out]` <-> `weight [out, in]`, `bias` <-> `bias`; BatchNorm `scale` <->
    `weight`, `bias` <-> `bias`, and in `batch_stats` `mean` <-> `running_mean`, `var` <->
    `running_var` (`num_batches_tracked` has no counterpart).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gacd_jax import input_norm
from gacd_jax import runtime
from gacd_jax.errors import ConfigError

Dtype = Any

# He-normal over fan-out: what TRADES uses for its WideResNet and a sound default under ReLU.
_HE_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
  """`_HE_FAN_OUT` of an HWIO kernel, drawn flat and reshaped: the same numbers (tested), but
  XLA's CPU compiler takes seconds longer on a 4-D random draw than on a flat one."""
  fan_out = shape[-1] * math.prod(shape[:-2])
  draw = jax.random.normal(key, (math.prod(shape),), dtype) * jnp.sqrt(2.0 / fan_out).astype(dtype)
  return draw.reshape(shape)


def _stored(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`x`, as a buffer of its own that XLA cannot fuse its producers through (see `Conv`).

  XLA CPU's weight-gradient convolution reads its input transposed (batch minor); XLA fuses the
  input's producers (BatchNorm, ReLU, the residual sums of earlier blocks) into that transpose,
  recomputing them in a cache-hostile order (the README's benchmark section measures it).
  `lax.optimization_barrier` does not stop it (XLA CPU removes barriers before fusion); the output
  of a conditional is a stored buffer. Both branches return `x`; the predicate comes from the
  (replicated) kernel, so a sharded batch needs no communication. Under `vmap` with a batched
  predicate the conditional becomes a select, which is still `x`.
  """
  keep = jnp.isfinite(kernel.reshape(-1)[0])
  return jax.lax.cond(keep, lambda v: v, lambda v: v * 1, x)


class Conv(nn.Module):
  """A bias-free square convolution padded like PyTorch's `padding=kernel // 2` (or `padding`:
  ((top, bottom), (left, right))), with variables laid out as `nn.Conv`'s
  (`kernel [k, k, in / groups, out]`).

  `store_input` passes the input through `_stored` first: a backend tuning for XLA CPU (faster
  weight gradients), with the same outputs and gradients. `build` sets it from
  `gacd_jax.runtime.store_conv_inputs`.
  """
  features: int
  kernel_size: int
  stride: int = 1
  groups: int = 1
  dtype: Dtype = jnp.float32
  store_input: bool = False
  padding: tuple[tuple[int, int], tuple[int, int]] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', _conv_init, (self.kernel_size, self.kernel_size,
                                               x.shape[-1] // self.groups, self.features),
                        jnp.float32)
    if self.store_input:
      x = _stored(x, kernel)
    pad = self.kernel_size // 2
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
        self.padding or ((pad, pad), (pad, pad)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=self.groups)


def _conv(module: nn.Module, features: int, kernel: int, stride: int, name: str,
          groups: int = 1) -> Conv:
  """A `Conv` in `module`, with the module's compute dtype and `store_conv_inputs`."""
  return Conv(features, kernel, stride, groups, module.dtype, module.store_conv_inputs, name=name)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` with PyTorch's running-variance update.

  Both normalise a training batch with its biased variance, but PyTorch folds the *unbiased* one
  (x n / (n - 1), n = values per channel) into the running `var`; Flax folds the biased one. Same
  variables and names as `nn.BatchNorm`, so checkpoints and the PyTorch conversion are unaffected.
  """

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    y = super().__call__(x, use_running_average)
    train = not nn.merge_param('use_running_average', self.use_running_average,
                               use_running_average)
    if train and not self.is_initializing():
      n = x.size // x.shape[-1]  # the global count under jit, however the batch is sharded
      if n < 2:
        raise ValueError(f'BatchNorm in train mode needs more than one value per channel, got an '
                         f'input of shape {x.shape}')
      # (1 - momentum) * (unbiased - biased) = (1 - momentum) * biased / (n - 1)
      batch_var = jnp.var(x.astype(jnp.float32), axis=tuple(range(x.ndim - 1)))
      var = self.get_variable('batch_stats', 'var')
      self.put_variable('batch_stats', 'var', var + (1 - self.momentum) * batch_var / (n - 1))
    return y


def _bn(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
  # Flax momentum weighs the old average, so PyTorch's momentum=0.1 is 0.9 here.
  return BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


def _global_pool(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, C] spatial mean."""
  return jnp.mean(x, axis=(1, 2))


class SmallCNN(nn.Module):
  """A three-layer CNN for tests and quick CPU demos on 8x8..32x32 images.

  conv3x3(width)-BN-ReLU, conv3x3(2*width, stride 2)-BN-ReLU, conv3x3(4*width, stride 2)-BN-ReLU,
  global mean pool, linear. Features: [B, 4 * width].
  """
  num_classes: int
  width: int = 16
  dtype: Dtype = jnp.float32
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = nn.relu(_bn(train, self.dtype, 'bn1')(_conv(self, self.width, 3, 1, 'conv1')(x)))
    x = nn.relu(_bn(train, self.dtype, 'bn2')(_conv(self, 2 * self.width, 3, 2, 'conv2')(x)))
    x = nn.relu(_bn(train, self.dtype, 'bn3')(_conv(self, 4 * self.width, 3, 2, 'conv3')(x)))
    features = _global_pool(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='linear')(features)
    return logits, features


class _BasicBlock(nn.Module):
  """Post-activation residual block of pytorch-cifar's ResNet18."""
  planes: int
  stride: int
  dtype: Dtype
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = nn.relu(_bn(train, self.dtype, 'bn1')(
        _conv(self, self.planes, 3, self.stride, 'conv1')(x)))
    out = _bn(train, self.dtype, 'bn2')(_conv(self, self.planes, 3, 1, 'conv2')(out))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = _bn(train, self.dtype, 'shortcut_bn')(
          _conv(self, self.planes, 1, self.stride, 'shortcut_conv')(x))
    return nn.relu(out + shortcut)


# (planes, stride of the first block) per stage; two blocks per stage in the 18-layer nets.
_RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


class ResNet18(nn.Module):
  """CIFAR ResNet18 (pytorch-cifar): 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2].

  Features: [B, 512].
  """
  num_classes: int
  dtype: Dtype = jnp.float32
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = nn.relu(_bn(train, self.dtype, 'bn1')(_conv(self, 64, 3, 1, 'conv1')(x)))
    for stage, (planes, stride) in enumerate(_RESNET18_STAGES, start=1):
      for i in range(2):
        x = _BasicBlock(planes, stride if i == 0 else 1, self.dtype, self.store_conv_inputs,
                        name=f'layer{stage}_{i}')(x, train)
    features = _global_pool(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='linear')(features)
    return logits, features


class _PreActBlock(nn.Module):
  """Pre-activation residual block; the projection shortcut reads the pre-activated input."""
  planes: int
  stride: int
  dtype: Dtype
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = nn.relu(_bn(train, self.dtype, 'bn1')(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = _conv(self, self.planes, 1, self.stride, 'shortcut_conv')(out)
    out = _conv(self, self.planes, 3, self.stride, 'conv1')(out)
    out = nn.relu(_bn(train, self.dtype, 'bn2')(out))
    out = _conv(self, self.planes, 3, 1, 'conv2')(out)
    return out + shortcut


class PreActResNet18(nn.Module):
  """CIFAR PreActResNet18 as in the robust-overfitting code (Rice et al. 2020).

  Unlike pytorch-cifar's version it ends with BN-ReLU (`bn`) before pooling, which is what the
  adversarial-training checkpoints carry. Features: [B, 512].
  """
  num_classes: int
  dtype: Dtype = jnp.float32
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = _conv(self, 64, 3, 1, 'conv1')(x)
    for stage, (planes, stride) in enumerate(_RESNET18_STAGES, start=1):
      for i in range(2):
        x = _PreActBlock(planes, stride if i == 0 else 1, self.dtype, self.store_conv_inputs,
                         name=f'layer{stage}_{i}')(x, train)
    x = nn.relu(_bn(train, self.dtype, 'bn')(x))
    features = _global_pool(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='linear')(features)
    return logits, features


class _WideBlock(nn.Module):
  """TRADES WideResNet block (pre-activation, no dropout).

  When the width or stride changes, the 1x1 `convShortcut` is applied to the pre-activated input,
  as TRADES does; otherwise the raw input is added.
  """
  planes: int
  stride: int
  dtype: Dtype
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = nn.relu(_bn(train, self.dtype, 'bn1')(x))
    equal_in_out = x.shape[-1] == self.planes
    shortcut = x if equal_in_out else _conv(self, self.planes, 1, self.stride, 'convShortcut')(out)
    out = _conv(self, self.planes, 3, self.stride, 'conv1')(out)
    out = nn.relu(_bn(train, self.dtype, 'bn2')(out))
    out = _conv(self, self.planes, 3, 1, 'conv2')(out)
    return out + shortcut


class _NetworkBlock(nn.Module):
  """A stage of `num_layers` wide blocks; children `layer_<i>` mirror TRADES' `layer.<i>`."""
  num_layers: int
  planes: int
  stride: int
  dtype: Dtype
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_layers):
      x = _WideBlock(self.planes, self.stride if i == 0 else 1, self.dtype,
                     self.store_conv_inputs, name=f'layer_{i}')(x, train)
    return x


class WideResNet(nn.Module):
  """WideResNet-depth-widen_factor as in the TRADES code (no dropout).

  Stages of (depth - 4) / 6 blocks at widths 16k, 32k, 64k (k = widen_factor), strides 1, 2, 2,
  then BN-ReLU (`bn1`), global mean pool, `fc`. Features: [B, 64 * widen_factor].
  """
  num_classes: int
  depth: int = 34
  widen_factor: int = 10
  dtype: Dtype = jnp.float32
  store_conv_inputs: bool = False

  def __post_init__(self):
    # Checked at construction so a bad config fails before any tracing.
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ConfigError(f'wrn depth must be 6n + 4 with n >= 1 (e.g. 28, 34), got {self.depth}.')
    if self.widen_factor < 1:
      raise ConfigError(f'wrn widen_factor must be a positive integer, got {self.widen_factor}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    num_layers = (self.depth - 4) // 6
    x = _conv(self, 16, 3, 1, 'conv1')(x)
    for stage, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
      x = _NetworkBlock(num_layers, width * self.widen_factor, stride, self.dtype,
                        self.store_conv_inputs, name=f'block{stage}')(x, train)
    x = nn.relu(_bn(train, self.dtype, 'bn1')(x))
    features = _global_pool(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(features)
    return logits, features


class _InvertedResidual(nn.Module):
  """pytorch-cifar MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection.

  The residual is added only at stride 1; a 1x1 conv-BN projects it when the width changes.
  """
  out_planes: int
  expansion: int
  stride: int
  dtype: Dtype
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    planes = self.expansion * x.shape[-1]
    out = nn.relu(_bn(train, self.dtype, 'bn1')(_conv(self, planes, 1, 1, 'conv1')(x)))
    out = nn.relu(_bn(train, self.dtype, 'bn2')(
        _conv(self, planes, 3, self.stride, 'conv2', groups=planes)(out)))
    out = _bn(train, self.dtype, 'bn3')(_conv(self, self.out_planes, 1, 1, 'conv3')(out))
    if self.stride != 1:
      return out
    shortcut = x
    if x.shape[-1] != self.out_planes:
      shortcut = _bn(train, self.dtype, 'shortcut_bn')(
          _conv(self, self.out_planes, 1, 1, 'shortcut_conv')(x))
    return out + shortcut


# (expansion, out_planes, num_blocks, stride of the first block); pytorch-cifar's CIFAR variant,
# whose second stage keeps stride 1 where ImageNet MobileNetV2 downsamples.
_MOBILENET_V2_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                     (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
  """CIFAR MobileNetV2 as in pytorch-cifar: stride-1 3x3 stem of 32 channels, inverted residual
  blocks `layers_<i>`, 1x1 conv to 1280, global mean pool, linear. Features: [B, 1280]."""
  num_classes: int
  dtype: Dtype = jnp.float32
  store_conv_inputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = nn.relu(_bn(train, self.dtype, 'bn1')(_conv(self, 32, 3, 1, 'conv1')(x)))
    i = 0
    for expansion, out_planes, num_blocks, stride in _MOBILENET_V2_CFG:
      for j in range(num_blocks):
        x = _InvertedResidual(out_planes, expansion, stride if j == 0 else 1, self.dtype,
                              self.store_conv_inputs, name=f'layers_{i}')(x, train)
        i += 1
    x = nn.relu(_bn(train, self.dtype, 'bn2')(_conv(self, 1280, 1, 1, 'conv2')(x)))
    features = _global_pool(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='linear')(features)
    return logits, features


# name -> (module class, keyword arguments the name pins). Every class also takes the input
# preprocessing options of `gacd_jax/input_norm.py` (off by default).
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {}


def register(name: str, cls: type[nn.Module], pinned: dict[str, Any] | None = None) -> None:
  """Makes `build(name, ...)` build `cls` (called as `(x, train)`), with `pinned` options fixed."""
  _REGISTRY[name] = (input_norm.preprocessed(cls), dict(pinned or {}))


register('small_cnn', SmallCNN)
register('resnet18', ResNet18)
register('preact_resnet18', PreActResNet18)
register('wrn', WideResNet)
register('wrn34_10', WideResNet, {'depth': 34, 'widen_factor': 10})
register('mobilenet_v2', MobileNetV2)

# Dataclass fields that are not hyperparameters: every Linen module's, and the backend tuning
# `build` sets itself.
_NOT_OPTIONS = frozenset({'parent', 'name', 'num_classes', 'store_conv_inputs'})


def names() -> list[str]:
  """The model names `build` accepts, sorted."""
  return sorted(_REGISTRY)


def options(name: str) -> list[str]:
  """The keyword arguments `build(name, ...)` accepts besides `num_classes`, sorted."""
  if name not in _REGISTRY:
    raise ConfigError(f'Unknown model {name!r}; known models: {", ".join(names())}.')
  cls, pinned = _REGISTRY[name]
  return sorted(f.name for f in dataclasses.fields(cls)
                if f.init and f.name not in _NOT_OPTIONS and f.name not in pinned)


def build(name: str, num_classes: int, *, store_conv_inputs: bool | None = None,
          **kw: Any) -> nn.Module:
  """Builds the model registered as `name` with a `num_classes`-way linear head.

  Args:
    name: one of `names()`.
    num_classes: number of logits, >= 1.
    store_conv_inputs: pass every convolution's input through a stored buffer (`Conv`), a
      backend tuning that changes no output or gradient. None (the default) decides by
      `runtime.store_conv_inputs` for the backend JAX runs on now (`jax.default_backend()`):
      on for the CPU, off for GPU and TPU. The launchers (train, evaluate) pass it explicitly.
    **kw: model options (see `options(name)`), e.g. `width` for small_cnn, `depth` and
      `widen_factor` for wrn; for all, `dtype` (compute dtype; parameters stay float32) and
      `input_mean`, `input_std`, `input_padding` (`gacd_jax/input_norm.py`).

  Raises:
    ConfigError: unknown name, unknown or pinned option, or an invalid value.
  """
  allowed = options(name)
  for key in kw:
    if key not in allowed:
      raise ConfigError(f'Model {name!r} has no option {key!r}; its options are: '
                        f'{", ".join(allowed) or "(none)"}.')
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f'num_classes must be a positive integer, got {num_classes!r}.')
  if store_conv_inputs is None:
    store_conv_inputs = runtime.store_conv_inputs(jax.default_backend())
  cls, pinned = _REGISTRY[name]
  return cls(num_classes=num_classes, **pinned, **kw, store_conv_inputs=store_conv_inputs)


def feature_dim(module: nn.Module, image_shape: tuple[int, int, int]) -> int:
  """Width D of the `features [B, D]` that `module` returns for images of `image_shape` (H, W, C).

  Runs `init` under `jax.eval_shape`, so nothing is computed or allocated.
  """
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  (_, features), _ = jax.eval_shape(
      lambda x: module.init_with_output(jax.random.key(0), x), x)
  return features.shape[-1]


# RobustBench's architectures build on the layers above and register themselves when imported.
from gacd_jax import robustbench_models  # pylint: disable=g-import-not-at-top,unused-import
