"""The start-up settings and the precision switch are applied (a regression guard, not a timing
test)."""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gacd_jax import cli
from gacd_jax import config as config_lib
from gacd_jax import data
from gacd_jax import runtime
from gacd_jax import sharding
from gacd_jax import train
from gacd_jax.errors import ConfigError
from tests import test_train


def test_xla_flags_are_set_only_when_the_user_has_not_set_them():
  env = {}
  assert runtime.set_xla_flags(env, backend="cpu") and env["XLA_FLAGS"] == runtime.CPU_XLA_FLAGS
  env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  assert not runtime.set_xla_flags(env, "cpu") and env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_cpu_only_tuning_is_off_on_accelerators(backend):
  env = {}
  assert not runtime.set_xla_flags(env, backend) and "XLA_FLAGS" not in env
  assert not runtime.store_conv_inputs(backend)
  assert not runtime.slow_cpu_convolutions(backend, {})
  assert runtime.store_conv_inputs("cpu") and runtime.slow_cpu_convolutions("cpu", {})


@pytest.mark.parametrize("environ,installed,backend", [
    ({}, set(), "cpu"),
    ({}, {"jax_cuda12_plugin"}, "gpu"),
    ({}, {"libtpu"}, "tpu"),
    ({"JAX_PLATFORMS": "cpu"}, {"jax_cuda12_plugin"}, "cpu"),  # the user's choice wins
    ({"JAX_PLATFORMS": "cuda,cpu"}, set(), "gpu"),
    ({"JAX_PLATFORMS": "tpu"}, set(), "tpu"),
])
def test_the_backend_is_known_before_jax_starts(environ, installed, backend):
  assert runtime.expected_backend(environ, installed) == backend
  env = dict(environ)
  assert runtime.set_xla_flags(env, runtime.expected_backend(environ, installed)) == (
      backend == "cpu")


def test_info_names_backend_devices_processes_versions_and_flags(capsys):
  with pytest.raises(SystemExit) as e:  # info has no flags of its own: --bogus is refused
    cli.main(["gacd-jax", "info", "--bogus"])
  assert e.value.code == 2
  cli.main(["gacd-jax", "info"])
  printed = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
  printed = {k: v.strip() for k, v in printed.items()}
  assert printed["backend"] == jax.default_backend()
  assert printed["device_count"] == str(jax.device_count())
  assert printed["process_count"] == "1" and printed["jax"] == jax.__version__
  assert runtime.CPU_XLA_FLAGS in printed["xla_flags"]  # set by the tests' conftest, as the CLI
  assert printed["store_conv_inputs"] == "True"


def test_the_accelerator_extras_pin_the_jax_of_the_cpu_install():
  import configparser  # pylint: disable=g-import-not-at-top
  setup = configparser.ConfigParser()
  setup.read(pathlib.Path(__file__).resolve().parent.parent / "setup.cfg")
  requires = setup["options"]["install_requires"].split()
  jax_pin = next(r for r in requires if r.startswith("jax=="))
  extras = setup["options.extras_require"]
  for extra, plugin in (("cuda12", "jax[cuda12]"), ("tpu", "jax[tpu]")):
    assert extras[extra].split() == [plugin + jax_pin[len("jax"):]], extras[extra]


def test_compilation_cache_is_on_by_default_and_can_be_moved_or_turned_off(tmp_path):
  assert runtime.default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == str(
      tmp_path / "gacd_jax" / "jax")
  assert runtime.default_cache_dir({runtime.CACHE_ENV: "/somewhere"}) == "/somewhere"
  assert runtime.default_cache_dir({runtime.CACHE_ENV: "off"}) is None


def test_the_command_line_configures_the_runtime_first(monkeypatch):
  calls = []
  monkeypatch.setattr(runtime, "configure", lambda: calls.append("configure"))
  with pytest.raises(SystemExit):  # no --config: a clean error after start-up
    cli.main(["gacd-jax", "evaluate", "--workdir=/nonexistent"])
  assert calls == ["configure"]


def test_bf16_precision_runs_the_student_in_bf16_and_keeps_fp32_parameters():
  c = config_lib.default()
  c.precision = "bf16"
  config_lib.validate(c)
  assert config_lib.compute_dtype(c) == jnp.bfloat16
  c.precision = "fp16"
  with pytest.raises(Exception, match="precision"):
    config_lib.validate(c)

  state, teacher_vars, step, batch = test_train._step_setup("ard", dtype=jnp.bfloat16)
  mesh = sharding.make_mesh()
  batch = data.to_global(batch, sharding.batch_sharding(mesh))
  jaxpr = str(jax.make_jaxpr(step)(state, teacher_vars, batch, jax.random.key(0)))
  assert "conv_general_dilated" in jaxpr and "bf16[" in jaxpr
  new_state, metrics = train.jit_step(step, mesh)(state, teacher_vars, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
  for leaf in jax.tree.leaves((new_state["params"], new_state["opt_state"])):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype


def test_only_the_cpu_backend_stores_convolution_inputs():
  assert runtime.store_conv_inputs("cpu")
  assert not runtime.store_conv_inputs("gpu")
  assert not runtime.store_conv_inputs("tpu")


def test_only_the_cpu_backend_runs_attack_loops_outside_xla_loops():
  assert runtime.host_attack_loops("cpu", {})
  assert not runtime.host_attack_loops("gpu", {})
  assert not runtime.host_attack_loops("tpu", {})


def test_the_attack_loops_can_be_chosen_and_a_wrong_choice_is_named():
  env = runtime.ATTACK_LOOPS_ENV
  assert not runtime.host_attack_loops("cpu", {env: "xla"})
  assert runtime.host_attack_loops("gpu", {env: "host"})
  with pytest.raises(ConfigError, match="GACD_JAX_ATTACK_LOOPS='device' is not a choice"):
    runtime.host_attack_loops("cpu", {env: "device"})


def test_cpu_convolutions_store_their_inputs_and_compute_the_same():
  """With `store_conv_inputs` (what `models.build` and the launchers choose on the CPU backend)
  every convolution's input passes through a conditional (a stored buffer XLA cannot fuse
  through, `models._stored`); the loss and the gradients do not change."""
  from gacd_jax import losses, models  # pylint: disable=g-import-not-at-top
  assert jax.default_backend() == "cpu"
  module = models.build("small_cnn", 10, width=4)
  assert module.store_conv_inputs  # the default follows runtime.store_conv_inputs('cpu')
  assert "store_conv_inputs" not in models.options("small_cnn")  # not a config hyperparameter
  plain_module = models.build("small_cnn", 10, width=4, store_conv_inputs=False)
  x = jax.random.uniform(jax.random.key(0), (8, 8, 8, 3))
  y = jnp.arange(8) % 10
  variables = module.init(jax.random.key(1), x, train=False)

  def loss_of(m):
    def loss(params, x):
      logits, _ = m.apply({**variables, "params": params}, x, train=False)
      return losses.cross_entropy(logits, y).mean()
    return loss

  stored, plain = loss_of(module), loss_of(plain_module)
  assert str(jax.make_jaxpr(stored)(variables["params"], x)).count("cond[") == 3  # 3 convs
  assert "cond[" not in str(jax.make_jaxpr(plain)(variables["params"], x))
  with_stored = jax.jit(jax.grad(stored, argnums=(0, 1)))(variables["params"], x)
  without = jax.jit(jax.grad(plain, argnums=(0, 1)))(variables["params"], x)
  for a, b in zip(jax.tree.leaves(with_stored), jax.tree.leaves(without)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_cpu_run_without_the_flag_warns_once_how_to_set_it(monkeypatch):
  assert runtime.slow_cpu_convolutions("cpu", {})
  assert runtime.slow_cpu_convolutions("cpu", {"XLA_FLAGS": "--xla_dump_to=/tmp/x"})
  assert not runtime.slow_cpu_convolutions("cpu", {"XLA_FLAGS": runtime.CPU_XLA_FLAGS})
  assert not runtime.slow_cpu_convolutions("gpu", {}) and not runtime.slow_cpu_convolutions("tpu", {})

  monkeypatch.setattr(runtime, "_warned_slow_cpu", False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  with pytest.warns(runtime.PerformanceWarning, match="runtime.configure()"):
    runtime.warn_if_slow_cpu()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    runtime.warn_if_slow_cpu()  # once per process
    monkeypatch.setattr(runtime, "_warned_slow_cpu", False)
    monkeypatch.setenv("XLA_FLAGS", runtime.CPU_XLA_FLAGS)
    runtime.warn_if_slow_cpu()  # configured: silent
