"""The evaluation loop: one compiled, mesh-sharded map over a data split, cached per function.

Every report (`evaluate`'s accuracies, `analysis`'s features and curves, `probe`, AutoAttack's
clean pass) maps a per-batch function over examples:

  fn(variables, x [B, H, W, C] in [0, 1], y [B], rng, *args) -> {name: [B, ...]}

`map_split` reads a split in global batches (each host its slice, the last batch padded and
masked), runs `fn` as one jit over the mesh (batch on `data`, variables replicated) and gathers
the real examples' outputs on every host, in the split's order.

The jit is cached per `fn` (`compiled`), so `fn` should be hashable and equal for the same
computation: a frozen dataclass of what it depends on (a Linen module, an attack's settings), not
a lambda made per call, which would compile anew each time. The variables, the key and `args`
(e.g. eps) are arguments of the jit, never constants in it, so another run of the same
architecture, another seed or eps reuses the compilation (one per batch shape).
"""

import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from gacd_jax import data
from gacd_jax import feed
from gacd_jax import sharding

# (variables, x, y, rng, *args) -> {name: [B, ...]}
MapFn = Callable[..., dict[str, jax.Array]]


def cache_if_hashable(maxsize: int) -> Callable[[Callable], Callable]:
  """Decorator for a function that builds a compiled function: memoised on its arguments when
  they are all hashable (so equal models reuse one compilation); an unhashable argument (e.g. a
  mutable dataclass instance) builds afresh, and so compiles on every call."""
  def decorate(build: Callable) -> Callable:
    cached = functools.lru_cache(maxsize=maxsize)(build)

    @functools.wraps(build)
    def build_or_reuse(*args):
      try:
        hash(args)
      except TypeError:
        return build(*args)
      return cached(*args)
    return build_or_reuse
  return decorate


@cache_if_hashable(maxsize=64)
def compiled(fn: MapFn) -> Callable:
  """`(variables, batch, rng, args) -> ({name: [B, ...]}, mask, index)`: `fn` on a global batch
  (a dict with 'image', 'label', 'mask', 'index'), jitted; the same function for equal `fn`s
  (`cache_if_hashable`)."""
  @jax.jit
  def run(variables, batch, rng, args):
    out = fn(variables, batch["image"], batch["label"], rng, *args)
    return out, batch["mask"], batch["index"]
  return run


def map_batches(fn: MapFn, variables: Any, batches: Iterable[dict[str, jax.Array]], *,
                rng: jax.Array, mesh=None, sweep: Sequence[tuple] = ((),),
                desc: str | None = None, total: int | None = None) -> list[dict[str, np.ndarray]]:
  """Apply `fn` to each global batch, once per argument tuple of `sweep`; gather the outputs.

  Args:
    fn: `(variables, x, y, rng, *args) -> {name: [B, ...]}`; see the module docstring.
    variables: passed to `fn`, replicated over the mesh.
    batches: global batches, `{'image' [B, H, W, C], 'label' [B], 'mask' bool [B], 'index' int
      [B]}` as jax.Arrays split on `data`; rows with mask False are padding.
    rng: batch `i` gets `fold_in(rng, i)` (the same for every argument tuple).
    mesh: the device mesh (default: all devices).
    sweep: argument tuples appended to `fn`'s arguments (e.g. `[(eps,) for eps in ...]`), all
      run on a batch before the next is read: one pass over the data.
    desc: a progress bar (on process 0) with this description; None for none.
    total: the number of batches, for the bar.

  Returns:
    One dict per entry of `sweep`: `{name: [n, ...]}` over the n real rows of all batches, in
    batch order, on every host, plus 'index': each row's 'index'.
  """
  mesh = mesh or sharding.make_mesh()
  variables = jax.device_put(variables, sharding.replicated(mesh))
  run = compiled(fn)
  # Device arrays until the end, so the host reads the next batch while the devices compute.
  pending = [[] for _ in sweep]
  bar = tqdm(batches, total=total, desc=desc, leave=False,
             disable=desc is None or jax.process_index() != 0)
  for i, batch in enumerate(bar):
    batch_rng = jax.random.fold_in(rng, i)
    for outputs, args in zip(pending, sweep):
      outputs.append(run(variables, batch, batch_rng, args))
  results = []
  for outputs in pending:
    parts: dict[str, list[np.ndarray]] = {}
    for out, mask, index in outputs:
      keep = _host(mask)
      for name, value in {**out, "index": index}.items():
        parts.setdefault(name, []).append(_host(value)[keep])
    results.append({name: np.concatenate(values) for name, values in parts.items()})
  return results


def map_split(fn: MapFn, variables: Any, source: data.Source, *, batch_size: int,
              max_examples: int = 0, seed: int = 0, mesh=None, sweep: Sequence[tuple] = ((),),
              desc: str | None = None) -> list[dict[str, np.ndarray]]:
  """`fn` over the first examples of `source`, in global batches of `batch_size`.

  Each host reads its slice of every global batch; the last batch is padded to `batch_size`
  (one compilation) and the padding masked out.

  Args:
    fn: `(variables, x, y, rng, *args) -> {name: [B, ...]}`; see the module docstring.
    variables: passed to `fn`, replicated over the mesh.
    source: the split to read.
    batch_size: the global batch size, a multiple of the mesh's device count.
    max_examples: how many examples from the start of the split; 0 for all.
    seed: batch `i` gets the key `fold_in(key(seed), i)`.
    mesh: the device mesh (default: all devices, of all hosts).
    sweep: argument tuples appended to `fn`'s arguments, each run on every batch (one pass).
    desc: a progress bar with this description; None for none.

  Returns:
    One dict per entry of `sweep`: `{name: [n, ...]}` over the n real examples in the split's
    order, on every host.
  """
  mesh = mesh or sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh, "eval.batch_size")
  n = min(source.num_examples, max_examples or source.num_examples)

  def batches():
    host_batches = feed.eval_batches(source, global_batch_size=batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
    for _, batch in zip(range(-(-n // batch_size)), host_batches):
      batch["mask"] = batch["mask"] & (batch["index"] < n)  # cut the last batch to exactly n
      yield batch

  # Read and put on the devices by a background thread, ahead of the attacks.
  with feed.prefetch(batches(), sharding.batch_sharding(mesh)) as global_batches:
    results = map_batches(fn, variables, global_batches, rng=jax.random.key(seed), mesh=mesh,
                          sweep=sweep, desc=desc, total=-(-n // batch_size))
  # The split's order, however the hosts' slices sit on the mesh.
  orders = [np.argsort(result.pop("index"), kind="stable") for result in results]
  return [{name: value[order] for name, value in result.items()}
          for result, order in zip(results, orders)]


def _host(x: jax.Array) -> np.ndarray:
  """`x` on the host, whole: gathered from every process when it spans several."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)
