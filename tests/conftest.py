"""Test-session setup: the command line's XLA CPU flags, a persistent compilation cache shared by
the tests (and their subprocesses), and a method registry restored after each test.

Many tests compile the same tiny train step; on a 2-core CPU compiling dominates their time, so the
cache keeps the suite inside its budget (and AutoAttack keeps its XLA loops: fewer programs). It
lives under pytest's cache directory of the checkout.
"""

import copy
import os
import pathlib

import jax
import pytest

from gacd_jax import runtime
from tests import helpers

# As the command line does (before any backend starts): the tests run on the path users get, but
# compile faster (`helpers.XLA_FLAGS`).
os.environ.setdefault("XLA_FLAGS", helpers.XLA_FLAGS)
runtime.set_xla_flags()
CACHE_DIR = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax_compilation"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE_DIR))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
# AutoAttack in XLA loops: the tests' tiny models are compile-bound, and a host loop compiles three
# programs per attack instead of one (an end-to-end test took 2.6-2.8x as long). test_autoattack
# checks that the host loops compute the same, with `host_loops=True` given explicitly.
os.environ.setdefault(runtime.ATTACK_LOOPS_ENV, "xla")


@pytest.fixture(autouse=True)
def _method_registry():
  """Every test starts from the built-in methods: one that registers its own (the README's
  own-loss example) leaves nothing behind for the next, whatever order they run in."""
  from gacd_jax import methods  # pylint: disable=g-import-not-at-top
  registry = dict(methods.REGISTRY)
  switches = copy.deepcopy(methods._DEFAULTS)  # pylint: disable=protected-access
  yield
  methods.REGISTRY.clear()
  methods.REGISTRY.update(registry)
  methods._DEFAULTS.clear()  # pylint: disable=protected-access
  methods._DEFAULTS.update(switches)  # pylint: disable=protected-access
