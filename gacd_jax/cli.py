"""The `gacd-jax` command line.

  gacd-jax demo --workdir DIR
  gacd-jax train --config configs/X.py --workdir DIR [--config.key=value ...] [--overwrite]
  gacd-jax evaluate --config configs/X.py --workdir DIR [--config.key=value ...]

Each subcommand has its own absl flags; configs are ml_collections files whose keys are locked, so
a misspelt `--config.key` is an error rather than a silent no-op. A user error (`GacdError`) is
printed as one message with a non-zero exit and no traceback.
"""

import re
import sys
from typing import Callable, NamedTuple

from absl import flags
from absl import logging

from gacd_jax import errors
from gacd_jax import runtime

USAGE = """usage: gacd-jax COMMAND [flags]

commands:
  demo       train a robust teacher, a distilled and a natural student on the bundled digits,
             evaluate them, and write report.md and robustness.png
  train      train (or resume) a run:  --config FILE --workdir DIR [--config.key=value ...]
  evaluate   evaluate a run on the test split (clean, FGSM, PGD-20, CW-inf; with
             --config.eval.suite=standard also AutoAttack): --config FILE --workdir DIR
  import-teacher  convert a PyTorch checkpoint (.pt, .pth, .safetensors) into a teacher run:
             --arch NAME --torch_checkpoint FILE --out DIR [--num_classes 10] [--image_size 32]
             [--channels 3] [--model_option KEY=VALUE ...] [--input_mean M,M,M --input_std S,S,S]
             (e.g. --arch wrn34_10 for TRADES); or a RobustBench model: --robustbench NAME
             [--dataset cifar100] --torch_checkpoint FILE --out DIR  (--robustbench list)
  export-torch  write a run's model as a PyTorch state_dict:  --workdir DIR --out FILE.pt
  analyse    compare students' features with a teacher's (linear CKA, similarity correlation;
             clean and under PGD), and with --curves plot accuracy against eps and PGD steps:
             --runs=DIR,DIR,... --out DIR [--teacher DIR] [--curves] [--config FILE]
  probe      train a linear probe on a run's frozen features on another dataset and attack
             probe and backbone end to end:  --workdir DIR --config FILE --out DIR
  info       what a run here would run on: backend, devices, processes, versions, XLA flags

`gacd-jax COMMAND --help` lists a command's flags.
"""


class _ConfigFileParser(flags.ArgumentParser):
  """Reads --config FILE[:ARG] with `config.load_file` and checks that every --config.KEY=VALUE
  override in `argv` names a key of it, so that a config file that fails and a misspelt key are
  each one `ConfigError` (config_flags lets the first escape as a traceback and reports the
  second as a bare KeyError)."""

  def __init__(self, argv: list[str]):
    self._argv = argv

  def parse(self, argument):
    from gacd_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.load_file(argument)
    for arg in self._argv:
      match = re.match(r"-{1,2}(?:no)?config\.([^=]*)", arg)
      if match:
        config_lib.check_key(config, match.group(1), arg)
    return config

  def flag_type(self):
    return "config file"


def _config_flag(argv: list[str]) -> None:
  """--config FILE[:ARG], whose `--config.key=value` overrides are read from `argv` (not
  sys.argv, so that `main(argv)` called from Python sees its own overrides)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  holder = config_flags.DEFINE_config_file(
      "config", None, "experiment config file (configs/*.py), optionally with :ARG",
      lock_config=True, sys_argv=argv)
  flags.FLAGS[holder.name].parser = _ConfigFileParser(argv)


def _distributed_flags():
  flags.DEFINE_bool("distributed", False, "multi-host: call jax.distributed.initialize() first "
                    "(on TPU pods and SLURM/Open MPI clusters it finds its peers itself)")
  flags.DEFINE_string("coordinator", None, "with --distributed: host:port of process 0, for "
                      "clusters JAX cannot detect (e.g. 127.0.0.1:12345 for local processes)")
  flags.DEFINE_integer("num_processes", None, "with --coordinator: the number of processes")
  flags.DEFINE_integer("process_id", None, "with --coordinator: this process's index")


def _initialize_distributed():
  """Join the other processes before anything touches a device."""
  if not flags.FLAGS.distributed:
    given = [f"--{name}" for name in ("coordinator", "num_processes", "process_id")
             if flags.FLAGS[name].present]
    if given:
      raise errors.ConfigError(
          f"{' and '.join(given)} only take effect with --distributed; add it, or drop them")
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_platforms in (None, "", "cpu") and flags.FLAGS.coordinator:
    # CPU processes exchange data through gloo; accelerators bring their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = {}
  if flags.FLAGS.coordinator:
    if flags.FLAGS.num_processes is None or flags.FLAGS.process_id is None:
      raise errors.ConfigError("--coordinator needs --num_processes and --process_id")
    kw = dict(coordinator_address=flags.FLAGS.coordinator,
              num_processes=flags.FLAGS.num_processes, process_id=flags.FLAGS.process_id)
  jax.distributed.initialize(**kw)


def _define_train():
  _distributed_flags()
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs)", required=True)
  flags.DEFINE_bool("overwrite", False, "replace a run of a different config in --workdir")
  flags.DEFINE_bool("progress", True, "show a progress bar")


def _run_train():
  _initialize_distributed()
  from gacd_jax import train  # pylint: disable=g-import-not-at-top
  config = _required_config()
  metrics = train.train(config, flags.FLAGS.workdir, overwrite=flags.FLAGS.overwrite,
                        progress=flags.FLAGS.progress)
  print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


def _define_evaluate():
  _distributed_flags()
  flags.DEFINE_string("workdir", None, "run directory to evaluate", required=True)
  flags.DEFINE_bool("progress", True, "show progress bars")


def _run_evaluate():
  _initialize_distributed()
  from gacd_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = _required_config()
  evaluate.evaluate_run(config, flags.FLAGS.workdir, progress=flags.FLAGS.progress)
  print((__import__("pathlib").Path(flags.FLAGS.workdir)
         / evaluate.report_file(config.eval.split)).read_text())


def _run_info():
  for key, value in runtime.environment().items():
    print(f"{key + ':':<22} {value}")


def _define_demo():
  flags.DEFINE_string("workdir", None, "directory for the demo's runs and report", required=True)
  flags.DEFINE_bool("smoke", False, "a tiny, seconds-long version (for tests)")
  flags.DEFINE_bool("progress", True, "show progress bars")


def _run_demo():
  from gacd_jax import demo  # pylint: disable=g-import-not-at-top
  table = demo.run(flags.FLAGS.workdir, smoke=flags.FLAGS.smoke, progress=flags.FLAGS.progress)
  print(table)


def _define_import_teacher():
  flags.DEFINE_string("arch", None, "architecture of the checkpoint, e.g. wrn34_10 or resnet18")
  flags.DEFINE_string("robustbench", None, "instead of --arch: a RobustBench Linf model name, "
                      "e.g. Rebuffi2021Fixing_70_16_cutmix_extra, which fixes the architecture, "
                      "its options, the normalisation and the classes; `list` prints the names")
  flags.DEFINE_enum("dataset", "cifar10", ["cifar10", "cifar100"],
                    "the dataset of the --robustbench model")
  # absl does not read dashes as underscores: the flag is spelt --torch_checkpoint.
  flags.DEFINE_string("torch_checkpoint", None, "PyTorch weights: .pt / .pth (read with "
                      "weights_only=True, so pickled code is refused) or .safetensors")
  flags.DEFINE_string("out", None, "new or empty directory for the teacher run")
  flags.DEFINE_integer("num_classes", 10, "number of classes of the checkpoint's linear head")
  flags.DEFINE_integer("image_size", 32, "height and width of the images the teacher takes")
  flags.DEFINE_integer("channels", 3, "channels of the images the teacher takes")
  flags.DEFINE_multi_string("model_option", [], "a model option KEY=VALUE (an integer or a "
                            "word), repeatable, e.g. --model_option=depth=28 "
                            "--model_option=widen_factor=10 for wrn")
  flags.DEFINE_list("input_mean", [], "per-channel mean the model subtracts from its [0, 1] "
                    "input, e.g. 0.4914,0.4822,0.4465 (with --input_std)")
  flags.DEFINE_list("input_std", [], "per-channel std the model divides its input by")


# The flags that describe an architecture, which a --robustbench name fixes.
_ARCH_FLAGS = ("arch", "num_classes", "image_size", "channels", "model_option", "input_mean",
               "input_std")


def _floats(name: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in flags.FLAGS[name].value)
  except ValueError:
    raise errors.ConfigError(
        f"--{name}={','.join(flags.FLAGS[name].value)} must be numbers separated by commas, "
        "e.g. 0.4914,0.4822,0.4465") from None


def _run_import_teacher():
  from gacd_jax import robustbench_teachers, torch_convert  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.robustbench == "list":
    print(robustbench_teachers.listing())
    return
  if (f.arch is None) == (f.robustbench is None):
    raise errors.ConfigError("give one of --arch NAME (any PyTorch checkpoint of a gacd_jax "
                             "architecture) and --robustbench NAME (a RobustBench model)")
  for name in ("torch_checkpoint", "out"):
    if f[name].value is None:
      raise errors.ConfigError(f"--{name} is required; `gacd-jax import-teacher --help` lists "
                               "the flags")
  if f.robustbench is not None:
    given = [name for name in _ARCH_FLAGS if f[name].present]
    if given:
      raise errors.ConfigError(f"--{given[0]} cannot be combined with --robustbench, whose name "
                               "fixes the architecture, its options and the classes")
    entry = robustbench_teachers.import_teacher(f.robustbench, f.torch_checkpoint, f.out,
                                                dataset=f.dataset)
    print(f"wrote RobustBench's {f.dataset} {f.robustbench} "
          f"({robustbench_teachers.describe(entry)}) to {f.out}; use it with "
          f"--config.teacher.workdir={f.out}")
    return
  if f["dataset"].present:
    raise errors.ConfigError("--dataset names the dataset of a --robustbench model; with --arch "
                             "give --num_classes")
  model_kw = {}
  for option in f.model_option:
    key, _, value = option.partition("=")
    if not key or not value:
      raise errors.ConfigError(
          f"--model_option={option!r} must look like KEY=VALUE, e.g. depth=28")
    model_kw[key] = int(value) if re.fullmatch(r"[+-]?\d+", value) else value
  if f.input_mean or f.input_std:
    model_kw.update(input_mean=_floats("input_mean"), input_std=_floats("input_std"))
  torch_convert.import_teacher(f.arch, f.torch_checkpoint, f.out, num_classes=f.num_classes,
                               image_shape=(f.image_size, f.image_size, f.channels), **model_kw)
  print(f"wrote a {f.arch} teacher to {f.out}; use it with --config.teacher.workdir={f.out}")


def _define_export_torch():
  flags.DEFINE_string("workdir", None, "run directory whose model to export", required=True)
  flags.DEFINE_string("out", None, "file to write: .safetensors, or anything else for torch.save",
                      required=True)


def _run_export_torch():
  from gacd_jax import torch_convert  # pylint: disable=g-import-not-at-top
  torch_convert.export_torch(flags.FLAGS.workdir, flags.FLAGS.out)
  print(f"wrote the model of {flags.FLAGS.workdir} to {flags.FLAGS.out}")


def _define_analyse():
  flags.DEFINE_list("runs", None, "comma-separated run directories: --runs=DIR_A,DIR_B",
                    required=True)
  flags.DEFINE_string("out", None, "directory for structure.* and curves.*", required=True)
  flags.DEFINE_string("teacher", None, "teacher run to compare the runs' features with; default: "
                      "the teacher the runs record in run.json")
  flags.DEFINE_bool("structure", True, "write structure.md/.json/.png (needs a teacher)")
  flags.DEFINE_bool("curves", False, "also write curves.md/.json, eps_curve.png and "
                    "steps_curve.png: accuracy against eps and against PGD steps")
  flags.DEFINE_list("steps", ["1", "2", "5", "10", "20", "50"], "PGD step counts for --curves; "
                    "the last at least twice the one before")
  flags.DEFINE_integer("max_examples", 1000, "use the first N test examples (0: all)")


def _run_analyse():
  from gacd_jax import analysis, checkpoints  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not (f.structure or f.curves):
    raise errors.ConfigError("--nostructure without --curves leaves nothing to do")
  steps = []
  if f.curves:  # checked before the structure analysis spends minutes
    try:
      steps = [int(s) for s in f.steps]
    except ValueError:
      raise errors.ConfigError(f"--steps={','.join(f.steps)} must be integers, "
                               "e.g. --steps=1,2,5,10,20,50") from None
    analysis.check_steps(steps)
  checkpoints.check_writable(f.out, "--out")  # before minutes of attacks, not after
  # The data and the attack come from --config, else from the first run's own config.
  config = _required_config() if f.config is not None else checkpoints.read_config(f.runs[0])
  if f.structure:
    teacher = f.teacher or analysis.recorded_teacher(f.runs)
    rows = analysis.analyse_runs(f.runs, teacher, config, max_examples=f.max_examples)
    print(analysis.write_structure(rows, f.out, teacher_dir=teacher, config=config))
  if f.curves:
    rows = analysis.curve_runs(f.runs, config, steps=steps, max_examples=f.max_examples)
    print(analysis.write_curves(rows, f.out, config=config))


def _define_probe():
  flags.DEFINE_string("workdir", None, "run whose frozen features to probe", required=True)
  flags.DEFINE_string("out", None, "directory for probe.json and probe.md", required=True)
  flags.DEFINE_integer("train_steps", 500, "Adam steps of the probe's training")
  flags.DEFINE_float("learning_rate", 0.01, "the probe's learning rate")
  flags.DEFINE_float("weight_decay", 1e-4, "the probe's decoupled weight decay")
  flags.DEFINE_integer("train_batch_size", 1024, "the probe's minibatch (whole split if smaller)")
  flags.DEFINE_list("attacks", ["clean", "fgsm", "pgd20", "cw"], "attacks to evaluate with")
  flags.DEFINE_bool("progress", True, "show progress bars")


def _run_probe():
  import pathlib  # pylint: disable=g-import-not-at-top
  from gacd_jax import probe  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  settings = probe.ProbeSettings(steps=f.train_steps, learning_rate=f.learning_rate,
                                 weight_decay=f.weight_decay, batch_size=f.train_batch_size)
  probe.run_probe(f.workdir, _required_config(), f.out, settings, attacks=f.attacks,
                  progress=f.progress)
  print((pathlib.Path(f.out) / "probe.md").read_text())


def _required_config():
  config = flags.FLAGS.config
  if config is None:
    raise errors.ConfigError("--config is required, e.g. --config configs/digits.py")
  return config  # loaded and checked by _ConfigFileParser


class Command(NamedTuple):
  define: Callable[[], None]  # defines the command's flags
  run: Callable[[], None]     # runs it with the parsed flags
  config: bool = False        # whether it takes --config FILE and --config.key=value overrides


COMMANDS: dict[str, Command] = {
    "demo": Command(_define_demo, _run_demo),
    "train": Command(_define_train, _run_train, config=True),
    "evaluate": Command(_define_evaluate, _run_evaluate, config=True),
    "import-teacher": Command(_define_import_teacher, _run_import_teacher),
    "export-torch": Command(_define_export_torch, _run_export_torch),
    "analyse": Command(_define_analyse, _run_analyse, config=True),
    "probe": Command(_define_probe, _run_probe, config=True),
    "info": Command(lambda: None, _run_info),
}


def _fail(message: str) -> None:
  print(f"gacd-jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) >= 2 and argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    sys.exit(0)
  if len(argv) < 2:
    print(USAGE)
    _fail(f"no command given; commands: {', '.join(COMMANDS)}")
  command = argv[1]
  if command not in COMMANDS:
    _fail(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
  runtime.configure()
  spec = COMMANDS[command]
  # The command's flags live in absl's global FLAGS for this call only, so that main can be
  # called again in the same process (tests, notebooks) without redefining them.
  defined_before = set(flags.FLAGS)
  try:
    command_argv = [f"gacd-jax {command}"] + argv[2:]
    if spec.config:
      _config_flag(command_argv)
    spec.define()
    if {"-h", "--help", "--helpshort"} & set(argv[2:]):
      print(f"usage: gacd-jax {command} [flags]\n\n"
            + flags.FLAGS.module_help(sys.modules[__name__]))
      sys.exit(0)

    extra = _parse_or_fail(command_argv)
    if len(extra) > 1:
      _fail(f"unexpected arguments {' '.join(extra[1:])!r}; flags look like --name=value")
    for name in sorted(set(flags.FLAGS) - defined_before):
      if flags.FLAGS[name].present and flags.FLAGS[name].value in ("", []):
        _fail(f"--{name} is empty; give it a value (`gacd-jax {command} --help` lists the flags)")
    logging.use_absl_handler()
    logging.set_verbosity(logging.WARNING)
    try:
      spec.run()
    except errors.GacdError as e:
      _fail(str(e))
  finally:
    for name in set(flags.FLAGS) - defined_before:
      delattr(flags.FLAGS, name)


def _parse_or_fail(argv: list[str]) -> list[str]:
  """Parse the flags, so that a bad flag, config file or config override is one line; return
  the arguments left over."""
  try:
    return flags.FLAGS(argv)
  except errors.GacdError as e:  # a config file that fails, or an override of no key
    _fail(str(e))
  except flags.Error as e:
    message = " ".join(str(e).split()).rstrip(".")
    required = re.search(r"Flag (--\w+) must have a value other than None", message)
    _fail(f"{required.group(1) + ' is required' if required else message}; "
          f"`{argv[0]} --help` lists the flags")


if __name__ == "__main__":
  main()
