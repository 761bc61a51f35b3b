"""Process-wide settings the command line applies at start-up (a library import changes nothing).

A Python user gets the same with one call, `gacd_jax.runtime.configure()`, before anything uses
JAX; `autoattack.evaluate` and `train.train` warn once (`PerformanceWarning`) when they run on the
CPU without the convolution flag. Importing gacd_jax does not set it: `XLA_FLAGS` is read by every
XLA in the process and its children (TensorFlow's too), and a flag another jaxlib does not know
aborts it, so a library asks instead of changing the process behind the user's back.

- XLA CPU flags: jaxlib 0.10 routes every convolution to YNNPACK by default, whose weight gradient
  is slow on CPUs (the README's benchmark section); `-individual_convolution` keeps convolutions
  in XLA's own (Eigen) emitter, with identical logits. The flag only concerns the CPU backend (a
  GPU or TPU run ignores it) and is set only when the user has not set `XLA_FLAGS` themselves.
- The persistent compilation cache: the second run of the same command reuses the compiled step
  instead of compiling again (tens of seconds for a ResNet step on a CPU).

And the backend decisions the launchers pass on: to the models, `store_conv_inputs`; to the
attacks, `host_attack_loops`.
"""

import importlib.util
import os
import pathlib
import warnings
from typing import Any, Mapping, MutableMapping, Optional

from gacd_jax import errors

CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
CACHE_ENV = "GACD_JAX_COMPILATION_CACHE"
ATTACK_LOOPS_ENV = "GACD_JAX_ATTACK_LOOPS"


def store_conv_inputs(backend: str) -> bool:
  """Whether the models' convolutions store their inputs (`gacd_jax.models.Conv.store_input`) on
  `backend` ('cpu', 'gpu', 'tpu', as `jax.default_backend()` names it).

  Only XLA CPU gains: it fuses a convolution input's producers into the transpose its weight
  gradient reads, recomputing them slowly; a stored input stops that (the README's benchmark
  section measures it). GPU and TPU compilers need no help. Outputs and gradients are the same
  either way.
  """
  return backend == "cpu"


# The packages through which jax finds a GPU or TPU (jax[cuda12] and jax[tpu] install them).
ACCELERATOR_PLUGINS = {"gpu": ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin"),
                       "tpu": ("libtpu",)}


def expected_backend(environ: Mapping[str, str] = os.environ,
                     installed: Optional[set[str]] = None) -> str:
  """The backend JAX will pick, decided before JAX starts (so that CPU-only settings can be left
  off elsewhere): the first of `JAX_PLATFORMS` if set, else 'tpu' or 'gpu' if its plugin is
  installed, else 'cpu'. `installed`: the plugin modules present (default: looked up)."""
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return {"cuda": "gpu", "rocm": "gpu"}.get(platforms[0], platforms[0])
  if installed is None:
    installed = {m for mods in ACCELERATOR_PLUGINS.values() for m in mods
                 if importlib.util.find_spec(m) is not None}
  for backend in ("tpu", "gpu"):
    if installed & set(ACCELERATOR_PLUGINS[backend]):
      return backend
  return "cpu"


def host_attack_loops(backend: str, environ: Mapping[str, str] = os.environ) -> bool:
  """Whether attacks should keep their iterations out of XLA loops on `backend` ('cpu', 'gpu',
  'tpu'): AutoAttack's gradient attacks run from the host, one compiled iteration per call
  (`autoattack.evaluate(host_loops=...)`).

  Only XLA CPU gains: a convolution's forward and backward pass inside a while loop runs ~2x
  slower there than the same computation called from a Python loop (the README's AutoAttack
  section measures it). GPU and TPU run loops on the device at full speed, and a host loop would
  only add a launch per iteration. The results are the same either way. `$GACD_JAX_ATTACK_LOOPS`
  ('host' or 'xla') overrides the choice: a host loop compiles three programs per attack
  instead of one, so for tiny models, whose evaluation is mostly compiling, 'xla' is faster.
  """
  choice = environ.get(ATTACK_LOOPS_ENV, "")
  if choice in ("host", "xla"):
    return choice == "host"
  if choice:
    raise errors.ConfigError(f"{ATTACK_LOOPS_ENV}={choice!r} is not a choice; set it to 'host' "
                             "or 'xla', or unset it to let the backend decide")
  return backend == "cpu"


def set_xla_flags(environ: MutableMapping[str, str] = os.environ,
                  backend: Optional[str] = None) -> bool:
  """Set this project's XLA CPU flags unless `XLA_FLAGS` is set or JAX will run on a GPU/TPU
  (`expected_backend`). Must run before JAX initialises its backends. Returns whether the flags
  were set."""
  if "XLA_FLAGS" in environ or (backend or expected_backend(environ)) != "cpu":
    return False
  environ["XLA_FLAGS"] = CPU_XLA_FLAGS
  return True


class PerformanceWarning(UserWarning):
  """gacd_jax runs on a path it knows to be slow, and says how to leave it."""


def slow_cpu_convolutions(backend: str, environ: Mapping[str, str] = os.environ) -> bool:
  """Whether convolution gradients take jaxlib's slow default path: the CPU backend without this
  project's flag in `XLA_FLAGS`."""
  return backend == "cpu" and CPU_XLA_FLAGS not in environ.get("XLA_FLAGS", "")


_warned_slow_cpu = False


def warn_if_slow_cpu() -> None:
  """Warn once per process if `slow_cpu_convolutions` (for `jax.default_backend()`)."""
  global _warned_slow_cpu
  import jax  # pylint: disable=g-import-not-at-top
  if _warned_slow_cpu or not slow_cpu_convolutions(jax.default_backend()):
    return
  _warned_slow_cpu = True
  warnings.warn(
      "JAX runs on the CPU without gacd_jax's convolution flag, so convolution gradients take "
      "jaxlib's slow default path (about 3x slower, see the README's benchmark); call "
      "gacd_jax.runtime.configure() before anything uses JAX, or add "
      f"{CPU_XLA_FLAGS} to XLA_FLAGS", PerformanceWarning, stacklevel=3)


def default_cache_dir(environ: MutableMapping[str, str] = os.environ) -> Optional[str]:
  """`$GACD_JAX_COMPILATION_CACHE` ('off' disables), else `$XDG_CACHE_HOME/gacd_jax/jax` or
  `~/.cache/gacd_jax/jax`."""
  value = environ.get(CACHE_ENV)
  if value is not None:
    return None if value.lower() in ("", "off", "none", "0") else value
  base = environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
  return str(pathlib.Path(base) / "gacd_jax" / "jax")


def enable_compilation_cache(directory: Optional[str]) -> None:
  """Persist every compiled program (even fast-compiling ones) under `directory`."""
  if not directory:
    return
  import jax  # pylint: disable=g-import-not-at-top
  pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def environment() -> dict[str, Any]:
  """What a run runs on: backend, devices, processes, versions, XLA flags and the backend-
  dependent decisions (`gacd-jax info` prints it; `train` records it in run.json)."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  kinds: dict[str, int] = {}
  for device in jax.devices():
    kinds[device.device_kind] = kinds.get(device.device_kind, 0) + 1
  return {
      "backend": backend, "devices": kinds, "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
      "process_index": jax.process_index(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "store_conv_inputs": store_conv_inputs(backend),
      "slow_cpu_convolutions": slow_cpu_convolutions(backend),
      "host_attack_loops": host_attack_loops(backend),
  }


def configure(environ: MutableMapping[str, str] = os.environ) -> None:
  """What the command line does before anything touches JAX."""
  set_xla_flags(environ)
  enable_compilation_cache(default_cache_dir(environ))
