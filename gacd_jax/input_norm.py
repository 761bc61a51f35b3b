"""Input preprocessing inside the model, for every zoo architecture: zero padding, then mean/std.

Many released robust models normalise inside the network (RobustBench's all do, e.g. DMWideResNet
computes `(pad(x) - mean) / std` first), so their weights are only right behind that step. The
models keep taking `x: [B, H, W, C]` in [0, 1]: attacks, eps balls and clipping stay in pixel
space, and the preprocessing is part of what they differentiate through.

`preprocessed(cls)` is `cls` with three more options, off by default (the model is then `cls`
itself, number for number):
  * `input_padding`: zero pixels added on every side of the [0, 1] image;
  * `input_mean`, `input_std`: per-channel (or one for all channels) values, `x -> (x - mean) / std`
    after the padding, in that order, as RobustBench's models do.
`gacd_jax.models` registers every architecture through it; the config holds the options as
`model.input_mean`, `model.input_std`, `model.input_padding` (see `config.model_kwargs`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gacd_jax.errors import ConfigError

OPTIONS = ('input_mean', 'input_std', 'input_padding')


def check(mean: tuple[float, ...], std: tuple[float, ...], padding: int) -> None:
  """Raise `ConfigError` for options that cannot describe a preprocessing."""
  if len(mean) != len(std):
    raise ConfigError(f'input_mean {mean} and input_std {std} must be given together, with one '
                      'value per channel (or one for all)')
  if any(s <= 0 for s in std):
    raise ConfigError(f'input_std {std} must be positive')
  if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
    raise ConfigError(f'input_padding must be a non-negative integer, got {padding!r}')


def preprocess(x: jax.Array, mean: tuple[float, ...], std: tuple[float, ...],
               padding: int) -> jax.Array:
  """x: [B, H, W, C] in [0, 1] -> [B, H + 2 padding, W + 2 padding, C], zero padded, normalised."""
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  if mean:
    if len(mean) not in (1, x.shape[-1]):
      raise ConfigError(f'input_mean {mean} has {len(mean)} values but the images have '
                        f'{x.shape[-1]} channels')
    x = (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)
  return x


@functools.cache
def preprocessed(cls: type[nn.Module]) -> type[nn.Module]:
  """`cls` (a zoo model class, called as `(x, train)`) with the preprocessing options."""

  class Preprocessed(cls):  # pylint: disable=missing-class-docstring
    input_mean: tuple[float, ...] = ()
    input_std: tuple[float, ...] = ()
    input_padding: int = 0

    def __post_init__(self):
      # Configs read back from JSON hold lists; fields must stay hashable.
      object.__setattr__(self, 'input_mean', tuple(float(v) for v in self.input_mean))
      object.__setattr__(self, 'input_std', tuple(float(v) for v in self.input_std))
      check(self.input_mean, self.input_std, self.input_padding)
      super().__post_init__()

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
      x = preprocess(x, self.input_mean, self.input_std, self.input_padding)
      return super().__call__(x, train)

  Preprocessed.__name__ = cls.__name__
  Preprocessed.__qualname__ = cls.__qualname__
  Preprocessed.__doc__ = cls.__doc__
  return Preprocessed
