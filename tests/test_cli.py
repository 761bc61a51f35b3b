"""The command line: bad input gets one clear message and a non-zero exit, never a traceback;
train, resume, evaluate and the demo work end to end."""

import json
import os

import pytest

from gacd_jax import checkpoints
from tests import helpers

DIGITS = "configs/digits.py"
TINY = ["--config.data.num_examples=64", "--config.train.batch_size=32",
        "--config.train.epochs=1", "--config.model.small_cnn.width=4", "--config.attack.steps=1",
        "--config.eval.max_examples=32", "--config.eval.batch_size=32",
        "--config.eval.pgd_steps=1", "--config.eval.cw_steps=1", "--noprogress"]


def _assert_clean_error(proc, *fragments):
  assert proc.returncode != 0, proc.stdout
  assert "Traceback" not in proc.stderr, proc.stderr
  for fragment in fragments:
    assert fragment in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("teacher")
  proc = helpers.run_cli("train", f"--config={DIGITS}:pgd_at", f"--workdir={workdir}", *TINY)
  assert proc.returncode == 0, proc.stderr
  return workdir


@pytest.mark.parametrize("override,fragments", [
    ("--config.model.name=resnet19", ["unknown model 'resnet19'", "resnet18"]),
    ("--config.data.name=mnist", ["unknown dataset 'mnist'", "digits"]),
    ("--config.method.name=gacdd", ["unknown method 'gacdd'", "ard"]),
    ("--config.attack.eps=8", ["attack.eps=8", "[0, 1]"]),
    ("--config.eval.eps=-0.1", ["eval.eps=-0.1", "[0, 1]"]),
    ("--config.train.lerning_rate=0.1", ["lerning_rate"]),
    ("--config.method.name=ard", ["teacher.workdir"]),
])
def test_bad_config_is_one_clear_message(tmp_path, override, fragments):
  proc = helpers.run_cli("train", f"--config={DIGITS}", f"--workdir={tmp_path}", *TINY, override)
  _assert_clean_error(proc, *fragments)


def test_a_missing_teacher_directory(tmp_path):
  proc = helpers.run_cli("train", f"--config={DIGITS}:ard", f"--workdir={tmp_path / 'run'}",
                         *TINY, f"--config.teacher.workdir={tmp_path / 'nowhere'}")
  _assert_clean_error(proc, "does not exist", "nowhere")


def test_a_teacher_of_another_architecture(tmp_path, teacher_dir):
  proc = helpers.run_cli("train", f"--config={DIGITS}:ard", f"--workdir={tmp_path / 'run'}",
                         *TINY, f"--config.teacher.workdir={teacher_dir}",
                         "--config.teacher.model=resnet18")
  _assert_clean_error(proc, "small_cnn", "resnet18")


def test_a_teacher_whose_parameters_do_not_fit_its_config(tmp_path, teacher_dir):
  fake = tmp_path / "fake_teacher"
  fake.mkdir()
  for name in ("run.json", "checkpoints"):
    (fake / name).symlink_to(teacher_dir / name)
  config = json.loads((teacher_dir / "config.json").read_text())
  config["model"]["small_cnn"]["width"] = 7
  (fake / "config.json").write_text(json.dumps(config))
  proc = helpers.run_cli("train", f"--config={DIGITS}:ard", f"--workdir={tmp_path / 'run'}",
                         *TINY, f"--config.teacher.workdir={fake}")
  _assert_clean_error(proc, "do not fit", "expected shape")


def test_a_workdir_of_another_config(tmp_path, teacher_dir):
  proc = helpers.run_cli("train", f"--config={DIGITS}:natural", f"--workdir={teacher_dir}", *TINY)
  _assert_clean_error(proc, "different config", "--overwrite")


def test_a_workdir_another_train_is_writing(tmp_path):
  with checkpoints.writer_lock(tmp_path):  # this process stands in for the running train
    proc = helpers.run_cli("train", f"--config={DIGITS}:natural", f"--workdir={tmp_path}", *TINY,
                           "--overwrite")
  _assert_clean_error(proc, "being written by another gacd-jax train", f"pid {os.getpid()} ")
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not (tmp_path / "config.json").exists()


def test_unknown_command():
  _assert_clean_error(helpers.run_cli("trian"), "unknown command 'trian'")


def test_train_resume_and_evaluate(tmp_path, teacher_dir):
  run = tmp_path / "ard"
  args = ["train", f"--config={DIGITS}:ard", f"--workdir={run}", *TINY,
          f"--config.teacher.workdir={teacher_dir}"]
  proc = helpers.run_cli(*args)
  assert proc.returncode == 0, proc.stderr
  info = json.loads((run / "run.json").read_text())
  assert info["teacher"]["model"] == "small_cnn" and len(info["teacher"]["sha256"]) == 64
  # a second call finds the finished run and resumes it (nothing left to do)
  again = helpers.run_cli(*args)
  assert again.returncode == 0, again.stderr
  # On the validation split: its own files, and the table printed is that split's.
  proc = helpers.run_cli("evaluate", f"--config={DIGITS}:ard", f"--workdir={run}", *TINY[:-1],
                         "--config.eval.split=validation")
  assert proc.returncode == 0, proc.stderr
  results = json.loads((run / "eval-validation.json").read_text())
  assert set(results["accuracy"]) == set(results["seconds"]) == {"clean", "fgsm", "pgd20", "cw"}
  assert all(0.0 <= v <= 1.0 for v in results["accuracy"].values())
  assert results["examples"] == 32 and results["suite"] == "basic"
  assert results["split"] == "validation" and not (run / "eval.json").exists()
  assert "| PGD-20" in (run / "report-validation.md").read_text()
  assert "PGD-20" in proc.stdout and "digits validation split" in proc.stdout


def test_demo_smoke_run(tmp_path):
  proc = helpers.run_cli("demo", f"--workdir={tmp_path}", "--smoke", "--noprogress")
  assert proc.returncode == 0, proc.stderr
  assert "teacher_pgd_at PGD-20" not in proc.stderr  # --noprogress: no evaluation bars either
  report = (tmp_path / "report.md").read_text()
  for name in ("teacher_pgd_at", "student_natural", "student_ard", "student_gacd", "PGD-20",
               "CW-inf"):
    assert name in report and name in proc.stdout
  png = (tmp_path / "robustness.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 5000
