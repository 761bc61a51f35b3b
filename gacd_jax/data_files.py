"""CIFAR-10, CIFAR-100 and STL-10 as people store them.

`config.data.format` picks the reader; 'auto' looks at `data_dir` and finds the one format there:

  tfds     `DIR/<name>/...`: a tfds array_record build (random access), decoded at open.
  python   the official CIFAR python batches: `DIR/cifar-10-batches-py/data_batch_1..5, test_batch`,
           `DIR/cifar-100-python/train, test` (fine labels). Read with `SafeUnpickler`, which
           builds numpy arrays and nothing else: the files' code is never run.
  binary   the official binary files: `DIR/cifar-10-batches-bin/data_batch_1..5.bin,
           test_batch.bin` (1 label byte + 3072 bytes CHW per image), `DIR/cifar-100-binary/
           train.bin, test.bin` (coarse and fine label bytes + 3072), `DIR/stl10_binary/
           train_X.bin, train_y.bin, test_X.bin, test_y.bin` (96x96 CHW column-major, labels 1..10).
  folder   `DIR/train/<class>/*.png|jpg|jpeg` and `DIR/test/<class>/...`: class names sorted (the
           union of both splits' folders), examples ordered by class, then file name.
  npz      `DIR/<name>.npz` (or `data_dir` is the file) with x_train, y_train, x_test, y_test:
           uint8 [N, H, W, C] (or [N, H, W]) and integer labels [N] (or [N, 1]); no pickles.

The python, binary, folder and npz readers hold a split in host memory as uint8 NHWC (CIFAR-10's
train split: 150 MB); so does the tfds reader, decoding the split when it opens it (a split
over `TFDS_IN_MEMORY_BYTES` is read a batch at a time instead). Either way a batch
leaves as float32 in [0, 1] like every `data.Source`. A python or binary data_dir may also be the
official folder itself (e.g. `.../cifar-10-batches-py`).
"""

from __future__ import annotations

import codecs
import pathlib
import pickle
from typing import Any

from absl import logging
import numpy as np

from gacd_jax import data
from gacd_jax.errors import ConfigError, DataError

FORMATS = ("auto", "tfds", "python", "binary", "folder", "npz")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CIFAR_SHAPE = (32, 32, 3)
# dataset -> (official folder, {split: files}, label key of a python batch)
_PYTHON = {
    "cifar10": ("cifar-10-batches-py",
                {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "labels"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels"),
}
# dataset -> (official folder, {split: files}, label bytes before each image, which one is used)
_BINARY = {
    "cifar10": ("cifar-10-batches-bin", {"train": [f"data_batch_{i}.bin" for i in range(1, 6)],
                                         "test": ["test_batch.bin"]}, 1, 0),
    "cifar100": ("cifar-100-binary", {"train": ["train.bin"], "test": ["test.bin"]}, 2, 1),
    "stl10": ("stl10_binary", {"train": ["train_X.bin", "train_y.bin"],
                               "test": ["test_X.bin", "test_y.bin"]}, 0, 0),
}


# numpy's own array rebuilders, whatever module this numpy keeps them in (numpy 2: numpy._core).
_RECONSTRUCT = np.zeros(1).__reduce__()[0]   # protocols 0-4
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5


class SafeUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays, lists, dicts, strings and numbers, and refuses anything else.

  A pickle names every callable it calls (a GLOBAL); `find_class` answers only for those that
  rebuild a numpy array, as Python 2's numpy wrote them in the official CIFAR files and as
  Python 3's numpy 1 or 2 writes them (`_codecs.encode` makes bytes in protocol 2). Any other
  name raises DataError before anything is called, so the file's code never runs.
  """

  ALLOWED = {
      **{(module, "_reconstruct"): _RECONSTRUCT
         for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
      **{(module, "_frombuffer"): _FROMBUFFER
         for module in ("numpy.core.numeric", "numpy._core.numeric")},
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
      ("_codecs", "encode"): codecs.encode,
  }

  def __init__(self, file, path: pathlib.Path):
    super().__init__(file, encoding="bytes")
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self.ALLOWED[(module, name)]
    except KeyError:
      raise DataError(
          f"refusing to unpickle {self._path}: it calls {module}.{name}, which a CIFAR python "
          "batch never holds (only numpy arrays, lists and strings); the file is damaged or not "
          "what it claims, and none of its code was run") from None

  def persistent_load(self, pid: Any) -> Any:
    raise DataError(f"refusing to unpickle {self._path}: it holds a persistent id, which a CIFAR "
                    "python batch never does")


def check_format(name: str, fmt: str) -> None:
  """Raise ConfigError unless `fmt` is a format dataset `name` can be read in."""
  if fmt not in FORMATS:
    raise ConfigError(f"unknown data format {fmt!r} (config.data.format); known formats: "
                      f"{', '.join(FORMATS)}")
  if fmt == "auto":
    return
  if name not in NUM_CLASSES:
    raise ConfigError(f"data format {fmt!r} applies to {', '.join(NUM_CLASSES)} only; {name} is "
                      "bundled or generated: leave config.data.format='auto'")
  if fmt == "python" and name not in _PYTHON:
    raise ConfigError(f"{name} has no official python format; its formats: tfds, binary, folder, "
                      "npz")


def detect(name: str, data_dir: str) -> str:
  """The format `data_dir` holds dataset `name` in: the one file format found there, else tfds
  (whose array_record build lives in `DIR/<name>/`, and '' is tfds' default directory).

  Raises:
    DataError: `data_dir` does not exist, or holds `name` in more than one format.
  """
  if not data_dir:
    return "tfds"
  root = pathlib.Path(data_dir)
  if not root.exists():
    raise DataError(f"data_dir {data_dir} does not exist; point --config.data.data_dir at the "
                    f"folder holding {name}")
  found = {fmt: where for fmt in FORMATS[1:] if (where := _locate(name, fmt, root))}
  if len(found) > 1:
    listed = ", ".join(f"{fmt} ({where})" for fmt, where in found.items())
    raise DataError(f"{data_dir} holds {name} in several formats: {listed}; choose one with "
                    f"--config.data.format={'|'.join(found)}")
  return next(iter(found), "tfds")


def _expected(name: str, root: pathlib.Path, fmt: str = "auto") -> str:
  """What the files of format `fmt` (all formats: 'auto') are called, for messages."""
  where = {
      "python": f"{root / _PYTHON[name][0]}/" if name in _PYTHON else "",
      "binary": f"{root / _BINARY[name][0]}/",
      "folder": f"{root}/train/<class>/ or test/<class>/ images",
      "npz": f"{root / name}.npz",
      "tfds": f"{root / name}/ (`tfds build {name} --file_format=array_record "
              f"--data_dir={root}`)"}
  return ", ".join(f"{path} ({kind})" for kind, path in where.items()
                   if path and fmt in ("auto", kind))


def _locate(name: str, fmt: str, root: pathlib.Path) -> pathlib.Path | None:
  """Where `root` holds `name` in format `fmt`, or None."""
  if fmt == "npz":
    if root.is_file() and root.suffix == ".npz":
      return root
    return root / f"{name}.npz" if (root / f"{name}.npz").is_file() else None
  if root.is_file():
    return None
  if fmt == "tfds":
    return root / name if (root / name).is_dir() else None
  if fmt == "folder":
    return root if (root / "train").is_dir() or (root / "test").is_dir() else None
  table = _PYTHON if fmt == "python" else _BINARY
  if name not in table:
    return None
  folder, files, *_ = table[name]
  for where in (root / folder, root):
    if any((where / file).is_file() for split_files in files.values() for file in split_files):
      return where
  return None


def open_split(name: str, split: str, fmt: str, data_dir: str, *, image_size: int | None,
               channels: int | None, num_examples: int | None) -> data.Source:
  """One split of dataset `name` stored in format `fmt` ('auto': `detect`) under `data_dir`.

  Raises:
    ConfigError: an unknown format or one `name` has no such thing as; options the data cannot
      honour (channels, num_examples).
    DataError: missing or malformed files, labels out of range, a folder without images.
  """
  check_format(name, fmt)
  detected = fmt == "auto"
  if detected:
    fmt = detect(name, data_dir)
  if fmt == "tfds":
    try:
      return _open_tfds(name, split, data_dir or None, image_size, channels, num_examples)
    except _NotPrepared as e:
      if not (detected and data_dir):
        raise
      raise DataError(f"found no {name} in {data_dir}: looked for "
                      f"{_expected(name, pathlib.Path(data_dir))}") from e
  root = pathlib.Path(data_dir) if data_dir else None
  where = _locate(name, fmt, root) if root is not None and root.exists() else None
  if where is None:
    raise DataError(f"found no {name} in {fmt} format in {data_dir or '(no data_dir)'}: expected "
                    f"{_expected(name, root or pathlib.Path('DIR'), fmt)}; set "
                    "--config.data.data_dir")
  reader = {"python": _read_python, "binary": _read_binary, "folder": _read_folder,
            "npz": _read_npz}[fmt]
  images, labels = reader(name, split, where)
  if num_examples is not None:
    data.check_num_examples(name, split, len(images), num_examples)
    images, labels = images[:num_examples], labels[:num_examples]
  return StoredSource(name, split, images, labels, NUM_CLASSES[name], image_size=image_size,
                      channels=channels)


class StoredSource(data.Source):
  """A split held in host memory as uint8 [N, H, W, C], resized and tiled per batch."""

  def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray,
               num_classes: int, *, image_size: int | None, channels: int | None):
    stored = images.shape[1:]
    if channels is not None and channels != stored[-1] and stored[-1] != 1:
      raise ConfigError(f"{name} images have {stored[-1]} channels, but channels={channels}")
    size = stored[:2] if image_size is None else (image_size, image_size)
    super().__init__(name, split, len(images), num_classes, (*size, channels or stored[-1]))
    self._images = images
    self._labels = labels

  def labels(self) -> np.ndarray:
    return self._labels

  def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return data.scale_uint8(self._images[indices], self.image_shape), self._labels[indices]


def _check_labels(labels: np.ndarray, num_classes: int, name: str, what: Any) -> np.ndarray:
  """int32 labels, after checking they are integers in [0, num_classes)."""
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{what}: labels are {labels.dtype}, not integers")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f"{what}: labels run from {labels.min()} to {labels.max()}, outside "
                    f"{name}'s 0 .. {num_classes - 1}")
  return labels.astype(np.int32)


def _files(where: pathlib.Path, files: list[str], name: str, fmt: str) -> list[pathlib.Path]:
  paths = [where / file for file in files]
  for path in paths:
    if not path.is_file():
      raise DataError(f"{path} is missing: {name} in {fmt} format needs {', '.join(files)} in "
                      f"{where}")
  return paths


def _cifar_rows(rows: np.ndarray) -> np.ndarray:
  """[N, 3072] rows of R, G, B planes (32x32, row-major) -> uint8 [N, 32, 32, 3]."""
  return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _read_python(name: str, split: str, where: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  _, files, label_key = _PYTHON[name]
  images, labels = [], []
  for path in _files(where, files[split], name, "python"):
    try:
      with open(path, "rb") as f:
        batch = SafeUnpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            AttributeError) as e:
      raise DataError(f"{path} is not a CIFAR python batch: {type(e).__name__}: {e}") from e
    if not isinstance(batch, dict):
      raise DataError(f"{path} is not a CIFAR python batch: it holds a {type(batch).__name__}, "
                      "not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
      raise DataError(f"{path} is not a {name} python batch: it has no 'data' and "
                      f"{label_key!r} (its keys: {', '.join(map(str, batch))})")
    rows, batch_labels = batch["data"], np.asarray(batch[label_key])
    if (not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2
        or rows.shape[1] != 3072 or batch_labels.shape != (len(rows),)):
      shape = getattr(rows, "shape", type(rows).__name__)
      raise DataError(f"{path}: 'data' is {getattr(rows, 'dtype', '')} {shape} with "
                      f"{batch_labels.shape} labels; a CIFAR batch holds uint8 [N, 3072] and N "
                      "labels")
    images.append(_cifar_rows(rows))
    labels.append(_check_labels(batch_labels, NUM_CLASSES[name], name, path))
  return np.concatenate(images), np.concatenate(labels)


def _read_binary(name: str, split: str, where: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  _, files, label_bytes, label_index = _BINARY[name]
  paths = _files(where, files[split], name, "binary")
  if name == "stl10":
    return _read_stl10_binary(name, *paths)
  record = label_bytes + 3072
  images, labels = [], []
  for path in paths:
    raw = np.fromfile(path, np.uint8)
    if raw.size % record:
      raise DataError(f"{path} holds {raw.size} bytes, not a whole number of {record}-byte "
                      f"records ({label_bytes} label byte{'s' * (label_bytes > 1)} + 3072 image "
                      f"bytes); it is not {name}'s binary format or was cut short")
    raw = raw.reshape(-1, record)
    images.append(_cifar_rows(raw[:, label_bytes:]))
    labels.append(_check_labels(raw[:, label_index], NUM_CLASSES[name], name, path))
  return np.concatenate(images), np.concatenate(labels)


def _read_stl10_binary(name: str, x_path: pathlib.Path,
                       y_path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """STL-10's images: 96x96, one channel after another, each column-major; labels 1..10."""
  raw = np.fromfile(x_path, np.uint8)
  size = 3 * 96 * 96
  if raw.size % size:
    raise DataError(f"{x_path} holds {raw.size} bytes, not a whole number of {size}-byte "
                    "96x96x3 images; it is not STL-10's binary format or was cut short")
  images = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
  labels = np.fromfile(y_path, np.uint8).astype(np.int64) - 1
  if len(labels) != len(images):
    raise DataError(f"{y_path} holds {len(labels)} labels for the {len(images)} images of "
                    f"{x_path}")
  return images, _check_labels(labels, NUM_CLASSES[name], name, f"{y_path} (labels 1..10)")


def _read_npz(name: str, split: str, path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  x_key, y_key = f"x_{split}", f"y_{split}"
  try:
    with np.load(path, allow_pickle=False) as arrays:
      keys = set(arrays.files)
      if not {x_key, y_key} <= keys:
        raise DataError(f"{path} has no {x_key} and {y_key} (it holds: "
                        f"{', '.join(sorted(keys)) or 'nothing'}); an npz dataset holds "
                        "x_train, y_train, x_test, y_test")
      images, labels = arrays[x_key], arrays[y_key]
  except (OSError, ValueError, EOFError) as e:  # not a zip, or an object array (a pickle)
    raise DataError(f"cannot read {path} as .npz: {e}") from e
  if images.ndim == 3:
    images = images[..., None]
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3)
      or labels.shape != (len(images),)):
    raise DataError(f"{path}: {x_key} is {images.dtype} {images.shape} and {y_key} "
                    f"{labels.shape}; expected uint8 [N, H, W, C] (C 1 or 3) and N labels")
  return images, _check_labels(labels, NUM_CLASSES[name], name, f"{path} {y_key}")


def _read_folder(name: str, split: str, root: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  # Imported here: only this format decodes images. Pillow is already a dependency (tfds' image
  # features need it); it reads PNG and JPEG without TensorFlow.
  from PIL import Image  # pylint: disable=g-import-not-at-top

  classes = sorted({d.name for s in ("train", "test") if (root / s).is_dir()
                    for d in (root / s).iterdir() if d.is_dir() and not d.name.startswith(".")})
  if len(classes) != NUM_CLASSES[name]:
    raise DataError(f"{root} has {len(classes)} class folders under train/ and test/ "
                    f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}), but "
                    f"{name} has {NUM_CLASSES[name]} classes")
  split_dir = root / split
  paths = [(label, path) for label, cls in enumerate(classes) if (split_dir / cls).is_dir()
           for path in sorted((split_dir / cls).iterdir())
           if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
  if not paths:
    raise DataError(f"{split_dir} holds no images: the folder format reads "
                    f"{split_dir}/<class>/*{'|*'.join(IMAGE_SUFFIXES)}")
  images = None
  for row, (_, path) in enumerate(paths):
    try:
      with Image.open(path) as image:
        pixels = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    except OSError as e:
      raise DataError(f"cannot decode {path}: {e}") from e
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if images is None:
      images = np.empty((len(paths), *pixels.shape), np.uint8)
    elif pixels.shape != images.shape[1:]:
      raise DataError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} with {pixels.shape[2]} "
                      f"channels, but {paths[0][1]} is {images.shape[2]}x{images.shape[1]} with "
                      f"{images.shape[3]}; a split's images must all have one size")
    images[row] = pixels
  return images, np.array([label for label, _ in paths], np.int32)


class _NotPrepared(DataError):
  """No tfds build of the split where tfds looked."""


# A tfds split up to this many bytes of uint8 images is decoded once, when it is opened, and then
# held in memory like the other formats: tfds decodes each record in Python (~3,000 CIFAR images/s
# on one core, measured by `experiments/input_pipeline.py`), too slow to redo for every batch. A
# larger split is read a batch at a time.
TFDS_IN_MEMORY_BYTES = 4 << 30
_TFDS_READ_CHUNK = 4096


def _read_records(data_source: Any, keys: list[int],
                  stored_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images and int32 labels of the records `keys` of a tfds data source."""
  try:
    # One batched read (array_record fetches the records in parallel) ...
    examples = data_source.__getitems__(keys)
  except (AttributeError, TypeError):
    # ... where the source has it: under `tfds.testing.mock_data` (4.9.10) `__getitems__`
    # raises TypeError, so read one item at a time through the Sequence interface.
    examples = [data_source[key] for key in keys]
  images = np.empty((len(keys), *stored_shape), np.uint8)
  labels = np.empty((len(keys),), np.int32)
  for row, example in enumerate(examples):
    images[row] = example["image"]
    labels[row] = example["label"]
  return images, labels


class _TfdsSource(data.Source):
  """A split read from a tfds array_record data source, a batch at a time; nothing is cached.
  Only for splits larger than `TFDS_IN_MEMORY_BYTES`."""

  def __init__(self, name: str, split: str, data_source: Any, num_examples: int, num_classes: int,
               stored_shape: tuple[int, int, int], image_size: int | None,
               channels: int | None):
    height, width, stored_channels = stored_shape
    if image_size is not None:
      height = width = image_size
    super().__init__(name, split, num_examples, num_classes,
                     (height, width, channels or stored_channels))
    self._data_source = data_source
    self._stored_shape = stored_shape

  def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _read_records(self._data_source, [int(i) for i in indices],
                                   self._stored_shape)
    return data.scale_uint8(images, self.image_shape), labels


def _open_tfds(name: str, split: str, data_dir: str | None, image_size: int | None,
               channels: int | None, num_examples: int | None) -> data.Source:
  """A tfds dataset prepared as array_record, read with random access."""
  # Imported here: tensorflow_datasets is slow to import and only this format needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  how_to_prepare = (
      f"Prepare it on a machine with network access and tensorflow installed:\n"
      f"  tfds build {name} --file_format=array_record --data_dir=DIR\n"
      f"or in Python: tfds.builder({name!r}, data_dir=DIR, file_format='array_record')"
      f".download_and_prepare()\n"
      f"then copy DIR here and pass it as data_dir (--config.data.data_dir=DIR); or store it in "
      f"another format (gacd_jax.data_files).")
  where = data_dir or "tfds' default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  try:
    # download=False: tfds would otherwise try to download and prepare the data here.
    data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                   builder_kwargs={"file_format": "array_record"})
  except KeyError as e:
    # tfds' sign of a split that was never generated: its split dict is empty.
    raise _NotPrepared(f"{name} ({split} split) is not prepared in {where}. "
                       f"{how_to_prepare}") from e
  except NotImplementedError as e:
    # Prepared, but as TFRecord, which has no random access.
    raise DataError(f"{name} in {where} is not in array_record format, which random access "
                    f"needs. {how_to_prepare}") from e

  features = data_source.dataset_info.features
  stored_shape = tuple(features["image"].shape)
  if channels is not None and channels != stored_shape[-1]:
    raise ConfigError(f"{name} images have {stored_shape[-1]} channels, but channels={channels}")
  total = len(data_source)
  if num_examples is not None:
    data.check_num_examples(name, split, total, num_examples)
  count, num_classes = num_examples or total, features["label"].num_classes
  if count * int(np.prod(stored_shape)) > TFDS_IN_MEMORY_BYTES:
    return _TfdsSource(name, split, data_source, count, num_classes, stored_shape, image_size,
                       channels)
  images = np.empty((count, *stored_shape), np.uint8)
  labels = np.empty((count,), np.int32)
  logging.info("decoding %s (%s split, %d images) into memory", name, split, count)
  for start in range(0, count, _TFDS_READ_CHUNK):
    stop = min(start + _TFDS_READ_CHUNK, count)
    images[start:stop], labels[start:stop] = _read_records(data_source, list(range(start, stop)),
                                                           stored_shape)
  return StoredSource(name, split, images, labels, num_classes, image_size=image_size,
                      channels=channels)
