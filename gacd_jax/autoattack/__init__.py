"""AutoAttack in JAX: APGD-CE, APGD-T, FAB-T and Square, alone or as the ensemble.

The attacks follow Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks" (ICML 2020; APGD and the DLR loss), Croce & Hein, "Minimally
distorted adversarial examples with a fast adaptive boundary attack" (ICML 2020; FAB) and
Andriushchenko et al., "Square Attack" (ECCV 2020), with the settings of the authors' package
(`pyautoattack`), for the Linf and L2 threat models.

`evaluate` runs a version (`standard`, `plus`, `rand`, `fast` or a custom list) on a data set: each
attack is applied, in order, only to the examples that are still robust, and an example counts as
robust only if every attack failed on it. The attacks with several runs (APGD-T and FAB-T's nine
targets, the restarts of `plus`) go run by run, so each run attacks only what the earlier runs left
robust, as in the official code. Between runs the examples still to attack are compacted on the
host into batches of `batch_size`, the last one padded to a `bucket` (a power of two times the
device count), so each attack compiles once per bucket (`batched`). Each per-batch attack is one
jit over the mesh (batch split on `data`) with `lax` loops inside and a mask for the padding;
examples a run has already broken stay in its batch, masked, until the batch is done (an APGD run
stops once all are broken). Where XLA's loops are slow (the CPU: `runtime.host_attack_loops`), the
iterations are called from the host instead, each attack cut at its loops (`common.Program`) into
jits of its start, one iteration (the state donated) and its end: the same computation, compiled
once per bucket as well; there an APGD batch also shrinks, within a run, to the next bucket of the
examples it has not broken yet (`_Compacting`), so it spends no steps on broken ones.

Random numbers are drawn per example from `fold_in(key(seed), attack, example index)`, so an
example's attack does not depend on the batch it lands in, the batch size or the device count:
running one attack alone breaks at least the examples it breaks inside the ensemble.

Each per-batch attack (`apgd`, `fab`, `square`) takes the model as `model(x, key) -> logits`, where
`key` feeds the model's own randomness (a randomized defense; deterministic models ignore it), and
returns `(x_adv, fooled)`.

Where this differs from the official code (pyautoattack 0.2.0):
  * APGD's first checkpoint counts loss increases from the starting point, as the paper states;
    the official code compares the first step's loss with 0 (an index wrap-around).
  * An APGD run stops once every example of its batch is fooled and returns each example's first
    misclassified iterate; the official code takes all `n_iter` steps on the whole batch and
    returns the last one. The same examples are fooled; on a weak model most of the work is
    saved.
  * Square draws its window and signs per example, not once per batch (the same distribution for
    each example, and no dependence on the batch).
  * The zero-gradient check runs once, on the first batch's clean points; the official one runs
    at every APGD-DLR start.
  * `fab` returns the closest misclassified point even beyond eps (only those within eps count).
  * For a deterministic model, 'rand' takes one gradient per step instead of 20 equal ones.
  * There is no check for dynamic defenses: a jitted function has no Python-level calls to trace.

The package: `common` (the DLR losses, norms, projections, the restart loop and `Program`),
`apgd`, `fab`, `square`, `checks` (the official package's warnings), `batched` (one attack over
padded batches: the buckets, the per-batch jit cache, host loops and compaction), and here the
ensemble driver `evaluate` (its clean pass runs through `gacd_jax.evaluator`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gacd_jax import attacks
from gacd_jax import errors
from gacd_jax import evaluator
from gacd_jax import runtime
from gacd_jax import sharding
from gacd_jax.autoattack.apgd import (APGD_LOSSES, apgd, apgd_checkpoints, apgd_loops,
                                      apgd_program)
from gacd_jax.autoattack.batched import (_HOST_LOOP_ATTACKS, _Predict, _WithParams,
                                        _batch_attack, _batches, _jitted, bucket)
from gacd_jax.autoattack.checks import (AutoAttackWarning, check_n_classes, check_randomized,
                                        check_range_output, check_square_success,
                                        check_zero_gradients)
from gacd_jax.autoattack.common import (NORMS, Model, Norm, Program, distance,
                                        dlr_loss, dlr_targeted_loss, run_on_device)
from gacd_jax.autoattack.fab import fab, fab_loops, fab_program, project_onto_hyperplane
from gacd_jax.autoattack.square import (square, square_l2_pattern, square_loops, square_program,
                                        square_schedule)

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSIONS = ("standard", "plus", "rand", "fast", "custom")

# The attacks each version runs, in order (the official package's lists; `fast` is ours).
VERSION_ATTACKS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
    "fast": ("apgd-ce", "apgd-t"),
}

__all__ = [
    "APGD_LOSSES", "ATTACKS", "AutoAttackWarning", "Evaluation", "Model", "NORMS", "Norm",
    "Program", "VERSIONS", "VERSION_ATTACKS", "apgd", "apgd_checkpoints", "apgd_loops",
    "apgd_program", "bucket", "check_n_classes", "check_randomized", "check_range_output",
    "check_square_success", "check_zero_gradients", "distance", "dlr_loss", "dlr_targeted_loss",
    "evaluate", "fab", "fab_loops", "fab_program", "project_onto_hyperplane", "run_on_device",
    "square", "square_l2_pattern", "square_loops", "square_program", "square_schedule",
]


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The outcome of `evaluate` on N examples.

  Attributes:
    robust_accuracy: fraction of examples correctly classified under every attack.
    clean_accuracy: fraction correctly classified without attack.
    x_adv: `[N, H, W, C]` in [0, 1]: the adversarial example that broke each example, the clean
      image where none did (robust or misclassified already).
    robust: `[N]` bool.
    broken_by: `[N]` int: -1 robust, 0 misclassified clean, i >= 1 broken by `attacks[i - 1]`.
    attacks: the attacks run, in order.
    accuracy_after: robust accuracy after each attack (each only attacks what the previous left).
    seconds: wall time per attack (including compilation), and 'clean'.
    version, norm, eps: the settings.
  """
  robust_accuracy: float
  clean_accuracy: float
  x_adv: np.ndarray
  robust: np.ndarray
  broken_by: np.ndarray
  attacks: tuple[str, ...]
  accuracy_after: dict[str, float]
  seconds: dict[str, float]
  version: str
  norm: str
  eps: float

  @property
  def broken_by_name(self) -> list[str]:
    """Per example: the attack's name, 'clean' (misclassified) or '' (robust)."""
    names = ("clean", *self.attacks)
    return [names[i] if i >= 0 else "" for i in self.broken_by]


def _attack_settings(version: str, n_iter: int, n_queries: int, n_target_classes: int,
                     eot_iter: int, host_loops: bool) -> dict[str, tuple[Callable, dict, int]]:
  """Per attack name: the batch attack, its settings in `version` (the official values) and its
  number of runs (restarts, targets; 0 for Square, which has none)."""
  restarts = 5 if version == "plus" else 1
  eot = eot_iter if version == "rand" else 1
  apgd_kw = dict(n_iter=n_iter, eot_iter=eot, eot_unroll=host_loops and eot > 1)
  return {
      "apgd-ce": (apgd, dict(apgd_kw, loss="ce", n_restarts=restarts), restarts),
      "apgd-dlr": (apgd, dict(apgd_kw, loss="dlr", n_restarts=restarts), restarts),
      "apgd-t": (apgd, dict(apgd_kw, loss="dlr-targeted", n_restarts=1,
                            n_target_classes=n_target_classes), n_target_classes),
      "fab": (fab, dict(targeted=False, n_iter=n_iter, n_restarts=restarts), restarts),
      "fab-t": (fab, dict(targeted=True, n_iter=n_iter, n_restarts=1,
                          n_target_classes=n_target_classes), n_target_classes),
      "square": (square, dict(n_queries=n_queries), 0),
  }


def _check_settings(x: np.ndarray, y: np.ndarray, eps: float, norm: str, version: str,
                    names: Sequence[str], batch_size: int, mesh) -> None:
  if norm == "linf":
    attacks.check_eps(eps)
  elif not isinstance(eps, (int, float)) or not 0 <= eps < np.inf:
    raise errors.ConfigError(f"eps={eps!r} must be a non-negative number")
  if version not in VERSIONS:
    raise errors.ConfigError(f"unknown version {version!r}; use one of {', '.join(VERSIONS)}")
  unknown = [n for n in names if n not in ATTACKS]
  if unknown or not names:
    raise errors.ConfigError(
        f"unknown attacks {unknown or names}; choose from {', '.join(ATTACKS)}")
  if x.ndim != 4 or y.shape != x.shape[:1] or not len(x):
    raise errors.DataError(f"expected images [N, H, W, C] and labels [N] with N >= 1, got "
                           f"{x.shape} and {y.shape}")
  if x.min() < 0 or x.max() > 1:
    raise errors.DataError(f"images must be in [0, 1], found values in [{x.min()}, {x.max()}]")
  n_devices = mesh.devices.size
  if batch_size <= 0 or batch_size % n_devices:
    raise errors.ConfigError(f"batch_size={batch_size} must be a positive multiple of the "
                             f"{n_devices} devices of the mesh")


def evaluate(apply_fn: Callable, x, y, *, params=None, eps: float = 8 / 255, norm: Norm = "linf",
             version: str = "standard", attacks_to_run: Sequence[str] | None = None,
             batch_size: int = 256, seed: int = 0, randomized: bool = False, n_iter: int = 100,
             n_queries: int = 5000, n_target_classes: int = 9, eot_iter: int = 20, mesh=None,
             host_loops: bool | None = None, progress: bool = True) -> Evaluation:
  """AutoAttack robust accuracy of `apply_fn` on `(x, y)`.

  Args:
    apply_fn: images `[B, H, W, C]` in [0, 1] -> logits `[B, K]`; with `randomized`, `(images,
      key) -> logits` for a model with its own randomness. With `params`, `params` comes first:
      `(params, images[, key])`.
    x: `[N, H, W, C]` in [0, 1]; y: `[N]` integer labels.
    params: the model's variables, if `apply_fn` takes them. They are passed to the compiled
      attacks as an argument; a closure over them would compile them in as constants (slow to
      compile, and memory for a second copy): pass large models' weights here.
    eps: radius of the threat model (Linf: in [0, 1]).
    norm: 'linf' or 'l2' (any case: the official package's 'Linf' and 'L2' too).
    version: 'standard' (APGD-CE, APGD-T, FAB-T, Square), 'plus' (APGD-CE and APGD-DLR with 5
      restarts, FAB with 5, Square, APGD-T, FAB-T), 'rand' (APGD-CE, APGD-DLR with EOT over
      `eot_iter` draws), 'fast' (APGD-CE, APGD-T), or 'custom' with `attacks_to_run`.
    attacks_to_run: names from `ATTACKS` for version 'custom' (standard settings).
    batch_size: examples per jitted call (a multiple of the device count).
    seed: the random starts and queries are a function of it and of each example's index.
    n_iter: APGD and FAB iterations (100 officially); n_queries: Square queries (5000).
    n_target_classes: targets of APGD-T and FAB-T (9, at most K - 1).
    mesh: the device mesh (default: all devices).
    host_loops: run the gradient attacks' iterations (APGD, FAB) from the host, one compiled
      step at a time (and EOT's draws unrolled), instead of in XLA loops: the same results,
      faster where XLA loops are slow. Default: `runtime.host_attack_loops` for the mesh's
      backend (on for the CPU).
    progress: a tqdm bar per attack.

  Returns:
    An `Evaluation`. Warns `AutoAttackWarning` when the official checks flag the model, and
    `runtime.PerformanceWarning` (once) on a CPU without `runtime.configure()`.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  mesh = mesh or sharding.make_mesh()
  if version == "custom":
    names = tuple(attacks_to_run or ())
  elif attacks_to_run is not None:
    raise errors.ConfigError(f"attacks_to_run is for version='custom', not {version!r}")
  else:
    names = VERSION_ATTACKS.get(version, ())
  norm = attacks.norm_name(norm)
  _check_settings(x, y, eps, norm, version, names, batch_size, mesh)
  runtime.warn_if_slow_cpu()
  if host_loops is None:
    host_loops = runtime.host_attack_loops(mesh.devices.flat[0].platform)
  fn = _WithParams(apply_fn, randomized, params is not None)
  batch_sharding = sharding.batch_sharding(mesh)
  params = jax.device_put(params, sharding.replicated(mesh))
  model: Model = functools.partial(_jitted(fn), params)  # for the checks
  n = len(x)

  # The official checks, on the first batch.
  first = jnp.asarray(x[:batch_size])
  if version != "rand":
    check_randomized(model, first, y[:batch_size])
  first_logits = np.asarray(model(first, jax.random.key(0)))
  n_classes = first_logits.shape[-1]
  check_range_output(first_logits)
  check_n_classes(n_classes, names, n_target_classes)
  check_zero_gradients(model, first, jnp.asarray(y[:batch_size]))
  n_target_classes = min(n_target_classes, n_classes - 1)

  tic = time.perf_counter()
  root = jax.random.key(seed)
  n_devices = mesh.devices.size
  batches = ({"image": x[index], "label": y[index], "mask": mask, "index": index}
             for index, mask in _batches(np.arange(n, dtype=np.int32), batch_size, n_devices))
  clean = evaluator.map_batches(
      _Predict(fn), params, (jax.device_put(b, batch_sharding) for b in batches),
      rng=jax.random.fold_in(root, len(ATTACKS)), mesh=mesh)[0]
  robust = np.zeros(n, bool)
  robust[clean["index"]] = clean["prediction"] == y[clean["index"]]
  clean_accuracy = float(robust.mean())
  broken_by = np.where(robust, -1, 0)
  x_adv = x.copy()
  accuracy_after, seconds = {}, {"clean": time.perf_counter() - tic}

  settings = _attack_settings(version, n_iter, n_queries, n_target_classes, eot_iter,
                              host_loops)
  for stage, name in enumerate(names, start=1):
    tic = time.perf_counter()
    attack, kw, n_runs = settings[name]
    run = _batch_attack(fn, attack, tuple(sorted(kw.items())), norm, n_runs > 0,
                        host_loops and attack in _HOST_LOOP_ATTACKS)
    attack_key = jax.random.fold_in(root, ATTACKS.index(name))
    bar = tqdm(desc=name, unit="batch", disable=not progress, leave=False)
    # Run by run (restarts, targets), each on the examples every earlier run left robust.
    for r in range(max(n_runs, 1)):
      todo = np.flatnonzero(robust)
      if not len(todo):
        break
      n_batches = -(-len(todo) // batch_size)
      bar.total = bar.n + n_batches * (max(n_runs, 1) - r)  # an upper bound, refined each run
      bar.refresh()
      for b, (index, mask) in enumerate(_batches(todo, batch_size, n_devices)):
        inputs = jax.device_put((x[index], y[index], mask, index.astype(np.int32)),
                                batch_sharding)
        adv, broken = run(params, *inputs, jnp.int32(b), jnp.int32(r), attack_key,
                          jnp.float32(eps))
        broken = np.asarray(broken)
        hit = index[broken]
        robust[hit] = False
        broken_by[hit] = stage
        x_adv[hit] = np.asarray(adv)[broken]
        bar.update()
    bar.close()
    accuracy_after[name] = float(robust.mean())
    seconds[name] = time.perf_counter() - tic

  check_square_success(accuracy_after)
  return Evaluation(
      robust_accuracy=float(robust.mean()), clean_accuracy=clean_accuracy,
      x_adv=x_adv, robust=robust, broken_by=broken_by, attacks=names,
      accuracy_after=accuracy_after, seconds=seconds, version=version, norm=norm, eps=eps)
