"""Multi-host training on loopback: two processes (one CPU device each, joined by
`jax.distributed` over 127.0.0.1) train the run a single process with two devices trains."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from gacd_jax import checkpoints
from tests import helpers

ARGS = ["train", "--config=configs/digits.py:pgd_at", "--config.data.num_examples=128",
        "--config.train.batch_size=32", "--config.train.epochs=1",
        "--config.model.small_cnn.width=4", "--config.attack.steps=2", "--noprogress"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, PYTHONPATH=helpers.REPO,
              GACD_JAX_COMPILATION_CACHE=os.environ["JAX_COMPILATION_CACHE_DIR"],
              XLA_FLAGS=helpers.device_flags(devices))


def test_two_processes_on_loopback_train_like_one_process_with_two_devices(tmp_path):
  cli = [sys.executable, "-m", "gacd_jax.cli"]
  single = subprocess.run(cli + ARGS + [f"--workdir={tmp_path / 'single'}"], env=_env(2),
                          capture_output=True, text=True, timeout=600, cwd=helpers.REPO)
  assert single.returncode == 0, single.stderr

  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      cli + ARGS + [f"--workdir={tmp_path / 'multi'}", "--distributed",
                    f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}"],
      env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=helpers.REPO)
           for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err

  assert checkpoints.latest_step(tmp_path / "multi") == 4
  (_, a), (_, b) = checkpoints.restore(tmp_path / "single"), checkpoints.restore(tmp_path / "multi")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               (a["params"], a["batch_stats"]), (b["params"], b["batch_stats"]))
  # only process 0 writes the logs: one line (logged at the last step), not one per process
  lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 1 and '"step": 4' in lines[0]
