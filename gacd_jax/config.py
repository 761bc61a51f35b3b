"""The default config every experiment config starts from, and its validation.

Every method's switches are present in every config (under `method.<name>`), so
`--config.method.name=...` works from the command line on any config file. Configs are validated
once, up front, by `validate`, with messages that name the key and the fix.
"""

import difflib
import importlib.machinery
import importlib.util
import json
import pathlib
import sys
import traceback

import jax.numpy as jnp

from ml_collections import ConfigDict

from gacd_jax import attacks
from gacd_jax import errors
from gacd_jax import input_norm
from gacd_jax import losses
from gacd_jax import methods


def default() -> ConfigDict:
  """The base config. Experiment configs in `configs/` start here and change what they need."""
  c = ConfigDict()
  c.seed = 0
  # Compute precision of the student, the teacher and the training attack: 'fp32', or 'bf16'
  # (bf16 activations and convolutions; parameters, optimizer state and loss reductions stay fp32).
  c.precision = "fp32"

  # The student. Per-architecture options live under the architecture's name.
  c.model = ConfigDict()
  c.model.name = "small_cnn"
  c.model.small_cnn = ConfigDict({"width": 16})
  c.model.wrn = ConfigDict({"depth": 34, "widen_factor": 10})
  c.model.dm_wrn = ConfigDict({"depth": 28, "width": 10, "activation": "relu"})
  c.model.dm_preact_resnet = ConfigDict({"depth": 18, "activation": "relu"})
  # Preprocessing inside the model, for every architecture (gacd_jax/input_norm.py): zero padding
  # of the [0, 1] image, then (x - mean) / std per channel. () and 0: off.
  c.model.input_mean = ()
  c.model.input_std = ()
  c.model.input_padding = 0

  c.data = ConfigDict()
  c.data.name = "digits"
  c.data.image_size = 0      # 0: the dataset's own size
  c.data.channels = 0        # 0: the dataset's own channel count
  c.data.data_dir = ""       # where cifar10/cifar100/stl10 are stored; '' for tfds' default
  # How they are stored: auto (found from data_dir), tfds, python, binary, folder, npz
  # (gacd_jax/data_files.py); the other datasets take only auto.
  c.data.format = "auto"
  c.data.num_examples = 0    # use the first N examples of each split (synthetic: make N); 0: all
  c.data.num_classes = 0     # synthetic: how many classes; others: must match; 0: the dataset's
  # Keep only these original labels, relabelled 0 .. k-1 in this order, e.g. (5, 6, 7, 8, 9)
  # (cross-task distillation: a teacher on other classes); (): every class.
  c.data.classes = ()
  c.data.crop_padding = 4    # random crop after zero padding; 0 turns it off
  c.data.flip = True

  c.teacher = ConfigDict()
  c.teacher.workdir = ""     # a run directory written by `gacd-jax train` or `import-teacher`
  c.teacher.model = ""       # expected architecture; checked against the teacher's own config

  c.method = ConfigDict()
  c.method.name = "pgd_at"
  c.method.kl_reduction = "batchmean"  # or 'mean' (over batch x classes, as ARD/RSLAD code)
  # Whether the student's forward on the clean batch, in the methods that also forward x'
  # (TRADES, RSLAD, IAD, CRDND; ARD and AdaAD with alpha < 1; GACD with clean_ce_weight > 0),
  # updates BatchNorm's running statistics, as every method's public code does (True); False
  # leaves them to the forwards on x' (a switch of this library, not of any method; the loss and
  # its gradient are the same either way).
  c.method.clean_bn_update = True
  for name, switches in methods.defaults().items():
    c.method[name] = switches

  # The training attack. 'method' picks the start and BatchNorm mode of the method's public code.
  c.attack = ConfigDict()
  c.attack.eps = 8 / 255
  c.attack.step_size = 2 / 255
  c.attack.steps = 10
  c.attack.norm = "linf"
  c.attack.start = "method"    # or uniform / gaussian / none
  c.attack.bn_mode = "method"  # or eval / train
  c.attack.unroll = True
  # Grow eps (and the step size) linearly from 0 over this many epochs; 0: the full eps from the
  # first step. Helps small models out of the chance-level start at MNIST's eps 0.3.
  c.attack.eps_warmup_epochs = 0

  c.optim = ConfigDict()
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 2e-4
  c.optim.schedule = "piecewise"   # piecewise / cosine / constant
  c.optim.milestones = (100, 150)  # epochs, for piecewise
  c.optim.decay_factor = 0.1

  c.train = ConfigDict()
  c.train.batch_size = 128    # global, over all devices and hosts
  c.train.epochs = 200
  c.train.log_every = 50      # steps; metrics are read from the device only then
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 2

  c.eval = ConfigDict()
  c.eval.batch_size = 256
  c.eval.eps = 8 / 255
  c.eval.pgd_steps = 20
  c.eval.pgd_step_size = 2 / 255
  c.eval.cw_steps = 30
  c.eval.cw_step_size = 2 / 255
  c.eval.split = "test"       # or 'validation' (digits, mnist5k): for choices made in a study
  c.eval.max_examples = 0     # 0: the whole split
  # basic: clean, FGSM, PGD-20, CW-inf; fast / standard / plus: the same and AutoAttack's version
  c.eval.suite = "basic"
  c.eval.autoattack_n_iter = 100        # APGD and FAB iterations (the official 100)
  c.eval.autoattack_n_queries = 5000    # Square queries (the official 5000)
  c.eval.eps_curve = (0.0, 2 / 255, 4 / 255, 8 / 255, 12 / 255, 16 / 255)
  return c


PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
# config.eval.suite: the PGD-family attacks alone, or followed by that version of AutoAttack.
EVAL_SUITES = ("basic", "fast", "standard", "plus")


def compute_dtype(c: ConfigDict):
  """The activation dtype `config.precision` names."""
  return PRECISIONS[c.precision]


def model_kwargs(model_config: ConfigDict) -> dict:
  """The keyword arguments for `models.build`: those held under `model.<name>`, if any, and the
  input preprocessing (`model.input_*`) when it is on."""
  options = model_config.get(model_config.name)
  kwargs = dict(options) if options is not None else {}
  for key in ("input_mean", "input_std", "input_padding"):
    if model_config.get(key):  # absent from configs written before it existed
      kwargs[key] = model_config[key]
  return kwargs


def _choice(value, choices, key):
  if value not in choices:
    raise errors.ConfigError(
        f"config.{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _positive(value, key):
  if not isinstance(value, int) or value <= 0:
    raise errors.ConfigError(f"config.{key}={value!r} must be a positive integer")


def validate(c: ConfigDict) -> None:
  """Raise `ConfigError` naming the key for anything out of range or unknown."""
  from gacd_jax import data, data_files, models  # pylint: disable=g-import-not-at-top
  if c.model.name not in models.names():
    raise errors.ConfigError(
        f"unknown model {c.model.name!r}; known models: {', '.join(models.names())}")
  try:
    input_norm.check(tuple(c.model.input_mean), tuple(c.model.input_std), c.model.input_padding)
  except errors.ConfigError as e:
    raise errors.ConfigError(f"config.model.{e}") from None
  if c.data.name not in data.names():
    raise errors.ConfigError(
        f"unknown dataset {c.data.name!r}; known datasets: {', '.join(data.names())}")
  data.check_classes(c.data.classes)  # against the dataset's labels when it is built
  data_files.check_format(c.data.name, c.data.format)
  methods.build(c.method)  # raises for an unknown method
  _choice(c.method.kl_reduction, losses.KL_REDUCTIONS, "method.kl_reduction")
  _choice(c.method.clean_bn_update, (True, False), "method.clean_bn_update")
  _choice(c.precision, tuple(PRECISIONS), "precision")
  for key in ("attack.eps", "eval.eps"):
    section, name = key.split(".")
    attacks.check_eps(c[section][name], f"config.{key}")
  for eps in c.eval.eps_curve:
    attacks.check_eps(eps, "an entry of config.eval.eps_curve")
  _choice(c.attack.norm.lower() if isinstance(c.attack.norm, str) else c.attack.norm,
          attacks.NORMS, "attack.norm")
  _choice(c.eval.suite, EVAL_SUITES, "eval.suite")
  _choice(c.eval.split, ("test", "validation"), "eval.split")
  if c.eval.split == "validation" and not data.has_validation(c.data.name):
    raise errors.ConfigError(
        f"config.eval.split='validation': {c.data.name} has no validation split (digits and "
        "mnist5k do); use 'test'")
  _choice(c.attack.start, ("method",) + attacks.STARTS, "attack.start")
  _choice(c.attack.bn_mode, ("method", "eval", "train"), "attack.bn_mode")
  _choice(c.optim.schedule, ("piecewise", "cosine", "constant"), "optim.schedule")
  for key in ("train.batch_size", "train.epochs", "train.log_every", "train.checkpoint_every",
              "train.keep_checkpoints", "eval.batch_size"):
    section, name = key.split(".")
    _positive(c[section][name], key)
  if c.attack.eps_warmup_epochs < 0:
    raise errors.ConfigError(
        f"config.attack.eps_warmup_epochs={c.attack.eps_warmup_epochs} must be >= 0 (0: off)")
  _check_optim(c.optim)
  if not isinstance(c.eval.max_examples, int) or c.eval.max_examples < 0:
    raise errors.ConfigError(
        f"config.eval.max_examples={c.eval.max_examples!r} must be an integer >= 0 (0: the whole "
        "split)")
  if c.attack.steps < 0 or c.eval.pgd_steps < 0 or c.eval.cw_steps < 0:
    raise errors.ConfigError("attack step counts must be >= 0")
  for key in ("eval.autoattack_n_iter", "eval.autoattack_n_queries"):
    _positive(c.eval[key.split(".")[1]], key)


def load_file(spec: str) -> ConfigDict:
  """`get_config()` of a config file, locked: `spec` is 'FILE', or 'FILE:ARG' for
  `get_config('ARG')` (as ml_collections' config_flags reads `--config`).

  Every way a config file can fail (missing, a syntax error, an exception while it runs, no
  `get_config`, a result that is not a ConfigDict) raises one `ConfigError` naming the file and,
  for an exception, its type, message and where it was raised; a `GacdError` from `get_config`
  (e.g. an unknown method after ':') passes through unchanged.
  """
  path, *args = spec.split(":", 1)
  if not path:
    raise errors.ConfigError("--config is empty; name a config file, e.g. "
                             "--config=configs/digits.py")
  file = pathlib.Path(path)
  if not file.is_file():
    problem = "is a directory" if file.is_dir() else "does not exist"
    raise errors.ConfigError(f"config file {path} {problem}; name a config file, e.g. "
                             "--config=configs/digits.py")
  # Loaded as config_flags loads it: any file name, registered as the module 'config_config'.
  loader = importlib.machinery.SourceFileLoader("config_config", str(file))
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  sys.modules[loader.name] = module
  try:
    loader.exec_module(module)
  except SyntaxError as e:
    raise errors.ConfigError(
        f"config file {path} has a syntax error at line {e.lineno}: {e.msg}") from e
  except errors.GacdError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise errors.ConfigError(f"config file {path} failed while loading: {_raised(e)}") from e
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise errors.ConfigError(
        f"config file {path} defines no get_config(); a config file defines get_config() "
        "returning a ConfigDict (see configs/digits.py)")
  call = f"get_config({', '.join(map(repr, args))})"
  try:
    config = get_config(*args)
  except errors.GacdError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise errors.ConfigError(f"{call} of config file {path} failed: {_raised(e)}") from e
  if not isinstance(config, ConfigDict):
    raise errors.ConfigError(
        f"{call} of config file {path} returned {type(config).__name__} {config!r:.40}, not a "
        "ConfigDict; return one (e.g. gacd_jax.config.default() with your changes)")
  config.lock()
  return config


def _raised(e: BaseException) -> str:
  """`Type: message (at file:line)` on one line, the place being the innermost frame outside
  this module (none when `load_file`'s own call failed, e.g. get_config given no argument)."""
  message = " ".join(str(e).split())
  frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__]
  at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
  return f"{type(e).__name__}: {message}{at}"


def check_key(c: ConfigDict, key: str, flag: str) -> None:
  """Raise `ConfigError` unless the dotted `key` (e.g. 'train.epochs') names a value of `c`;
  `flag` is the command-line argument that set it, for the message."""
  node, path = c, []
  for part in key.split("."):
    if not isinstance(node, ConfigDict):
      section = "config." + ".".join(path)
      example = f"; set it whole, e.g. --{section}='{node!r}'" if isinstance(node, tuple) else ""
      raise errors.ConfigError(
          f"{flag}: {section} is a single value ({node!r}), not a section with keys{example}")
    if part not in node:
      close = difflib.get_close_matches(part, list(node.keys()), n=1)
      hint = (f"did you mean config.{'.'.join(path + close)}?" if close else
              f"its keys are {', '.join(sorted(node.keys()))}")
      where = f"config.{'.'.join(path)}" if path else "the config"
      raise errors.ConfigError(f"{flag}: {where} has no key {part!r}; {hint}")
    node = node[part]
    path.append(part)


def _check_optim(optim: ConfigDict) -> None:
  """SGD's settings: a positive learning rate, momentum in [0, 1), a non-negative weight decay,
  and the piecewise schedule's milestones (epochs >= 0) and positive decay factor, checked
  whatever the schedule: a malformed value is a mistake even where it is unused."""
  def number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if not number(optim.lr) or not optim.lr > 0:
    raise errors.ConfigError(f"config.optim.lr={optim.lr!r} must be a positive number, e.g. 0.1")
  if not number(optim.momentum) or not 0 <= optim.momentum < 1:
    raise errors.ConfigError(
        f"config.optim.momentum={optim.momentum!r} must be in [0, 1) (0: plain SGD)")
  if not number(optim.weight_decay) or not optim.weight_decay >= 0:
    raise errors.ConfigError(
        f"config.optim.weight_decay={optim.weight_decay!r} must be a number >= 0")
  milestones = optim.milestones
  if (not isinstance(milestones, (tuple, list))
      or not all(number(m) and m >= 0 for m in milestones)):
    raise errors.ConfigError(
        f"config.optim.milestones={milestones!r} must be epochs (numbers >= 0), e.g. "
        "--config.optim.milestones='(100, 150)'")
  if not number(optim.decay_factor) or not optim.decay_factor > 0:
    raise errors.ConfigError(
        f"config.optim.decay_factor={optim.decay_factor!r} must be a positive number, e.g. 0.1")


def to_json(c: ConfigDict) -> str:
  return json.dumps(c.to_dict(), indent=2, sort_keys=True, default=list)
