"""Nothing a user trained is lost or silently corrupted: non-finite states are never saved, damaged
checkpoints are detected and set aside, one process writes a workdir, logs resume without repeating
steps, and a start that fails validation writes nothing."""

import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

from gacd_jax import checkpoints
from gacd_jax import config as config_lib
from gacd_jax import data
from gacd_jax import errors
from gacd_jax import sharding
from gacd_jax import rundir
from gacd_jax import train
from gacd_jax.methods import gacd as gacd_lib
from tests import helpers
from tests.test_train import _step_setup


def _code(group: str) -> int:
  return 1 + [g for g, _ in train.NONFINITE_GROUPS].index(group)


def _all_checkpoints(workdir) -> dict[int, dict]:
  with checkpoints.manager(workdir) as mngr:
    return {step: mngr.restore(step, args=ocp.args.StandardRestore())
            for step in mngr.all_steps()}


def _logged_steps(workdir) -> list[int]:
  return [json.loads(line)["step"]
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Non-finite states.


def test_the_step_names_the_first_non_finite_group():
  state, teacher_vars, step, batch = _step_setup("natural")
  mesh = sharding.make_mesh()
  step_fn = train.jit_step(step, mesh)
  batch = data.to_global(batch, sharding.batch_sharding(mesh))
  _, metrics = step_fn(jax.tree.map(jnp.copy, state), teacher_vars, batch, jax.random.key(0))
  assert int(metrics["nonfinite"]) == 0
  # A NaN in a running mean: the train-mode loss, the gradients and the parameters stay finite,
  # so only the statistics, which a checkpoint would save, show it.
  stats = jax.tree.map(jnp.copy, state["batch_stats"])
  path, leaf = jax.tree_util.tree_flatten_with_path(stats)[0][0]
  leaves = [leaf.at[0].set(jnp.nan) if p == path else x
            for p, x in jax.tree_util.tree_flatten_with_path(stats)[0]]
  bad = dict(state, batch_stats=jax.tree.unflatten(jax.tree.structure(stats), leaves))
  _, metrics = step_fn(bad, teacher_vars, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(metrics["nonfinite"]) == _code("batch_stats")


def test_flush_names_a_non_finite_group_without_a_value():
  class Bar:
    def set_postfix(self, **_):
      pass
  pending = [(36, {"loss": np.float32(2.0), "grad_norm": np.float32(1.0),
                   "nonfinite": np.int32(_code("params"))})]
  with pytest.raises(train.NonFiniteError, match=r"^the parameters became non-finite .* step 37;"):
    train._flush(pending, None, Bar(), 0.0)


def test_a_diverging_run_never_saves_a_non_finite_state_and_resumes_with_another_lr(tmp_path):
  config = helpers.tiny_config("pgd_at", epochs=2)  # 8 steps, a checkpoint every 2
  config.optim.lr = 1e3
  with pytest.raises(train.NonFiniteError, match=r"became \S+ at step \d+; no checkpoint") as e:
    train.train(config, str(tmp_path), progress=False)
  assert "\n" not in str(e.value)
  saved = _all_checkpoints(tmp_path)
  assert saved, "the run diverged before its first checkpoint: the test checks nothing"
  for step, state in saved.items():
    leaves = jax.tree.leaves(state)
    assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.inexact)), step
  # The advised fix, a lower learning rate, resumes the run rather than being another config.
  last_good = max(saved)
  config.optim.lr = 1e-3
  assert rundir.config_differences(json.loads((tmp_path / "config.json").read_text()),
                                  json.loads(config_lib.to_json(config))) == []
  train.train(config, str(tmp_path), progress=False)
  assert checkpoints.latest_step(tmp_path) == 8
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e-3
  assert _logged_steps(tmp_path) == sorted(set(_logged_steps(tmp_path)))
  assert _logged_steps(tmp_path)[:1] == [2] and last_good < 8


# ---------------------------------------------------------------------------------------------
# One writer per workdir.


def test_a_locked_workdir_is_refused_at_once_and_left_untouched(tmp_path):
  config = helpers.tiny_config("natural")
  with checkpoints.writer_lock(tmp_path):
    for overwrite in (False, True):
      tic = time.perf_counter()
      with pytest.raises(errors.WorkdirError, match=f"pid {os.getpid()} on host "):
        train.train(config, str(tmp_path), progress=False, overwrite=overwrite)
      assert time.perf_counter() - tic < 10
  assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoints.LOCK_FILE]


HOLD_LOCK = """
import sys, time
from gacd_jax import checkpoints
from gacd_jax import config as config_lib
with checkpoints.writer_lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(120)
"""


def test_the_lock_names_another_process_and_dies_with_it(tmp_path):
  env = dict(os.environ, PYTHONPATH=helpers.REPO, JAX_PLATFORMS="cpu")
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=helpers.REPO)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(errors.WorkdirError, match=f"pid {holder.pid} on host "):
      with checkpoints.writer_lock(tmp_path):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)  # no cleanup runs: the OS releases the lock
    holder.wait()
  with checkpoints.writer_lock(tmp_path):
    assert (tmp_path / checkpoints.LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")


def test_an_unwritable_workdir_is_one_clear_error(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(errors.WorkdirError, match="is a file"):
    with checkpoints.writer_lock(tmp_path / "file"):
      pass
  with pytest.raises(errors.WorkdirError, match="cannot write to"):
    with checkpoints.writer_lock(tmp_path / "file" / "run"):
      pass


# ---------------------------------------------------------------------------------------------
# Logs after a resume.


def _tensorboard_steps(workdir, tag: str) -> list[tuple[int, float]]:
  """(step, value) of `tag` as TensorBoard shows them: event files read in name order, and a
  SessionLog.START at step s discarding the events read so far at steps >= s (its rule for runs
  restarted from a checkpoint)."""
  events = []
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    raw = path.read_bytes()
    offset = 0
    while offset < len(raw):
      (length,) = struct.unpack("<Q", raw[offset:offset + 8])
      event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      if event.session_log.status == event_pb2.SessionLog.START:
        events = [(s, v) for s, v in events if s < event.step]
      events += [(event.step, value.simple_value) for value in event.summary.value
                 if value.tag == tag]
  return events


def test_logs_hold_each_step_once_after_a_crash_between_logging_and_checkpointing(tmp_path):
  config = helpers.tiny_config("natural", epochs=2)  # 8 steps, logged and saved every 2
  train.train(config, str(tmp_path), progress=False, stop_after=3)
  assert _logged_steps(tmp_path) == [2, 3]
  # What a process killed after logging steps 4 and 6 but before saving them leaves behind,
  # including a line cut short.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "loss": -1.0}\n{"step": 6, "loss": -1.0}\n{"step": 8, "lo')
  writer = SummaryWriter(str(tmp_path), filename_suffix=f".{time.time_ns()}")
  for step in (4, 6):
    writer.add_scalar("train/loss", -1.0, step)
  writer.close()

  train.train(config, str(tmp_path), progress=False)
  assert _logged_steps(tmp_path) == [2, 3, 4, 6, 8]
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(line["loss"] > 0 for line in lines)
  shown = _tensorboard_steps(tmp_path, "train/loss")
  assert [s for s, _ in shown] == [2, 3, 4, 6, 8]
  np.testing.assert_allclose([v for _, v in shown], [line["loss"] for line in lines], rtol=1e-6)


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\nnot json\n{"step": "3"}\n{"step": 3}\n{"ste')
  rundir.truncate_metrics(path, 2)
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
  rundir.truncate_metrics(tmp_path / "absent.jsonl", 2)
  assert not (tmp_path / "absent.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Validation before anything is written.


def test_a_start_that_fails_validation_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(errors.ConfigError, match="teacher.workdir"):
    train.train(helpers.tiny_config("ard"), str(workdir), progress=False)
  too_big = helpers.tiny_config("natural")
  too_big.train.batch_size = 256  # 128 examples
  with pytest.raises(errors.ConfigError, match="batch_size=256 is larger than the 128"):
    train.train(too_big, str(workdir), progress=False)
  assert not workdir.exists()
  # so the corrected command, another config, is not refused as "a different config"
  train.train(helpers.tiny_config("natural"), str(workdir), progress=False, stop_after=2)
  assert checkpoints.latest_step(workdir) == 2


def test_a_teacher_of_other_classes_is_refused_by_soft_label_methods_only(tmp_path):
  teacher = tmp_path / "teacher_0_4"
  five = helpers.tiny_config("natural")
  five.data.classes = (0, 1, 2, 3, 4)
  train.train(five, str(teacher), progress=False, stop_after=1)
  for method in ("ard", "kd"):
    workdir = tmp_path / method
    with pytest.raises(errors.ConfigError,
                       match=f"predicts 5 classes but digits has 10; method '{method}'"):
      train.train(helpers.tiny_config(method, teacher_workdir=str(teacher)), str(workdir),
                  progress=False)
    assert not workdir.exists()
  # CRD distils the teacher's features alone: a teacher of other classes serves.
  train.train(helpers.tiny_config("crd", teacher_workdir=str(teacher)), str(tmp_path / "crd"),
              progress=False, stop_after=1)
  assert checkpoints.latest_step(tmp_path / "crd") == 1


def test_a_run_resumes_only_with_the_teacher_it_started_with(tmp_path):
  teacher, student = tmp_path / "teacher", tmp_path / "student"
  teacher_config = helpers.tiny_config("natural")  # 4 steps
  train.train(teacher_config, str(teacher), progress=False, stop_after=1)
  config = helpers.tiny_config("kd", teacher_workdir=str(teacher))
  train.train(config, str(student), progress=False, stop_after=1)
  started_with = checkpoints.read_run_info(student)["teacher"]["sha256"]
  train.train(config, str(student), progress=False, stop_after=2)  # the same teacher: resumes
  assert checkpoints.latest_step(student) == 2

  train.train(teacher_config, str(teacher), progress=False, stop_after=2)  # the teacher moves on
  now = checkpoints.content_hash(checkpoints.load_model(teacher)[1])
  assert now != started_with
  with pytest.raises(errors.CheckpointError, match="the teacher changed since the run") as e:
    train.train(config, str(student), progress=False)
  message = str(e.value)
  assert "\n" not in message and now[:12] in message and started_with[:12] in message
  assert "original teacher" in message and "--overwrite" in message
  # Refused before anything is written: the run still records the teacher it started with.
  assert checkpoints.latest_step(student) == 2
  assert checkpoints.read_run_info(student)["teacher"]["sha256"] == started_with

  # --overwrite starts the run over with the new teacher.
  train.train(config, str(student), progress=False, overwrite=True, stop_after=1)
  assert checkpoints.latest_step(student) == 1 and _logged_steps(student) == [1]
  assert checkpoints.read_run_info(student)["teacher"]["sha256"] == now


# ---------------------------------------------------------------------------------------------
# Checkpoint integrity.


def _flip_a_byte(step_dir: pathlib.Path) -> pathlib.Path:
  """Flip one byte in the middle of the checkpoint's largest data file."""
  target = max((p for p in step_dir.rglob("*") if p.is_file() and "ocdbt" in str(p)
                and p.name != "manifest.ocdbt"), key=lambda p: p.stat().st_size)
  raw = bytearray(target.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  target.write_bytes(bytes(raw))
  return target


def test_a_damaged_checkpoint_is_refused_and_training_falls_back_to_the_previous(tmp_path,
                                                                               caplog):
  config = helpers.tiny_config("natural")  # 4 steps, checkpoints 2 and 4
  train.train(config, str(tmp_path), progress=False)
  _, before = checkpoints.restore(tmp_path)
  manifest = json.loads((tmp_path / "checkpoints" / "4" / checkpoints.MANIFEST_FILE).read_text())
  assert len(manifest["sha256"]) > 5 and checkpoints.damage(tmp_path, 4) is None

  damaged = _flip_a_byte(tmp_path / "checkpoints" / "4")
  assert checkpoints.damage(tmp_path, 4) == (
      f"{damaged.relative_to(tmp_path / 'checkpoints' / '4')} does not match its SHA-256")
  with pytest.raises(errors.CheckpointError, match="checkpoint step 4 .* is damaged") as e:
    checkpoints.load_model(tmp_path)
  assert "\n" not in str(e.value)

  with caplog.at_level("WARNING"):
    train.train(config, str(tmp_path), progress=False)
  assert "checkpoint step 4" in caplog.text and "corrupt-4" in caplog.text
  corrupt = tmp_path / "checkpoints" / "corrupt-4"
  assert corrupt.is_dir() and damaged.name in {p.name for p in corrupt.rglob("*")}
  assert checkpoints.latest_step(tmp_path) == 4 and checkpoints.damage(tmp_path, 4) is None
  _, after = checkpoints.restore(tmp_path)  # steps 3 and 4 again, from checkpoint 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), before, after)
  assert _logged_steps(tmp_path) == [2, 4]


# ---------------------------------------------------------------------------------------------
# kill -9 in the middle of a checkpoint write.

# Trains the tiny GACD run of `_kill_config` and SIGKILLs itself at one point of the checkpoint
# write of step `sys.argv[3]`: 'commit' (every file written to orbax's temporary directory, just
# before the rename that commits it) or 'manifest' (committed, before its SHA-256 manifest).
KILLED_RUN = """
import os, pathlib, signal, sys
from orbax.checkpoint._src.path import async_path
from gacd_jax import checkpoints, train
from tests.test_reliability import _kill_config
teacher, workdir, step, point = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

def die():
  os.kill(os.getpid(), signal.SIGKILL)

rename, write_json = async_path.rename, checkpoints.write_json
async def rename_or_die(src, dst):
  if point == "commit" and pathlib.Path(dst).name == step:
    die()
  return await rename(src, dst)
def write_json_or_die(path, obj):
  path = pathlib.Path(path)
  if point == "manifest" and path.name == checkpoints.MANIFEST_FILE and path.parent.name == step:
    die()
  return write_json(path, obj)
async_path.rename, checkpoints.write_json = rename_or_die, write_json_or_die
train.train(_kill_config(teacher), workdir, progress=False)
"""


def _kill_config(teacher: str):
  """A tiny GACD run with memory banks (8 steps, checkpoints every 2)."""
  config = helpers.tiny_config("gacd", epochs=2, teacher_workdir=teacher)
  config.method.gacd.update(gacd_lib.RECONSTRUCTION)
  return config


def test_kill_9_during_a_checkpoint_write_then_resume_is_bit_identical(tmp_path):
  teacher = tmp_path / "teacher"
  train.train(helpers.tiny_config("natural"), str(teacher), progress=False, stop_after=1)
  config = _kill_config(str(teacher))
  train.train(config, str(tmp_path / "whole"), progress=False)

  killed = tmp_path / "killed"
  env = dict(os.environ, PYTHONPATH=helpers.REPO, XLA_FLAGS=helpers.device_flags(1))
  for step, point, latest in (("4", "commit", 2), ("6", "manifest", 6)):
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(teacher), str(killed), step,
                           point], env=env, capture_output=True, text=True, timeout=600,
                          cwd=helpers.REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # The interrupted checkpoint never became the latest, or became it complete but unverified.
    assert checkpoints.latest_step(killed) == latest
    assert (killed / "checkpoints" / step / checkpoints.MANIFEST_FILE).exists() is False
  train.train(config, str(killed), progress=False)

  whole, resumed = _all_checkpoints(tmp_path / "whole"), _all_checkpoints(killed)
  assert sorted(whole) == sorted(resumed) == [6, 8]
  assert resumed[8]["method_state"], "the run has no memory banks to compare"
  jax.tree.map(np.testing.assert_array_equal, whole[8], resumed[8])
  assert _logged_steps(killed) == _logged_steps(tmp_path / "whole")
