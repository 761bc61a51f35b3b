"""Small configs and utilities shared by the tests."""

import os
import subprocess
import sys

from gacd_jax import demo
from gacd_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The command line's CPU flags, with optimization level 1 (of 0-3; default 2) for the machine code
# XLA generates: the tests' tiny models spend most of their time compiling, and a tiny GACD run
# trained in 12 s instead of 25 (cold cache), while a test that trains for real (digits.py:trades,
# 8 epochs) ran no slower (at level 0 it ran 20x slower). The programs are XLA's same; results
# agree to float32 rounding. Users, the benchmark and the studies run at XLA's default level.
XLA_FLAGS = f"{runtime.CPU_XLA_FLAGS} --xla_backend_optimization_level=1"


def tiny_config(method: str = "natural", *, width: int = 4, epochs: int = 1,
                num_examples: int = 128, teacher_workdir: str = ""):
  """Digits 8x8, a 4-channel small_cnn, 4 steps per epoch, a 2-step attack: seconds to run."""
  c = demo.digits_config(method, width=width, epochs=epochs, teacher_workdir=teacher_workdir)
  c.data.num_examples = num_examples
  c.train.batch_size = 32
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.attack.steps = 2
  c.eval.batch_size = 64
  c.eval.max_examples = 64
  c.eval.pgd_steps = 2
  c.eval.cw_steps = 2
  c.optim.lr = 0.1
  c.optim.schedule = "constant"
  return c


def device_flags(devices: int) -> str:
  """`XLA_FLAGS` for `devices` fake CPU devices, with the tests' CPU flags."""
  return f"--xla_force_host_platform_device_count={devices} {XLA_FLAGS}"


def run_python(code: str, *, devices: int = 1, timeout: int = 600) -> str:
  """Run `code` in a fresh interpreter with `devices` fake CPU devices; return its stdout."""
  env = dict(os.environ, XLA_FLAGS=device_flags(devices),
             PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=timeout, cwd=REPO)
  if proc.returncode:
    raise AssertionError(f"subprocess failed:\n{proc.stdout}\n{proc.stderr}")
  return proc.stdout


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO,
             GACD_JAX_COMPILATION_CACHE=os.environ["JAX_COMPILATION_CACHE_DIR"])
  return subprocess.run([sys.executable, "-m", "gacd_jax.cli", *args], capture_output=True,
                        text=True, env=env, timeout=timeout, cwd=REPO)


def randomize_batch_norm(model):
  """A PyTorch `model` with random BatchNorm2d affine parameters and running statistics (from
  torch's global generator; seed it first), changed in place and returned: parity tests then
  cover the normalisation, which fresh layers (weight 1, bias 0, mean 0, var 1) would hide."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
  return model
