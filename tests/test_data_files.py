"""CIFAR-10/100 and STL-10 as people store them (gacd_jax.data_files): every format reads the same
images and labels, trains and evaluates to the same numbers; pickled code never runs; bad input
is one clear error.

Every dataset here is written by the test itself (CIFAR-shaped, a few images): nothing is
downloaded. The CIFAR-10 python batches are written byte by byte as Python 2's pickle wrote the
official files (str as BINSTRING, arrays through `numpy.core.multiarray._reconstruct`).
"""

import json
import os
import pathlib
import pickle
import struct

import jax
import numpy as np
import pytest
from PIL import Image

from gacd_jax import checkpoints
from gacd_jax import cli
from gacd_jax import data
from gacd_jax import data_files
from gacd_jax import evaluate
from gacd_jax import runtime
from gacd_jax import train
from gacd_jax.errors import ConfigError, DataError
from tests import helpers

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")  # the official names, already in sorted order
SIZES = {"train": 20, "test": 10}


def _dataset(name: str, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per split: uint8 images [N, H, W, 3] and labels [N], ordered by label (the folder format
  orders examples by class, so every format then holds them in one order)."""
  rng = np.random.default_rng(seed)
  num_classes, side = data_files.NUM_CLASSES[name], 96 if name == "stl10" else 32
  out = {}
  for split, n in SIZES.items():
    labels = np.sort(rng.integers(num_classes, size=n)).astype(np.int64)
    out[split] = rng.integers(256, size=(n, side, side, 3), dtype=np.uint8), labels
  return out


def _chw_rows(images: np.ndarray) -> np.ndarray:
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _py2_pickle(batch: dict[bytes, object]) -> bytes:
  """`batch` pickled as Python 2's cPickle (protocol 2) and numpy 1 wrote the official files."""
  def string(b):  # BINSTRING: a Python 2 str
    return b"T" + struct.pack("<i", len(b)) + b

  def integer(v):  # BININT
    return b"J" + struct.pack("<i", v)

  out = [b"\x80\x02}("]  # PROTO 2, EMPTY_DICT, MARK
  for key, value in batch.items():
    out.append(string(key))
    if isinstance(value, np.ndarray):  # _reconstruct(ndarray, (0,), 'b'), then its state
      out += [b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n", integer(0), b"\x85",
              string(b"b"), b"\x87R(", integer(1), *map(integer, value.shape), b"\x86",
              b"cnumpy\ndtype\n", string(b"u1"), integer(0), integer(1), b"\x87R(", integer(3),
              string(b"|"), b"NNN", integer(-1), integer(-1), integer(0), b"tb", b"\x89",
              string(value.tobytes()), b"tb"]
    else:
      out.append(b"](" + b"".join(integer(v) if isinstance(v, int) else string(v)
                                  for v in value) + b"e")
  return b"".join(out + [b"u."])


def _write_python(name, dataset, root: pathlib.Path) -> None:
  if name == "cifar10":
    where = root / "cifar-10-batches-py"
    where.mkdir(parents=True)
    images, labels = dataset["train"]
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5)):
      (where / f"data_batch_{i + 1}").write_bytes(_py2_pickle({
          b"batch_label": [b"training batch"], b"labels": [int(v) for v in labels[part]],
          b"data": _chw_rows(images[part]), b"filenames": [b"x.png"] * len(part)}))
    images, labels = dataset["test"]
    (where / "test_batch").write_bytes(_py2_pickle(
        {b"labels": [int(v) for v in labels], b"data": _chw_rows(images)}))
  else:  # re-pickled by Python 3: protocol 2 (bytes via _codecs.encode) and 5 (_frombuffer)
    where = root / "cifar-100-python"
    where.mkdir(parents=True)
    for split, protocol in (("train", 2), ("test", 5)):
      images, labels = dataset[split]
      batch = {b"fine_labels": [int(v) for v in labels],
               b"coarse_labels": [int(v) // 5 for v in labels], b"data": _chw_rows(images)}
      (where / split).write_bytes(pickle.dumps(batch, protocol=protocol))


def _write_binary(name, dataset, root: pathlib.Path) -> None:
  if name == "stl10":
    where = root / "stl10_binary"
    where.mkdir(parents=True)
    for split, (images, labels) in dataset.items():  # column-major planes, labels 1..10
      (where / f"{split}_X.bin").write_bytes(images.transpose(0, 3, 2, 1).tobytes())
      (where / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    return
  folder = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary"}[name]
  where = root / folder
  where.mkdir(parents=True)
  for split, (images, labels) in dataset.items():
    label_bytes = (labels[:, None] if name == "cifar10" else
                   np.stack([labels // 5, labels], axis=1)).astype(np.uint8)
    records = np.concatenate([label_bytes, _chw_rows(images)], axis=1)
    if name == "cifar100":
      (where / f"{split}.bin").write_bytes(records.tobytes())
    elif split == "test":
      (where / "test_batch.bin").write_bytes(records.tobytes())
    else:
      for i, part in enumerate(np.array_split(records, 5)):
        (where / f"data_batch_{i + 1}.bin").write_bytes(part.tobytes())


def _class_names(name):
  return CIFAR10_CLASSES if name != "cifar100" else [f"class_{k:03d}" for k in range(100)]


def _write_folder(name, dataset, root: pathlib.Path) -> None:
  classes = _class_names(name)
  for split, (images, labels) in dataset.items():
    for cls in (*classes, ".ipynb_checkpoints"):  # a hidden folder is no class
      (root / split / cls).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels)):
      Image.fromarray(image).save(root / split / classes[label] / f"{i:05d}.png")


def _write_npz(name, dataset, root: pathlib.Path) -> None:
  root.mkdir(parents=True, exist_ok=True)
  (x_train, y_train), (x_test, y_test) = dataset["train"], dataset["test"]
  np.savez(root / f"{name}.npz", x_train=x_train, y_train=y_train[:, None], x_test=x_test,
           y_test=y_test[:, None])  # labels [N, 1], as keras.datasets returns them


WRITERS = {"python": _write_python, "binary": _write_binary, "folder": _write_folder,
           "npz": _write_npz}


def _formats(name):
  return [fmt for fmt in WRITERS if fmt != "python" or name != "stl10"]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
  """{name: (dataset, {format: data_dir})} for cifar10, cifar100 and stl10 in every format."""
  out = {}
  for name in data_files.NUM_CLASSES:
    dataset = _dataset(name, seed=len(out))
    dirs = {}
    for fmt in _formats(name):
      dirs[fmt] = tmp_path_factory.mktemp(f"{name}_{fmt}")
      WRITERS[fmt](name, dataset, dirs[fmt])
    out[name] = dataset, dirs
  return out


@pytest.mark.parametrize("name", list(data_files.NUM_CLASSES))
def test_every_format_reads_the_same_images_and_labels(stored, name):
  dataset, dirs = stored[name]
  for split, (images, labels) in dataset.items():
    for fmt, where in dirs.items():
      assert data_files.detect(name, str(where)) == fmt
      for data_format in (fmt, "auto"):
        source = data.build(name, split, data_dir=str(where), data_format=data_format)
        assert (source.num_examples, source.num_classes) == (len(labels),
                                                             data_files.NUM_CLASSES[name])
        assert source.image_shape == images.shape[1:]
        batch = source.get(np.arange(source.num_examples))
        np.testing.assert_array_equal(batch["label"], labels, err_msg=f"{fmt} {split}")
        assert batch["image"].dtype == np.float32
        np.testing.assert_array_equal(batch["image"], images / np.float32(255),
                                      err_msg=f"{fmt} {split}")
        np.testing.assert_array_equal(source.labels(), labels)


def test_the_official_folder_itself_and_the_options_of_other_sources(stored):
  dataset, dirs = stored["cifar10"]
  inside = dirs["binary"] / "cifar-10-batches-bin"
  source = data.build("cifar10", "test", data_dir=str(inside), image_size=16, num_examples=6,
                      classes=(1, 0, 2, 3, 4, 5, 6, 7, 8, 9))
  assert data_files.detect("cifar10", str(inside)) == "binary"
  assert source.image_shape == (16, 16, 3) and source.num_examples == 6
  labels = dataset["test"][1]
  np.testing.assert_array_equal(source.labels(), np.select([labels == 1, labels == 0],
                                                           [0, 1], labels)[:6])
  npz = data.build("cifar10", "test", data_dir=str(dirs["npz"] / "cifar10.npz"), image_size=16)
  np.testing.assert_allclose(source.get(np.arange(6))["image"],
                             npz.get(np.arange(6))["image"], atol=1e-6)


def test_a_grey_jpeg_folder_is_tiled_to_the_channels_asked_for(tmp_path):
  rng = np.random.default_rng(0)
  for cls in CIFAR10_CLASSES:
    (tmp_path / "test" / cls).mkdir(parents=True)
  smooth = np.kron(rng.integers(256, size=(4, 4)), np.ones((8, 8))).astype(np.uint8)
  Image.fromarray(smooth).save(tmp_path / "test" / "cat" / "a.JPG", quality=95)
  source = data.build("cifar10", "test", data_dir=str(tmp_path), channels=3)
  batch = source.get(np.arange(1))
  assert source.image_shape == (32, 32, 3) and batch["label"][0] == 3
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
  assert np.abs(batch["image"][0, ..., 0] * 255 - smooth).mean() < 3  # lossy, but this image


def test_tfds_reads_a_batch_in_one_call_where_the_source_can():
  calls = []

  class Records(list):

    def __getitems__(self, keys):
      calls.append(list(keys))
      return [self[k] for k in keys]

  examples = [{"image": np.full((32, 32, 3), i, np.uint8), "label": i % 10} for i in range(8)]
  for source_type in (Records, list):  # a plain list: item by item
    source = data_files._TfdsSource("cifar10", "train", source_type(examples), 8, 10,  # pylint: disable=protected-access
                                    (32, 32, 3), None, None)
    batch = source.get(np.array([5, 2]))
    np.testing.assert_array_equal(batch["label"], [5, 2])
    assert batch["image"][1].max() == np.float32(2 / 255)
  assert calls == [[5, 2]]


# --- pickled code never runs --------------------------------------------------------------------

class _Touch:
  """Unpickling this calls os.system: what a malicious 'CIFAR batch' would do."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("nested", [False, True])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(stored, tmp_path, nested):
  _, dirs = stored["cifar10"]
  where = tmp_path / "cifar-10-batches-py"
  where.mkdir()
  for file in (dirs["python"] / "cifar-10-batches-py").iterdir():
    (where / file.name).write_bytes(file.read_bytes())
  control, marker = tmp_path / "control", tmp_path / "marker"
  pickle.loads(pickle.dumps(_Touch(control)))  # the payload works when unpickled plainly ...
  assert control.exists()
  payload = ({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": _Touch(marker)}
             if nested else _Touch(marker))
  (where / "data_batch_2").write_bytes(pickle.dumps(payload, protocol=2))
  with pytest.raises(DataError) as error:  # ... and not through the reader
    data.build("cifar10", "train", data_dir=str(tmp_path))
  message = str(error.value)
  assert "refusing to unpickle" in message and str(where / "data_batch_2") in message
  assert "system" in message and "\n" not in message
  assert not marker.exists()
  # The restricted unpickler still reads every file it allows.
  assert data.build("cifar10", "test", data_dir=str(tmp_path)).num_examples == SIZES["test"]


# --- bad input ----------------------------------------------------------------------------------

def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  for path in src.rglob("*"):
    target = dst / path.relative_to(src)
    if path.is_dir():
      target.mkdir(parents=True, exist_ok=True)
    else:
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(path.read_bytes())
  return dst


def _break(kind: str, dirs: dict, tmp: pathlib.Path) -> tuple[str, str]:
  """Damage a copy of one stored cifar10 in one way: (data_dir, format)."""
  if kind == "missing_file":
    root = _copy(dirs["python"], tmp)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    return str(root), "auto"
  if kind == "another_format_named":
    return str(_copy(dirs["binary"], tmp)), "npz"
  if kind == "cut_short":
    root = _copy(dirs["binary"], tmp)
    path = root / "cifar-10-batches-bin" / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-100])
    return str(root), "binary"
  if kind == "label_out_of_range":
    root = _copy(dirs["binary"], tmp)
    path = root / "cifar-10-batches-bin" / "data_batch_1.bin"
    raw = bytearray(path.read_bytes())
    raw[0] = 10
    path.write_bytes(bytes(raw))
    return str(root), "auto"
  if kind == "not_a_batch":
    root = _copy(dirs["python"], tmp)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(
        pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, protocol=4))
    return str(root), "python"
  tmp.mkdir()
  if kind == "npz_wrong_shape":
    np.savez(tmp / "cifar10.npz", x_train=np.zeros((4, 3, 32, 32), np.float32),
             y_train=np.zeros(4, np.int64))
  elif kind == "npz_missing_key":
    np.savez(tmp / "cifar10.npz", x_test=np.zeros((4, 32, 32, 3), np.uint8))
  elif kind == "npz_label_out_of_range":
    np.savez(tmp / "cifar10.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8),
             y_train=np.array([3, -1]))
  elif kind == "npz_with_a_pickle":
    np.savez(tmp / "cifar10.npz", x_train=np.array([object()] * 2, dtype=object),
             y_train=np.zeros(2, np.int64))
  elif kind in ("folder_without_images", "folder_of_11_classes", "folder_of_two_sizes"):
    for cls in CIFAR10_CLASSES + (("extra",) if kind == "folder_of_11_classes" else ()):
      (tmp / "train" / cls).mkdir(parents=True)
    (tmp / "train" / "cat" / "notes.txt").write_text("not an image")
    if kind == "folder_of_two_sizes":
      Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp / "train" / "cat" / "a.png")
      Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(tmp / "train" / "dog" / "b.png")
  elif kind == "two_formats":
    _copy(dirs["npz"], tmp)
    _copy(dirs["binary"], tmp)
  elif kind == "nothing_there":
    pass
  return str(tmp), "auto"


BAD = [
    ("missing_file", "data_batch_3 is missing"),
    ("another_format_named", "found no cifar10 in npz format in"),
    ("cut_short", "not a whole number of 3073-byte records"),
    ("label_out_of_range", "labels run from 0 to 10, outside cifar10's 0 .. 9"),
    ("not_a_batch", "a CIFAR batch holds uint8 [N, 3072]"),
    ("npz_wrong_shape", "expected uint8 [N, H, W, C]"),
    ("npz_missing_key", "has no x_train and y_train (it holds: x_test)"),
    ("npz_label_out_of_range", "labels run from -1 to 3"),
    ("npz_with_a_pickle", "cannot read"),
    ("folder_without_images", "holds no images"),
    ("folder_of_11_classes", "11 class folders"),
    ("folder_of_two_sizes", "a split's images must all have one size"),
    ("two_formats", "in several formats: binary"),
    ("nothing_there", "found no cifar10 in"),
]


@pytest.mark.parametrize("kind,fragment", BAD, ids=[k for k, _ in BAD])
def test_bad_stored_data_is_one_clear_data_error(stored, tmp_path, kind, fragment):
  data_dir, data_format = _break(kind, stored["cifar10"][1], tmp_path / "data")
  with pytest.raises(DataError) as error:
    data.build("cifar10", "train", data_dir=data_dir, data_format=data_format)
  message = str(error.value)
  assert fragment in message and "\n" not in message, message
  assert data_dir in message  # names where it looked


@pytest.mark.parametrize("name,data_format,fragment", [
    ("cifar10", "hdf5", "unknown data format 'hdf5'"),
    ("stl10", "python", "stl10 has no official python format"),
    ("digits", "npz", "applies to cifar10, cifar100, stl10 only"),
])
def test_a_format_that_cannot_be_is_a_config_error(name, data_format, fragment):
  with pytest.raises(ConfigError, match=fragment):
    data.build(name, "train", data_dir="/nonexistent", data_format=data_format)


@pytest.mark.parametrize("overrides,fragment", [
    (("--config.data.format=hdf5",), "unknown data format 'hdf5'"),
    (("--config.data.data_dir={tmp}/nowhere",), "does not exist"),
    (("--config.data.data_dir={tmp}/data",), "labels run from 0 to 10"),
])
def test_bad_data_at_the_command_line_is_one_line_and_exit_code_2(stored, tmp_path, capsys,
                                                                  monkeypatch, overrides,
                                                                  fragment):
  monkeypatch.setenv(runtime.CACHE_ENV, os.environ["JAX_COMPILATION_CACHE_DIR"])
  _break("label_out_of_range", stored["cifar10"][1], tmp_path / "data")
  argv = ["gacd-jax", "train", f"--config={helpers.REPO}/configs/digits.py:natural",
          f"--workdir={tmp_path}/run", "--config.data.name=cifar10", "--config.data.channels=0",
          "--config.data.image_size=0", *(o.format(tmp=tmp_path) for o in overrides)]
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert exit_info.value.code == 2 and "Traceback" not in err, err
  assert len(lines) == 1 and fragment in lines[0], err
  assert not (tmp_path / "run").exists()


# --- the same run from every format -------------------------------------------------------------

def test_every_format_trains_and_evaluates_to_the_same_numbers(stored, tmp_path):
  _, dirs = stored["cifar10"]
  results = {}
  for fmt, where in dirs.items():
    c = helpers.tiny_config("natural", width=4)
    c.data.update(name="cifar10", image_size=0, channels=0, num_examples=0, data_dir=str(where),
                  format=fmt, crop_padding=4)
    c.train.batch_size = 8  # 2 steps an epoch
    c.train.log_every = c.train.checkpoint_every = 1
    c.eval.update(batch_size=8, max_examples=0, eps=8 / 255)
    workdir = tmp_path / fmt
    metrics = train.train(c, str(workdir), progress=False)
    assert 0 <= metrics.pop("input_wait") <= 1
    metrics.pop("steps_per_s")
    module, variables = checkpoints.load_model(str(workdir))
    accuracy, _ = evaluate.evaluate_model(
        evaluate.logits_fn(module), variables, evaluate.test_source(c),
        evaluate.EvalSettings.from_config(c.eval), names=("clean", "fgsm"))
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in logged]
    results[fmt] = metrics, accuracy, losses, jax.tree.leaves(variables)
  (metrics, accuracy, losses, params), *others = results.values()
  assert len(losses) == 2 and np.isfinite(losses).all()
  for fmt, other in zip(list(results)[1:], others):
    assert other[:3] == (metrics, accuracy, losses), fmt
    for a, b in zip(params, other[3]):
      np.testing.assert_array_equal(a, b, err_msg=fmt)
