"""Multi-host on loopback: two processes (one CPU device each, joined by `jax.distributed` over
127.0.0.1) train the run a single process with eight fake devices trains, and then evaluate as
that process does. Each process trains and then evaluates, so the suite starts one single process
and joins one pair, not more."""

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

# Accuracies (clean, PGD; an eps sweep) and features of the single process's trained small_cnn
# (its variables, written by that process, are read, not initialised: compiling the random draws
# of the conv kernels took seconds per kernel shape on the CPU) on the first 100 digits (the
# features: all of them); process 0 writes them.
REPORTS = """
import pathlib
import jax, numpy as np
from flax import serialization
from gacd_jax import evaluate, models, probe
from tests import helpers
config = helpers.tiny_config()
config.eval.max_examples = 100
source = evaluate.test_source(config)
settings = evaluate.EvalSettings.from_config(config.eval)
module = models.build("small_cnn", 10, width=4)
variables = serialization.msgpack_restore(pathlib.Path({variables!r}).read_bytes())
accuracy, _ = evaluate.evaluate_model(evaluate.logits_fn(module), variables, source, settings,
                                      names=("clean", "pgd20"))
curve = evaluate.eps_curve(evaluate.logits_fn(module), variables, source, settings, [0.05, 0.1])
probe_features, labels = probe.features_and_labels(module, variables, source, 64)
if jax.process_index() == 0:
  np.savez({out!r}, accuracy=[accuracy["clean"], accuracy["pgd20"], *curve], labels=labels,
           features=probe_features)
"""

# The single process: `gacd-jax train` (argv[1:]) on eight devices, its trained variables
# written for the reports, then the reports.
SINGLE_TRAIN_THEN_REPORTS = """
import pathlib, sys
import jax
from flax import serialization
from gacd_jax import checkpoints, cli
assert jax.process_count() == 1 and len(jax.devices()) == 8
cli.main(["gacd-jax", *sys.argv[1:]])
_, trained = checkpoints.restore({workdir!r})
pathlib.Path({variables!r}).write_bytes(serialization.msgpack_serialize(
    {{"params": trained["params"]["student"], "batch_stats": trained["batch_stats"]}}))
""" + REPORTS

# Each process of the pair: `gacd-jax train --distributed` (argv[1:]), then the reports on the
# two processes.
PAIR_TRAIN_THEN_REPORTS = """
import sys
import jax
from gacd_jax import cli
cli.main(["gacd-jax", *sys.argv[1:]])
assert jax.process_count() == 2 and len(jax.devices()) == 2
""" + REPORTS


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, PYTHONPATH=helpers.REPO,
              GACD_JAX_COMPILATION_CACHE=os.environ["JAX_COMPILATION_CACHE_DIR"],
              XLA_FLAGS=helpers.device_flags(devices))


def _assert_same_reports(a, b):
  np.testing.assert_array_equal(a["accuracy"], b["accuracy"])
  np.testing.assert_array_equal(a["labels"], b["labels"])
  np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)


def test_two_processes_on_loopback_train_and_evaluate_like_one_process(tmp_path):
  variables = tmp_path / "variables.msgpack"
  single = tmp_path / "single.py"
  single.write_text(SINGLE_TRAIN_THEN_REPORTS.format(
      workdir=str(tmp_path / "single"), variables=str(variables),
      out=str(tmp_path / "single.npz")))
  proc = subprocess.run([sys.executable, str(single), *ARGS, f"--workdir={tmp_path / 'single'}"],
                        env=_env(8), capture_output=True, text=True, timeout=600,
                        cwd=helpers.REPO)
  assert proc.returncode == 0, proc.stderr
  _, trained = checkpoints.restore(tmp_path / "single")
  single_reports = np.load(tmp_path / "single.npz")
  assert single_reports["features"].shape == (len(single_reports["labels"]), 16)

  # The pair; each process reads its half of every batch. Without the persistent cache, so that
  # neither runs ahead (loading what the other compiles) and leaves the other more than gloo's
  # 30 s to join a collective.
  script = tmp_path / "pair.py"
  script.write_text(PAIR_TRAIN_THEN_REPORTS.format(variables=str(variables),
                                                    out=str(tmp_path / "two.npz")))
  env = dict(_env(1), GACD_JAX_COMPILATION_CACHE="off", JAX_ENABLE_COMPILATION_CACHE="false")
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, str(script), *ARGS, f"--workdir={tmp_path / 'multi'}", "--distributed",
       f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=helpers.REPO)
           for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err

  assert checkpoints.latest_step(tmp_path / "multi") == 4
  _, multi = checkpoints.restore(tmp_path / "multi")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               (trained["params"], trained["batch_stats"]), (multi["params"], multi["batch_stats"]))
  # only process 0 writes the logs: one line (logged at the last step), not one per process
  lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 1 and '"step": 4' in lines[0]
  _assert_same_reports(single_reports, np.load(tmp_path / "two.npz"))
