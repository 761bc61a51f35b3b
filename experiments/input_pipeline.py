"""The input pipeline's speed, the `input_pipeline` row of `experiments/benchmark.py`:

  python -m experiments.benchmark --only input_pipeline            # 10,000 images a format
  python -m experiments.benchmark --only input_pipeline --num-examples 2048 --batch 64

For each stored format, a CIFAR-10 of random 32x32x3 images (`--num-examples` train, a tenth as
many test) is written to a temporary directory (`tempfile`), then:

- open: seconds to open the train split (parse, unpickle or decode every image), and images/s.
- sync: images/s when each batch is read and put on the device in the loop, one after the other
  (`Source.get` + `feed.to_global`, waiting for the transfer): the cost the step would see
  without the prefetcher.
- delivered: images/s per host that `feed.prefetch(feed.train_stream(...))` hands over as device
  arrays, ready (`block_until_ready`), with no step to overlap: the pipeline's ceiling.
- train wait: `train.train` of a small model (small_cnn, width 16, natural) on those files,
  `--batch` a step, 60 steps; the share of the loop's wall time spent in `next(batches)`
  (`input_wait` in metrics.jsonl), over the steps after the first logging interval (which holds
  the compilation), with the step's own throughput.

tfds array_record is measured where TensorFlow is installed (tfds needs it to write the files, not
to read them): `formats()` says which formats this environment can write, and `run` prints the
ones it leaves out.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from gacd_jax import config as config_lib
from gacd_jax import data
from gacd_jax import feed
from gacd_jax import sharding
from gacd_jax import train

FORMATS = ("python", "binary", "folder", "npz", "tfds")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def write_cifar10(root: pathlib.Path, fmt: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]):
  """Write `splits` ({split: (uint8 [N, 32, 32, 3], labels [N])}) as CIFAR-10 in format `fmt`."""
  rows = lambda images: images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # noqa: E731
  if fmt == "tfds":
    _write_tfds(root, splits)
  elif fmt == "npz":
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "cifar10.npz", **{f"{x}_{split}": v for split, pair in splits.items()
                                      for x, v in zip("xy", pair)})
  elif fmt == "python":
    where = root / "cifar-10-batches-py"
    where.mkdir(parents=True)
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]),
                         ("test", ["test_batch"])):
      images, labels = splits[split]
      for file, part in zip(files, np.array_split(np.arange(len(labels)), len(files))):
        batch = {b"data": rows(images[part]), b"labels": labels[part].tolist()}
        (where / file).write_bytes(pickle.dumps(batch, protocol=2))
  elif fmt == "binary":
    where = root / "cifar-10-batches-bin"
    where.mkdir(parents=True)
    for split, files in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]),
                         ("test", ["test_batch.bin"])):
      images, labels = splits[split]
      records = np.concatenate([labels[:, None].astype(np.uint8), rows(images)], axis=1)
      for file, part in zip(files, np.array_split(records, len(files))):
        (where / file).write_bytes(part.tobytes())
  else:
    for split, (images, labels) in splits.items():
      for cls in CLASSES:
        (root / split / cls).mkdir(parents=True)
      for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(root / split / CLASSES[label] / f"{i:05d}.png")


def formats() -> tuple[str, ...]:
  """The `FORMATS` this environment can write: tfds only with TensorFlow installed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  has_tensorflow = importlib.util.find_spec("tensorflow") is not None
  return tuple(f for f in FORMATS if f != "tfds" or has_tensorflow)


def _write_tfds(root: pathlib.Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
  """CIFAR-10 as tfds' own build writes it (`tfds build cifar10 --file_format=array_record`):
  its features and version, array_record files under `root/cifar10/3.0.2/`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = tfds.features.FeaturesDict({
      "id": tfds.features.Text(), "image": tfds.features.Image(shape=(32, 32, 3)),
      "label": tfds.features.ClassLabel(names=CLASSES)})
  examples = {split: [(i, {"id": f"{split}_{i:05d}", "image": image, "label": int(label)})
                      for i, (image, label) in enumerate(zip(*pair))]  # (key, example)
              for split, pair in splits.items()}
  tfds.dataset_builders.store_as_tfds_dataset(
      name="cifar10", version="3.0.2", features=features, split_datasets=examples,
      data_dir=str(root), file_format="array_record", disable_shuffling=True)


def _rate(images: int, seconds: float) -> str:
  return f"{images / seconds:,.0f}"


def measure(fmt: str, where: pathlib.Path, batch: int, steps: int) -> dict[str, str]:
  """One table row: open, sync and delivered rates of format `fmt` stored in `where`."""
  tic = time.perf_counter()
  source = data.build("cifar10", "train", data_dir=str(where), data_format=fmt)
  opened = time.perf_counter() - tic
  put = sharding.batch_sharding(sharding.make_mesh())
  order = feed.train_stream(source, global_batch_size=batch, seed=0)
  tic = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(feed.to_global(next(order), put))
  sync = time.perf_counter() - tic
  with feed.prefetch(feed.train_stream(source, global_batch_size=batch, seed=0), put) as stream:
    jax.block_until_ready(next(stream))  # the thread started, the first batch read
    tic = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(next(stream))
    delivered = time.perf_counter() - tic
  return {"format": fmt, "open s": f"{opened:.2f}", "open img/s": _rate(source.num_examples, opened),
          "sync img/s": _rate(batch * steps, sync),
          "delivered img/s": _rate(batch * steps, delivered)}


def train_wait(fmt: str, where: pathlib.Path, workdir: pathlib.Path, batch: int,
               steps: int = 60, log_every: int = 20) -> dict[str, str]:
  """`input_wait` and steps/s of a small model's train loop on format `fmt`, after compiling."""
  c = config_lib.default()
  c.model.small_cnn.width = 16
  c.method.name = "natural"
  c.data.update(name="cifar10", data_dir=str(where), format=fmt)
  c.train.update(batch_size=batch, epochs=100, log_every=log_every, checkpoint_every=10**6)
  c.optim.schedule = "constant"
  train.train(c, str(workdir), progress=False, stop_after=steps)
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  later = logged[1:]  # the first interval holds the compilation
  wait = float(np.mean([line["input_wait"] for line in later]))
  rate = float(np.mean([line["steps_per_s"] for line in later]))
  return {"train wait %": f"{100 * wait:.2f}", "train img/s": f"{batch * rate:,.0f}"}


def run(num_examples: int, batch: int, steps: int = 50) -> list[dict[str, str]]:
  """Every format's row, from files written to a temporary directory (removed after)."""
  rng = np.random.default_rng(0)
  splits = {split: (rng.integers(256, size=(n, 32, 32, 3), dtype=np.uint8),
                    np.sort(rng.integers(10, size=n)))
            for split, n in (("train", num_examples), ("test", max(num_examples // 10, 1)))}
  rows = []
  for fmt in sorted(set(FORMATS) - set(formats())):
    print(f"- {fmt}: not measured (writing it needs TensorFlow: pip install tensorflow-cpu)")
  with tempfile.TemporaryDirectory(prefix="gacd_input_") as tmp:
    for fmt in formats():
      where = pathlib.Path(tmp) / fmt
      write_cifar10(where, fmt, splits)
      row = measure(fmt, where, batch, steps)
      row.update(train_wait(fmt, where, pathlib.Path(tmp) / f"run_{fmt}", batch))
      rows.append(row)
  return rows
