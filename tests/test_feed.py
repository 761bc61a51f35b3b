"""gacd_jax.feed: the endless training stream is the epochs' batches in order, and the prefetcher
delivers exactly its iterator's batches, reading them in another thread, ahead of time."""

import threading
import time

import jax
import numpy as np
import pytest

from gacd_jax import data
from gacd_jax import feed
from gacd_jax import sharding


class _Recording(data.Source):
  """Random images; records which thread read which positions, optionally slowly or failing."""

  def __init__(self, num_examples=40, delay=0.0, fail_at_read=None):
    super().__init__("recording", "train", num_examples, 3, (2, 2, 1))
    self.reads = []  # (thread ident, positions)
    self.delay = delay
    self.fail_at_read = fail_at_read

  def _read(self, indices):
    if len(self.reads) == self.fail_at_read:
      raise OSError(f"disk error at read {self.fail_at_read}")
    self.reads.append((threading.get_ident(), indices.copy()))
    time.sleep(self.delay)
    rng = np.random.default_rng(indices)
    return rng.uniform(size=(len(indices), 2, 2, 1)).astype(np.float32), indices % 3


def _indices(batches):
  return [b["index"] for b in batches]


def test_train_stream_chains_the_epochs_and_resumes_at_any_step():
  source = _Recording(num_examples=37)
  kwargs = dict(global_batch_size=8, seed=3)
  epochs = [b for e in range(3) for b in data.train_batches(source, epoch=e, **kwargs)]
  assert len(epochs) == 3 * 4  # 4 full batches an epoch, the remainder dropped
  stream = feed.train_stream(source, **kwargs)
  np.testing.assert_array_equal(np.stack(_indices(next(stream) for _ in epochs)),
                                np.stack(_indices(epochs)))
  for start in (0, 3, 4, 9):
    resumed = feed.train_stream(source, start_step=start, **kwargs)
    np.testing.assert_array_equal(
        np.stack(_indices(next(resumed) for _ in epochs[start:])), np.stack(_indices(epochs[start:])))
  with pytest.raises(data.ConfigError, match="exceeds"):
    feed.train_stream(source, global_batch_size=64, seed=0)


def test_prefetch_delivers_the_same_batches_read_in_another_thread():
  source = _Recording()
  expected = list(data.train_batches(source, global_batch_size=8, seed=1, epoch=0))
  source.reads.clear()
  mesh = sharding.make_mesh()
  with feed.prefetch(data.train_batches(source, global_batch_size=8, seed=1, epoch=0),
                     sharding.batch_sharding(mesh)) as batches:
    delivered = list(batches)
  assert len(delivered) == len(expected) == 5
  for got, want in zip(delivered, expected):
    assert set(got) == set(want)
    for key in want:
      assert isinstance(got[key], jax.Array)
      np.testing.assert_array_equal(np.asarray(got[key]), want[key])
  assert {thread for thread, _ in source.reads} != {threading.get_ident()}
  assert threading.get_ident() not in {thread for thread, _ in source.reads}


def test_prefetch_reads_and_puts_ahead_in_its_thread_and_nothing_before_the_first_next():
  puts = []

  def put(batch):
    puts.append((threading.get_ident(), int(batch["index"][0])))
    return batch

  source = _Recording(num_examples=80)  # 10 batches
  batches = feed.Prefetch(data.eval_batches(source, global_batch_size=8), put, buffer=2)
  time.sleep(0.1)
  assert not source.reads and not puts
  got = []
  for _ in range(3):
    got.append(int(next(batches)["index"][0]))
    time.sleep(0.1)  # a step; meanwhile the thread fills its queue again
    # The batches after the one returned are on the devices already.
    assert [first for _, first in puts][:len(got) + 2] == [8 * i for i in range(len(got) + 2)]
  assert got == [0, 8, 16]
  assert threading.get_ident() not in {thread for thread, _ in puts}
  # 3 batches taken, 2 in the queue, 1 read and put, waiting to go in.
  assert len(source.reads) == len(puts) == 3 + 2 + 1
  batches.close()
  assert not batches._thread.is_alive()  # pylint: disable=protected-access
  with pytest.raises(StopIteration):
    next(batches)


def test_an_error_while_reading_comes_at_the_batch_it_concerns():
  source = _Recording(fail_at_read=3)
  batches = feed.prefetch(data.eval_batches(source, global_batch_size=8))
  assert [int(next(batches)["index"][0]) for _ in range(3)] == [0, 8, 16]
  with pytest.raises(OSError, match="disk error at read 3"):
    next(batches)
  with pytest.raises(StopIteration):
    next(batches)


def test_close_stops_an_endless_stream():
  source = _Recording()
  batches = feed.prefetch(feed.train_stream(source, global_batch_size=8, seed=0))
  next(batches)
  batches.close()
  assert not batches._thread.is_alive()  # pylint: disable=protected-access
  reads = len(source.reads)
  time.sleep(0.1)
  assert len(source.reads) == reads


def test_reading_overlaps_the_consumer_s_work():
  """Reads of 0.1 s and 0.1 s of work a batch: the consumer waits for the first read, then
  hardly at all (sleeps need no CPU, so a loaded machine does not change this)."""
  source = _Recording(delay=0.1)
  batches = feed.prefetch(data.eval_batches(source, global_batch_size=4))  # 10 batches
  tic = time.perf_counter()
  for _ in batches:
    time.sleep(0.1)
  elapsed = time.perf_counter() - tic
  assert elapsed < 1.6  # 2.0 s one after the other
  assert batches.wait_seconds < 0.5  # 1.0 s of reading
