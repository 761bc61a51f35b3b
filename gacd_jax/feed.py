"""How batches reach the devices: their deterministic order, each host's slice, and a
background thread that reads the next batches while the devices work on this one.

Batching is stateless: the order of epoch `e` is a permutation drawn from `(seed, e)`, so a run
resumed at step `s` reads exactly the batches it would have read, without replaying the first `s`.
Every process computes the same global batch and reads only its own contiguous slice of it;
`to_global` then assembles the slices into arrays sharded on the mesh's `data` axis. `prefetch`
moves the reading (`Source.get`: indexing, scaling, resizing) and the transfer to the devices to a
background thread that works ahead of the steps, without changing the order.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

import jax
import numpy as np

from gacd_jax.errors import ConfigError

if TYPE_CHECKING:
  from gacd_jax.data import Source

Batch = dict[str, np.ndarray]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches in one epoch; the remainder examples are dropped (training only)."""
  if global_batch_size <= 0:
    raise ConfigError(f"global batch size must be positive, got {global_batch_size}")
  return num_examples // global_batch_size


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  """This host's share of a global batch, after checking the global batch divides evenly."""
  if global_batch_size <= 0:
    raise ConfigError(f"global batch size must be positive, got {global_batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if global_batch_size % process_count:
    raise ConfigError(f"global batch size {global_batch_size} is not divisible by the "
                      f"{process_count} processes")
  return global_batch_size // process_count


def train_batches(source: Source, *, global_batch_size: int, seed: int, epoch: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """This host's slices of one epoch's shuffled global batches, from step `start_step` on.

  Global batch `s` is `perm[s * GB:(s + 1) * GB]` with `perm` drawn from
  `np.random.default_rng([seed, epoch])`; the last `num_examples % GB` examples of `perm` are
  dropped. This host gets the contiguous slice `process_index` of `process_count` of each.

  Yields:
    `source.get` dicts of GB // process_count examples: image [n, H, W, C], label [n], index [n].

  Raises:
    ConfigError: (when called, not when first iterated) GB is not divisible by process_count or
      exceeds the split's size.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  if global_batch_size > source.num_examples:
    raise ConfigError(f"global batch size {global_batch_size} exceeds the {source.num_examples} "
                      f"examples of {source.name}/{source.split}")
  num_steps = steps_per_epoch(source.num_examples, global_batch_size)
  if not 0 <= start_step <= num_steps:
    raise ValueError(f"start_step {start_step} is not in [0, {num_steps}]")
  perm = np.random.default_rng([seed, epoch]).permutation(source.num_examples)

  def batches() -> Iterator[Batch]:
    for step in range(start_step, num_steps):
      begin = step * global_batch_size + process_index * local
      yield source.get(perm[begin:begin + local])

  return batches()


def eval_batches(source: Source, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """This host's slices of the split's global batches, in order, covering every example once.

  The last global batch is padded to full size, so every host runs the same number of steps with
  the same shapes. Padding rows repeat the split's last example and have mask False.

  Yields:
    `source.get` dicts of GB // process_count examples plus 'mask': bool [n], True = real example.

  Raises:
    ConfigError: (when called) GB is not divisible by process_count.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  num_steps = -(-source.num_examples // global_batch_size)

  def batches() -> Iterator[Batch]:
    for step in range(num_steps):
      begin = step * global_batch_size + process_index * local
      positions = np.arange(begin, begin + local)
      batch = source.get(np.minimum(positions, source.num_examples - 1))
      batch["mask"] = positions < source.num_examples
      yield batch

  return batches()


def train_stream(source: Source, *, global_batch_size: int, seed: int, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """This host's slices of the global batches from global step `start_step` on, epoch after
  epoch, without end: global step `s` is step `s % steps_per_epoch` of epoch
  `s // steps_per_epoch` of `train_batches`, which is what a run resumed at `s` reads.

  Raises:
    ConfigError: (when called) as `train_batches`.
  """
  num_steps = steps_per_epoch(source.num_examples, global_batch_size)
  epoch, step = divmod(start_step, num_steps) if num_steps else (0, 0)
  kwargs = dict(global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                process_count=process_count)
  first = train_batches(source, epoch=epoch, start_step=step, **kwargs)

  def stream() -> Iterator[Batch]:
    yield from first
    for later in range(epoch + 1, 2**62):
      yield from train_batches(source, epoch=later, **kwargs)

  return stream()


_END = object()


class Prefetch:
  """The batches of an iterator, read and put on the devices by a background thread ahead of
  their use; the same batches in the same order as the iterator.

  The thread pulls host batches from `batches` (where `Source.get` reads, decodes and scales
  them), calls `put` on each (`to_global`: the transfer to the devices) and queues the result;
  `next` returns the oldest. With `buffer` batches queued and one more in the thread's hands,
  the batches after the one a step runs on are already on the devices whenever reading keeps up
  with the steps. An exception raised while reading is raised by the `next` that would have
  returned the batch it failed on. `close` (or leaving a `with` block) stops the thread; it is a
  daemon, so it never holds up the process's exit. Nothing is read before the first `next`.

  Attributes:
    wait_seconds: the time `next` spent blocked, waiting for the thread: the consumer's time lost
      to input.
  """

  def __init__(self, batches: Iterator[Batch], put: Callable[[Batch], dict] = lambda b: b, *,
               buffer: int = 2):
    if buffer < 1:
      raise ValueError(f"buffer must be >= 1, got {buffer}")
    self._batches = batches
    self._put = put
    self._queue: queue.Queue = queue.Queue(maxsize=buffer)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._finished = False
    self.wait_seconds = 0.0

  def _produce(self) -> None:
    try:
      for batch in self._batches:
        if not self._offer(self._put(batch)):
          return
      self._offer(_END)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by the consumer)
      self._offer(e)

  def _offer(self, item) -> bool:
    """Queue `item` unless closed first; False if closed."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self) -> Prefetch:
    return self

  def __next__(self) -> dict:
    if self._finished or self._stop.is_set():
      raise StopIteration
    if self._thread is None:
      self._thread = threading.Thread(target=self._produce, name="gacd-prefetch", daemon=True)
      self._thread.start()
    tic = time.perf_counter()
    item = self._queue.get()
    self.wait_seconds += time.perf_counter() - tic
    if item is _END or isinstance(item, BaseException):
      self._finished = True
      if item is _END:
        raise StopIteration
      raise item
    return item

  def close(self) -> None:
    """Stop the thread (at its next batch) and drop what it read ahead."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)

  def __enter__(self) -> Prefetch:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def prefetch(batches: Iterator[Batch], sharding: jax.sharding.NamedSharding | None = None, *,
             buffer: int = 2) -> Prefetch:
  """`batches` read ahead by a background thread, which also makes each a global array on
  `sharding` (`to_global`); host arrays unchanged when `sharding` is None."""
  put = (lambda batch: to_global(batch, sharding)) if sharding is not None else (lambda b: b)
  return Prefetch(batches, put, buffer=buffer)


def to_global(batch: dict[str, np.ndarray],
              sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Assembles every host's slice into global arrays.

  Args:
    batch: this host's arrays, leading dim = the local batch size.
    sharding: how to lay out the leading (batch) dim, normally PartitionSpec('data') on the mesh.

  Returns:
    The same keys; each array's leading dim is the global batch size.
  """
  if jax.process_count() == 1:  # the same arrays, in one transfer
    return jax.device_put(batch, sharding)
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in batch.items()}
