"""Malformed command lines (issue #11): each is refused with exit code 2 and one line on stderr
that names the problem, never a traceback.

Every case calls `gacd_jax.cli.main` in this process, against one tiny trained run made once for
the module, so the table runs in seconds. A case is `(command line, fragment of the message)`;
the command line is formatted with the paths of `paths` and `{tmp}`, a fresh directory.
"""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

from gacd_jax import cli
from gacd_jax import runtime
from gacd_jax import torch_convert
from gacd_jax import train
from tests import helpers

DIGITS = os.path.join(helpers.REPO, "configs", "digits.py")
TRAIN = "train --config={digits}:natural --workdir={tmp}/run"
EVALUATE = "evaluate --config={digits}:natural --workdir={run}"
ANALYSE = "analyse --runs={run} --out={tmp}/out"
PROBE = "probe --config={digits}:natural --workdir={run} --out={tmp}/probe"
IMPORT = ("import-teacher --torch_checkpoint={weights} --out={tmp}/teacher --num_classes=10 "
          "--image_size=8 --channels=1")

# Config files that fail in each way a Python file can.
CONFIG_FILES = {
    "syntax.py": "def get_config(:\n  return 1\n",
    "raises.py": "def get_config():\n  raise RuntimeError('this config needs a GPU')\n",
    "raises_value.py": "def get_config():\n  raise ValueError('width must be even')\n",
    "import_error.py": "import not_a_module_of_gacd\n",
    "returns_int.py": "def get_config():\n  return 7\n",
    "returns_none.py": "def get_config():\n  pass\n",
    "no_get_config.py": "CONFIG = {'seed': 0}\n",
    "needs_arg.py": "def get_config(method):\n  return None\n",
}

CASES = [
    # The command itself.
    ("", "no command given"),
    ("trian", "unknown command 'trian'"),
    ("--workdir=x train", "unknown command '--workdir=x'"),
    # train: flags.
    ("train --config={digits}", "--workdir is required"),
    ("train --workdir={tmp}/run", "--config is required"),
    (TRAIN + " --epochs=3", "Unknown command line flag 'epochs'"),
    (TRAIN + " --overwrite=maybe", "Non-boolean argument to boolean flag"),
    (TRAIN + " extra", "unexpected arguments 'extra'"),
    ("train --config={digits} --workdir=", "--workdir is empty"),
    (TRAIN + " --coordinator=127.0.0.1:1234", "--coordinator only take effect with --distributed"),
    (TRAIN + " --distributed --coordinator=127.0.0.1:1234", "--coordinator needs --num_processes"),
    (TRAIN + " --num_processes=two", "--num_processes=two"),
    # train: config files.
    ("train --config= --workdir={tmp}/run", "--config is empty"),
    ("train --config={configs}/missing.py --workdir={tmp}/run", "missing.py does not exist"),
    ("train --config={configs} --workdir={tmp}/run", "is a directory"),
    ("train --config={configs}/syntax.py --workdir={tmp}/run", "syntax error at line 1"),
    ("train --config={configs}/raises.py --workdir={tmp}/run",
     "RuntimeError: this config needs a GPU"),
    ("train --config={configs}/raises_value.py --workdir={tmp}/run",
     "ValueError: width must be even"),
    ("train --config={configs}/import_error.py --workdir={tmp}/run",
     "No module named 'not_a_module_of_gacd'"),
    ("train --config={configs}/returns_int.py --workdir={tmp}/run", "returned int 7, not a ConfigDict"),
    ("train --config={configs}/returns_none.py --workdir={tmp}/run", "returned NoneType None"),
    ("train --config={configs}/no_get_config.py --workdir={tmp}/run", "defines no get_config()"),
    ("train --config={configs}/needs_arg.py --workdir={tmp}/run",
     "missing 1 required positional argument: 'method'"),
    ("train --config={digits}:nosuch --workdir={tmp}/run", "unknown method 'nosuch'"),
    # train: config overrides.
    (TRAIN + " --config.train.epoch=3", "config.train has no key 'epoch'; did you mean config.train.epochs?"),
    (TRAIN + " --config.trian.epochs=3", "the config has no key 'trian'; did you mean config.train?"),
    (TRAIN + " --config.seed.value=3", "config.seed is a single value (0)"),
    (TRAIN + " --config.optim.milestones.0=3", "config.optim.milestones is a single value"),
    (TRAIN + " --config.train.epochs=abc", "--config.train.epochs=abc: invalid literal for int()"),
    (TRAIN + " --config.train.epochs=1.5", "--config.train.epochs=1.5"),
    (TRAIN + " --config.train.epochs=0", "config.train.epochs=0 must be a positive integer"),
    (TRAIN + " --config.train.batch_size=0", "config.train.batch_size=0 must be a positive"),
    (TRAIN + " --config.train.batch_size=100000", "batch_size=100000 is larger than the"),
    (TRAIN + " --config.optim.lr=-0.1", "config.optim.lr=-0.1 must be a positive number"),
    (TRAIN + " --config.optim.lr=0", "config.optim.lr=0.0 must be a positive number"),
    (TRAIN + " --config.optim.milestones=abc", "config.optim.milestones="),
    (TRAIN + " --config.optim.milestones='(10, -1)'", "config.optim.milestones=(10, -1)"),
    (TRAIN + " --config.optim.momentum=1.5", "config.optim.momentum=1.5 must be in [0, 1)"),
    (TRAIN + " --config.optim.weight_decay=-1.0", "config.optim.weight_decay=-1.0"),
    (TRAIN + " --config.optim.schedule=linear", "config.optim.schedule='linear' is not one of"),
    (TRAIN + " --config.eval.max_examples=-5", "config.eval.max_examples=-5 must be an integer >= 0"),
    (TRAIN + " --config.model.name=resnet19", "unknown model 'resnet19'"),
    (TRAIN + " --config.data.name=mnist", "unknown dataset 'mnist'"),
    (TRAIN + " --config.data.channels=-1", "channels must be positive, got -1"),
    (TRAIN + " --config.data.classes='(3,)'", "keeps one class"),
    (TRAIN + " --config.method.name=gacdd", "unknown method 'gacdd'"),
    (TRAIN + " --config.attack.eps=8.0", "config.attack.eps=8.0"),
    (TRAIN + " --config.precision=fp16", "config.precision='fp16' is not one of"),
    # train: teachers and workdirs.
    ("train --config={digits}:ard --workdir={tmp}/run", "set --config.teacher.workdir"),
    ("train --config={digits}:ard --workdir={tmp}/run --config.teacher.workdir={tmp}/nowhere",
     "nowhere does not exist"),
    ("train --config={digits}:ard --workdir={tmp}/run --config.teacher.workdir={run} "
     "--config.teacher.model=resnet18", "is a small_cnn, but config.teacher.model says 'resnet18'"),
    ("train --config={digits}:natural --workdir={file}", "is a file, not a directory"),
    ("train --config={digits}:natural --workdir=/proc/gacd_run", "cannot write to /proc/gacd_run"),
    ("train --config={digits}:natural --workdir={readonly}", "cannot write to"),
    ("train --config={digits}:pgd_at --workdir={run}", "holds a run with a different config"),
    # evaluate.
    ("evaluate --config={digits}", "--workdir is required"),
    ("evaluate --workdir={run}", "--config is required"),
    (EVALUATE + " --overwrite", "Unknown command line flag 'overwrite'"),
    ("evaluate --config={digits} --workdir={tmp}/nowhere", "nowhere does not exist"),
    ("evaluate --config={digits} --workdir={tmp}", "holds no config.json"),
    ("evaluate --config={digits} --workdir={file}", "is a file, not a run directory"),
    (EVALUATE + " --config.data.channels=3", "takes 1-channel images but digits has 3"),
    (EVALUATE + " --config.data.classes='(0, 1, 2)'", "predicts 10 classes but digits test has 3"),
    (EVALUATE + " --config.eval.max_examples=-5", "config.eval.max_examples=-5"),
    (EVALUATE + " --config.eval.batch_size=0", "config.eval.batch_size=0"),
    (EVALUATE + " --config.eval.suite=fastest", "config.eval.suite='fastest' is not one of"),
    (EVALUATE + " --config.eval.pgd_steps=-1", "attack step counts must be >= 0"),
    (EVALUATE + " --config.eval.split=validation --config.data.name=synthetic",
     "synthetic has no validation split"),
    ("evaluate --config={digits}:natural --workdir={readonly}", "cannot write to"),
    # analyse.
    ("analyse --out={tmp}/out", "--runs is required"),
    ("analyse --runs={run}", "--out is required"),
    ("analyse --runs= --out={tmp}/out", "--runs is empty"),
    (ANALYSE + " --teacher={run} --max_examples=-3", "max_examples=-3 must be an integer >= 0"),
    (ANALYSE + " --teacher={run} --max_examples=2", "needs at least 3"),
    (ANALYSE + " --max_examples=abc", "--max_examples=abc"),
    (ANALYSE, "the runs do not all record the same teacher"),
    ("analyse --runs={run} --out={file}", "is a file, not a directory"),
    ("analyse --runs={run} --out=/proc/gacd_out", "cannot write to /proc/gacd_out"),
    ("analyse --runs={tmp}/nowhere --out={tmp}/out --teacher={run}", "nowhere does not exist"),
    (ANALYSE + " --teacher={tmp}/nowhere", "nowhere does not exist"),
    (ANALYSE + " --curves --steps=a,b", "--steps=a,b must be integers"),
    (ANALYSE + " --curves --steps=5,1", "must be positive and increasing"),
    (ANALYSE + " --curves --steps=10,15", "at least twice the one before"),
    (ANALYSE + " --nostructure", "leaves nothing to do"),
    (ANALYSE + " --teacher={run} --config={digits} --config.data.channels=3",
     "takes 1-channel images"),
    # probe.
    ("probe --workdir={run} --out={tmp}/probe", "--config is required"),
    ("probe --config={digits} --out={tmp}/probe", "--workdir is required"),
    ("probe --config={digits} --workdir={run}", "--out is required"),
    (PROBE + " --train_steps=0", "probe steps must be positive, got 0"),
    (PROBE + " --learning_rate=-1", "learning rate must be positive"),
    (PROBE + " --train_batch_size=abc", "--train_batch_size=abc"),
    (PROBE + " --attacks=fgsm,foo", "unknown attacks ['foo']"),
    (PROBE + " --attacks=", "--attacks is empty"),
    ("probe --config={digits}:natural --workdir={run} --out={file}", "is a file, not a directory"),
    ("probe --config={digits}:natural --workdir={tmp}/nowhere --out={tmp}/probe",
     "nowhere does not exist"),
    (PROBE + " --config.data.channels=3", "takes 1-channel images"),
    # export-torch.
    ("export-torch --out={tmp}/model.pt", "--workdir is required"),
    ("export-torch --workdir={run}", "--out is required"),
    ("export-torch --workdir={run} --out=/missing_dir/x.pt", "the directory /missing_dir does not exist"),
    ("export-torch --workdir={run} --out={tmp}", "is a directory; name the file to write"),
    ("export-torch --workdir={tmp}/nowhere --out={tmp}/model.pt", "nowhere does not exist"),
    ("export-torch --workdir={file} --out={tmp}/model.pt", "is a file, not a run directory"),
    # import-teacher.
    ("import-teacher --torch_checkpoint={weights} --out={tmp}/teacher", "give one of --arch NAME"),
    ("import-teacher --arch=small_cnn --out={tmp}/teacher", "--torch_checkpoint is required"),
    ("import-teacher --arch=small_cnn --torch-checkpoint={weights} --out={tmp}/teacher",
     "Unknown command line flag 'torch-checkpoint'"),
    ("import-teacher --arch=small_cnn --torch_checkpoint={tmp}/missing.pt --out={tmp}/teacher",
     "missing.pt does not exist"),
    ("import-teacher --arch=small_cnn --torch_checkpoint={file} --out={tmp}/teacher",
     "not a PyTorch checkpoint"),
    ("import-teacher --arch=small_cnn --torch_checkpoint={notes_safetensors} --out={tmp}/teacher",
     "not a safetensors file"),
    (IMPORT + " --arch=resnet18", "do not fit a resnet18 with 10 classes"),
    (IMPORT + " --arch=nosuch", "nosuch"),
    (IMPORT + " --arch=small_cnn --model_option=width", "--model_option='width' must look like KEY=VALUE"),
    (IMPORT + " --arch=small_cnn --input_mean=0.5,x --input_std=1,1",
     "--input_mean=0.5,x must be numbers"),
    (IMPORT + " --arch=small_cnn --input_mean=0.5,0.5",
     "input_mean (0.5, 0.5) and input_std () must be given together"),
    (IMPORT + " --arch=small_cnn --dataset=cifar100",
     "--dataset names the dataset of a --robustbench model"),
    (IMPORT + " --arch=small_cnn --model_option=depth=28", "'small_cnn' has no option 'depth'"),
    (IMPORT + " --arch=small_cnn", "do not fit a small_cnn with 10 classes"),
    (IMPORT + " --arch=small_cnn --num_classes=0", "num_classes=0 and image_shape=(8, 8, 1) must be positive"),
    (IMPORT + " --arch=small_cnn --channels=abc", "--channels=abc"),
    ("import-teacher --arch=small_cnn --torch_checkpoint={weights} --out={run}",
     "already exists and is not empty"),
    ("import-teacher --arch=small_cnn --torch_checkpoint={weights} --out={file}",
     "is a file, not a directory"),
    # import-teacher --robustbench.
    ("import-teacher --robustbench=Rebuffi2021Fixing --torch_checkpoint={weights} --out={tmp}/t",
     "'Rebuffi2021Fixing' is not a supported RobustBench cifar10 Linf model; did you mean"),
    ("import-teacher --robustbench=Addepalli2021Towards_PARN18 --torch_checkpoint={weights} "
     "--out={tmp}/t", "it is a cifar100 model: add --dataset cifar100"),
    ("import-teacher --robustbench=Engstrom2019Robustness --torch_checkpoint={weights} "
     "--out={tmp}/t", "--robustbench list` prints the supported names"),
    ("import-teacher --robustbench=Standard --dataset=imagenet --torch_checkpoint={weights} "
     "--out={tmp}/t", "--dataset=imagenet"),
    ("import-teacher --robustbench=Standard --arch=wrn --torch_checkpoint={weights} --out={tmp}/t",
     "give one of --arch NAME"),
    ("import-teacher --robustbench=Standard --num_classes=10 --torch_checkpoint={weights} "
     "--out={tmp}/t", "--num_classes cannot be combined with --robustbench"),
    ("import-teacher --robustbench=Standard --torch_checkpoint={weights}", "--out is required"),
    ("import-teacher --robustbench=Rebuffi2021Fixing_R18_ddpm --torch_checkpoint={weights} "
     "--out={tmp}/t", "is not RobustBench's cifar10 Rebuffi2021Fixing_R18_ddpm (dm_preact_resnet "
     "depth=18 activation=swish, normalised"),
    # demo.
    ("demo", "--workdir is required"),
    ("demo --workdir={file}", "is a file, not a directory"),
    ("demo --workdir=/proc/gacd_demo", "cannot write to /proc/gacd_demo"),
    ("demo --workdir={tmp}/demo --smoke=maybe", "Non-boolean argument to boolean flag"),
    ("demo --workdir={tmp}/demo --epochs=1", "Unknown command line flag 'epochs'"),
    ("demo --workdir={tmp}/demo extra", "unexpected arguments 'extra'"),
    # info.
    ("info --bogus", "Unknown command line flag 'bogus'"),
    ("info extra", "unexpected arguments 'extra'"),
]


def _set_read_only(path: pathlib.Path, read_only: bool) -> bool:
  """Make `path` and everything in it read-only (or writable again); return whether this process
  then cannot create a file in it. Root ignores permission bits, so there `chattr +i` (immutable)
  is used too, where the filesystem supports it."""
  immutable = os.geteuid() == 0 and shutil.which("chattr")
  if not read_only and immutable:
    subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True, check=False)
  subprocess.run(["chmod", "-R", "a-w" if read_only else "u+w", str(path)], check=True)
  if read_only and immutable:
    subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True, check=False)
  try:
    (path / ".probe").touch()
  except OSError:
    return True
  (path / ".probe").unlink()
  return False


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  """One tiny trained run (1 step), its PyTorch export, broken config files, a plain file, and a
  read-only copy of the run (None where this process cannot make one)."""
  root = tmp_path_factory.mktemp("invocations")
  run = root / "run"
  train.train(helpers.tiny_config("natural"), str(run), progress=False, stop_after=1)
  weights = root / "weights.pt"
  torch_convert.export_torch(run, weights)
  file = root / "notes.txt"
  file.write_text("not a checkpoint, not a directory\n")
  notes_safetensors = root / "notes.safetensors"
  notes_safetensors.write_text("not a safetensors file\n")
  configs = root / "configs"
  configs.mkdir()
  for name, text in CONFIG_FILES.items():
    (configs / name).write_text(text)
  readonly = root / "readonly"
  shutil.copytree(run, readonly)
  read_only = _set_read_only(readonly, True)
  yield {"digits": DIGITS, "run": run, "weights": weights, "file": file,
         "notes_safetensors": notes_safetensors, "configs": configs,
         "readonly": readonly if read_only else None}
  _set_read_only(readonly, False)


@pytest.fixture(autouse=True)
def _test_compilation_cache(monkeypatch):
  """`main` turns on the persistent compilation cache: the tests' own, not the user's."""
  monkeypatch.setenv(runtime.CACHE_ENV, os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.mark.parametrize("command,fragment", CASES, ids=[c for c, _ in CASES])
def test_a_malformed_command_line_is_one_line_and_exit_code_2(command, fragment, paths, tmp_path,
                                                              capsys):
  if "{readonly}" in command and paths["readonly"] is None:
    pytest.skip("this process cannot make a directory read-only (root without chattr)")
  argv = shlex.split(command.format(**paths, tmp=tmp_path))
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["gacd-jax", *argv])
  out, err = capsys.readouterr()
  assert "Traceback" not in out + err, err
  assert exit_info.value.code == 2, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("gacd-jax: error: ") and fragment in lines[0], lines[0]


def test_the_table_covers_every_command():
  assert len(CASES) >= 60
  tested = {shlex.split(command)[0] for command, _ in CASES if command}
  assert set(cli.COMMANDS) <= tested, set(cli.COMMANDS) - tested


def test_main_can_be_called_again_in_one_process(paths, capsys):
  """The flags of one call are gone after it: the next defines its own, and reads its own
  overrides."""
  for _ in range(2):
    with pytest.raises(SystemExit):
      cli.main(["gacd-jax", "evaluate", f"--config={DIGITS}:natural", f"--workdir={paths['run']}",
                "--config.eval.max_examples=-7"])
    assert "config.eval.max_examples=-7" in capsys.readouterr().err
