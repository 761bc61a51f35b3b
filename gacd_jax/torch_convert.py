"""PyTorch <-> Flax weights for the model zoo: import public teachers, export trained students.

The mapping follows the naming convention documented in `gacd_jax/models.py` and is derived
mechanically from the Flax variable paths, e.g. `params/layer1_0/shortcut_conv/kernel` <->
`layer1.0.shortcut.0.weight`. Nothing is listed per architecture, so any depth or width of a zoo
model converts. Every conversion is checked against the Flax model's own (abstract) variable tree,
and all missing keys, unexpected keys and shape mismatches are reported together in one
`CheckpointError`.

All array layout changes between the two frameworks live in the "Layouts" section below.

PyTorch files are read with `torch.load(weights_only=True)` (or as .safetensors), so a checkpoint
that holds pickled code is refused instead of run. torch and safetensors are imported only by the
functions that read or write their files; converting arrays needs neither.
"""

from __future__ import annotations

from collections.abc import Mapping
import hashlib
import importlib
import json
import os
import pathlib
import pickle
import re
from typing import Any

from flax import traverse_util
import jax
import numpy as np

from gacd_jax import checkpoints
from gacd_jax import config as config_lib
from gacd_jax import errors
from gacd_jax import input_norm
from gacd_jax import models

# TRADES' WideResNet defines a `sub_block1` that forward never uses but its checkpoints carry.
_IGNORED_PREFIXES = {"wrn": ("sub_block1.",), "wrn34_10": ("sub_block1.",)}

# Where training scripts nest the state_dict inside a saved dict, most specific first.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")

# At most this many lines per kind of problem in an error message.
_MAX_LISTED = 20


class WeightsMismatch(errors.CheckpointError):
  """Weights whose keys or shapes do not fit the architecture (`torch_to_flax`)."""

# ---------------------------------------------------------------------------------------------
# Layouts. Each permutation takes a PyTorch array's axes to the Flax array's axes.

_NCHW_TO_NHWC = (0, 2, 3, 1)
_OIHW_TO_HWIO = (2, 3, 1, 0)  # also depthwise convs: PyTorch `in/groups` = Flax `in/groups` = 1
_OUT_IN_TO_IN_OUT = (1, 0)
_SAME = (0,)

# (Flax collection, Flax leaf, ndim) -> (PyTorch leaf, permutation).
_LEAVES = {
    ("params", "kernel", 4): ("weight", _OIHW_TO_HWIO),
    ("params", "kernel", 2): ("weight", _OUT_IN_TO_IN_OUT),
    ("params", "scale", 1): ("weight", _SAME),
    ("params", "bias", 1): ("bias", _SAME),
    ("batch_stats", "mean", 1): ("running_mean", _SAME),
    ("batch_stats", "var", 1): ("running_var", _SAME),
}


def _to_flax(array: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(array, perm))


def _to_torch(array: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(array, np.argsort(perm)))


def _torch_shape(flax_shape: tuple[int, ...], perm: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(flax_shape[i] for i in np.argsort(perm))


def nchw_to_nhwc(images: Any) -> np.ndarray:
  """PyTorch images or feature maps `[B, C, H, W]` -> `[B, H, W, C]` as gacd_jax models take."""
  return _to_flax(np.asarray(images), _NCHW_TO_NHWC)


def nhwc_to_nchw(images: Any) -> np.ndarray:
  """`[B, H, W, C]` -> PyTorch's `[B, C, H, W]`."""
  return _to_torch(np.asarray(images), _NCHW_TO_NHWC)


# ---------------------------------------------------------------------------------------------
# Names.

# pytorch-cifar's projection shortcut is an nn.Sequential(conv, bn); see gacd_jax/models.py.
_RENAMED_MODULES = {"shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"}


def _torch_module(path: tuple[str, ...]) -> str:
  """Flax module path -> PyTorch module name: ('layer1_0', 'shortcut_bn') -> 'layer1.0.shortcut.1'.

  On the enclosing modules, the last `_<i>` suffix is an index into a PyTorch nn.Sequential
  ('layer_0_1' -> 'layer_0.1'); the module holding the variables keeps its name ('batchnorm_0').
  """
  parts = []
  for depth, name in enumerate(path, start=1):
    index = re.fullmatch(r"(.+)_(\d+)", name) if depth < len(path) else None
    parts.append(_RENAMED_MODULES.get(name) or (f"{index[1]}.{index[2]}" if index else name))
  return ".".join(parts)


def _torch_key(flax_key: tuple[str, ...], ndim: int) -> tuple[str, tuple[int, ...]]:
  """('params', 'layer1_0', 'conv1', 'kernel'), 4 -> ('layer1.0.conv1.weight', OIHW->HWIO)."""
  collection, *path, leaf = flax_key
  rule = _LEAVES.get((collection, leaf, ndim))
  if rule is None:
    raise errors.CheckpointError(
        f"the Flax variable {'/'.join(flax_key)} ({ndim}-d) has no PyTorch counterpart in the "
        "naming convention of gacd_jax/models.py")
  torch_leaf, perm = rule
  return f"{_torch_module(tuple(path))}.{torch_leaf}", perm


def _num_batches_tracked(running_mean_key: str) -> str:
  return running_mean_key[:-len("running_mean")] + "num_batches_tracked"


def _flat_variables(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  """`{'params': ..., 'batch_stats': ...}` -> {('params', 'conv1', 'kernel'): leaf, ...}."""
  return traverse_util.flatten_dict(
      {c: variables.get(c, {}) for c in ("params", "batch_stats")})


def _listing(kind: str, lines: list[str]) -> list[str]:
  shown = [f"{kind} {line}" for line in lines[:_MAX_LISTED]]
  if len(lines) > _MAX_LISTED:
    shown.append(f"... and {len(lines) - _MAX_LISTED} more")
  return shown


# ---------------------------------------------------------------------------------------------
# Conversion.


def torch_to_flax(arch: str, state_dict: Mapping[str, np.ndarray], num_classes: int, *,
                  image_shape: tuple[int, int, int] = (32, 32, 3),
                  **model_kw: Any) -> dict[str, dict]:
  """A PyTorch state_dict (public-codebase key layout) as variables of `models.build(arch, ...)`.

  Args:
    arch: a name from `models.names()`.
    state_dict: PyTorch key -> array in PyTorch layout (conv `[O, I/groups, kh, kw]`, linear
      `[out, in]`), e.g. from `read_torch_checkpoint`. `num_batches_tracked` is accepted and
      dropped; for wrn / wrn34_10, TRADES' unused `sub_block1.*` keys are ignored.
    num_classes: the width of the model's linear head.
    image_shape: (H, W, C) of the inputs; C fixes the first convolution's input width.
    **model_kw: model options, e.g. `depth=28, widen_factor=10` for wrn.

  Returns:
    `{'params': ..., 'batch_stats': ...}` of float32 numpy arrays in Flax layout, such that
    `module.apply(variables, x_nhwc)` equals the PyTorch model on `x_nchw`.

  Raises:
    ConfigError: unknown arch or option.
    WeightsMismatch (a CheckpointError): listing every missing key, unexpected key and shape
      mismatch.
  """
  module = models.build(arch, num_classes, **model_kw)
  x = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
  expected = _flat_variables(
      jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x))

  flat, missing, mismatched, consumed = {}, [], [], set()
  for flax_key, abstract in expected.items():
    torch_key, perm = _torch_key(flax_key, abstract.ndim)
    want = _torch_shape(abstract.shape, perm)
    consumed.add(torch_key)
    if flax_key[-1] == "mean":
      consumed.add(_num_batches_tracked(torch_key))
    if torch_key not in state_dict:
      missing.append(f"{torch_key} {list(want)}")
      continue
    array = np.asarray(state_dict[torch_key])
    if array.shape != want:
      mismatched.append(f"{torch_key}: expected {list(want)}, found {list(array.shape)}")
      continue
    flat[flax_key] = _to_flax(array.astype(np.float32), perm)

  ignored = _IGNORED_PREFIXES.get(arch, ())
  unexpected = [f"{k} {list(np.shape(v))}" for k, v in state_dict.items()
                if k not in consumed and not k.startswith(ignored)]
  if missing or unexpected or mismatched:
    options = "".join(f", {k}={v}" for k, v in sorted(model_kw.items()))
    raise WeightsMismatch(
        f"the PyTorch weights do not fit a {arch} with {num_classes} classes{options} "
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} wrong shape); "
        "check the architecture, its options and the number of classes: "
        + "; ".join(_listing("missing", missing) + _listing("unexpected", unexpected)
                    + _listing("shape of", mismatched)))
  return traverse_util.unflatten_dict(flat)


def flax_to_torch(arch: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Variables of a zoo model as a PyTorch state_dict of the public codebase's key layout.

  Args:
    arch: a name from `models.names()` (checked; the mapping itself needs no per-model table).
    variables: `{'params': ..., 'batch_stats': ...}` of `models.build(arch, ...)`.

  Returns:
    PyTorch key -> float32 array in PyTorch layout, plus a 0-d int64 `num_batches_tracked` (0)
    per BatchNorm, so `experiments.pytorch_baseline.models.build(arch, ...)` loads it with
    `load_state_dict(..., strict=True)` after `torch.from_numpy`.
  """
  models.options(arch)
  state_dict = {}
  for flax_key, leaf in _flat_variables(variables).items():
    leaf = np.asarray(leaf, np.float32)
    torch_key, perm = _torch_key(flax_key, leaf.ndim)
    state_dict[torch_key] = _to_torch(leaf, perm)
    if flax_key[-1] == "mean":
      state_dict[_num_batches_tracked(torch_key)] = np.array(0, np.int64)
  return state_dict


# ---------------------------------------------------------------------------------------------
# Files.


def _optional(module: str) -> Any:
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise errors.GacdError(
        f"this needs the {module.split('.')[0]} package; install it with "
        "`pip install 'gacd_jax[torch]'`"
    ) from e


def _describe(obj: Any) -> str:
  if isinstance(obj, Mapping):
    return f"a dict with keys {sorted(map(str, obj))[:10]}"
  return f"a {type(obj).__name__}"


def _find_state_dict(obj: Any, path: pathlib.Path, tensor_type: type) -> Mapping[str, Any]:
  """The dict of tensors in `obj`, looking inside `_NESTING_KEYS` (e.g. {'state_dict': ...})."""
  if isinstance(obj, Mapping):
    if obj and all(isinstance(v, tensor_type) for v in obj.values()):
      return obj
    for key in _NESTING_KEYS:
      if isinstance(obj.get(key), Mapping):
        return _find_state_dict(obj[key], path, tensor_type)
  raise errors.CheckpointError(
      f"{path} holds no state_dict: expected a dict of tensors, possibly under one of "
      f"{', '.join(map(repr, _NESTING_KEYS))}, but found {_describe(obj)}")


def _without_data_parallel_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  # nn.DataParallel and DistributedDataParallel save their wrapped model under `module.`.
  return {re.sub(r"^(module\.)+", "", key): value for key, value in state_dict.items()}


def read_torch_checkpoint(path: str | os.PathLike, *,
                          inside: str | None = None) -> dict[str, np.ndarray]:
  """The state_dict in a PyTorch checkpoint file, as PyTorch key -> numpy array.

  `.safetensors` files are read with safetensors; anything else with
  `torch.load(weights_only=True)`, which unpickles only tensors and plain containers. The state
  dict may be nested under 'state_dict', 'model_state_dict', 'model', 'net' or 'state' (as
  training scripts save it with the epoch and optimizer), first under `inside` if given (e.g.
  'last' for a file holding a 'last' and a 'best' model); `module.` prefixes are removed.

  Raises:
    CheckpointError: a missing, truncated or corrupt file, no state_dict inside, or a pickle
      holding anything but tensors (e.g. code), which is refused without running it.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.CheckpointError(f"the PyTorch checkpoint {path} does not exist")
  if path.suffix == ".safetensors":
    safetensors_numpy = _optional("safetensors.numpy")
    try:
      return _without_data_parallel_prefix(safetensors_numpy.load_file(path))
    except Exception as e:  # safetensors raises its own error type for damaged files
      raise errors.CheckpointError(
          f"cannot read {path}: it is truncated or not a safetensors file "
          f"({type(e).__name__}: {str(e)[:300]})") from e

  with path.open("rb") as f:
    head = f.read(4)
  if not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive, or a pickle
    raise errors.CheckpointError(
        f"cannot read {path}: it is not a PyTorch checkpoint (torch.save writes a zip archive or a "
        f"pickle; this file starts with {head!r}); pass the .pt / .pth / .safetensors weights")
  torch = _optional("torch")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's message is long; its reason follows this marker.
    reason = str(e).partition("WeightsUnpickler error:")[2].strip() or str(e)
    reason = reason.splitlines()[0].split(". ")[0]
    raise errors.CheckpointError(
        f"refusing to load {path}: it holds more than tensors ({reason}), and unpickling it could "
        "run arbitrary code. If you trust its source, load it in PyTorch and save only the "
        "weights: torch.save(model.state_dict(), 'weights.pt') (or as .safetensors)") from None
  except Exception as e:  # torch raises OSError, RuntimeError, IndexError, ... for damaged files
    raise errors.CheckpointError(
        f"cannot read {path}: it is truncated, damaged or not a PyTorch checkpoint "
        f"({type(e).__name__}: {str(e)[:300]})") from e
  if inside is not None:
    if not isinstance(obj, Mapping) or inside not in obj:
      raise errors.CheckpointError(
          f"{path} holds no {inside!r} entry, where this model's weights are; found "
          f"{_describe(obj)}")
    obj = obj[inside]
  state_dict = _find_state_dict(obj, path, torch.Tensor)
  # numpy has no bfloat16; float32 holds it exactly.
  return _without_data_parallel_prefix({
      key: (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy()
      for key, t in state_dict.items()})


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def import_teacher(arch: str, checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike,
                   num_classes: int = 10, image_shape: tuple[int, int, int] = (32, 32, 3), *,
                   state_dict: Mapping[str, Any] | None = None,
                   source: Mapping[str, Any] | None = None, **model_kw: Any) -> None:
  """Converts a PyTorch checkpoint into a run directory usable as `config.teacher.workdir`.

  Writes `out_dir/config.json` (the default config with `model.name = arch` and the model
  options), `run.json` (image shape, classes, and the source file's path and SHA-256) and an
  orbax checkpoint at step 0 whose student parameters are the converted weights, so
  `checkpoints.load_model(out_dir)` returns the model.

  Args:
    arch: a name from `models.names()`, e.g. 'wrn34_10' for the TRADES teacher.
    checkpoint_path: .pt / .pth / .ckpt (read with weights_only) or .safetensors.
    out_dir: a new or empty directory.
    num_classes: the width of the checkpoint's linear head.
    image_shape: (H, W, C) of the images the teacher takes.
    state_dict: the weights, already read from `checkpoint_path` (e.g. unwrapped by
      `gacd_jax.robustbench_teachers`); None reads them with `read_torch_checkpoint`.
    source: more facts about the weights' origin for run.json's `imported_from`.
    **model_kw: model options, e.g. `depth=28` for wrn, `input_mean` and `input_std`.

  Raises:
    ConfigError: unknown arch or option, or a class count or image shape that is not positive.
    CheckpointError: an unreadable or unsafe file, weights that do not fit, or a non-empty
      `out_dir`.
    WorkdirError: `out_dir` is a file or cannot be written.
  """
  checkpoint_path = pathlib.Path(checkpoint_path).absolute()
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise errors.WorkdirError(f"--out {out_dir} is a file, not a directory; choose another")
  if out_dir.is_dir() and any(out_dir.iterdir()):
    raise errors.CheckpointError(
        f"{out_dir} already exists and is not empty; choose a new directory or delete it")
  if num_classes <= 0 or min(image_shape) <= 0:
    raise errors.ConfigError(
        f"num_classes={num_classes} and image_shape={tuple(image_shape)} must be positive "
        "(--num_classes, --image_size, --channels)")
  cfg = config_lib.default()
  cfg.model.name = arch
  arch_kw = {k: v for k, v in model_kw.items() if k not in input_norm.OPTIONS}
  for key in input_norm.OPTIONS:  # for every architecture, so not under model.<arch>
    if key in model_kw:
      value = model_kw[key]
      cfg.model[key] = tuple(value) if isinstance(value, list) else value
  if arch_kw:
    if arch in cfg.model:
      cfg.model[arch].update(arch_kw)
    else:
      cfg.model[arch] = arch_kw
  config_json = json.loads(config_lib.to_json(cfg))
  if state_dict is None:
    state_dict = read_torch_checkpoint(checkpoint_path)
  # Convert with the options as the config records them, so the run loads as it was written.
  variables = torch_to_flax(arch, state_dict, num_classes, image_shape=image_shape,
                            **config_lib.model_kwargs(cfg.model))

  checkpoints.check_writable(out_dir, "--out")  # creates it
  state = {"step": np.array(0, np.int32),
           "params": {"student": variables["params"], "method": {}},
           "batch_stats": variables["batch_stats"], "opt_state": {}, "method_state": {}}
  with checkpoints.manager(out_dir) as mngr:
    checkpoints.save(mngr, 0, state)
  checkpoints.write_json(out_dir / checkpoints.RUN_FILE, {
      "image_shape": list(image_shape), "num_classes": num_classes, "num_examples": 0,
      "steps_per_epoch": 0, "teacher": None,
      "imported_from": {"path": str(checkpoint_path), "sha256": _sha256(checkpoint_path),
                        **(source or {})}})
  # Written last: a directory without config.json is not mistaken for a complete run.
  checkpoints.write_json(out_dir / checkpoints.CONFIG_FILE, config_json)


def export_torch(workdir: str | os.PathLike, out_path: str | os.PathLike) -> None:
  """Writes the model of a run as a PyTorch state_dict file.

  `out_path` ending in `.safetensors` gets a safetensors file, anything else a `torch.save`d dict
  of tensors; either loads into `experiments.pytorch_baseline.models.build(name, ...)` with
  `strict=True` (and back with `read_torch_checkpoint`).

  Raises:
    CheckpointError: `workdir` is not a run with a checkpoint that fits its config.
    WorkdirError: `out_path` is a directory, or its directory is missing or not writable
      (checked before anything is converted).
  """
  out_path = pathlib.Path(out_path)
  if out_path.is_dir():
    raise errors.WorkdirError(
        f"--out {out_path} is a directory; name the file to write, e.g. {out_path / 'model.pt'}")
  checkpoints.check_writable(out_path.parent, "--out", create=False)
  _, variables = checkpoints.load_model(workdir)
  arch = checkpoints.read_config(workdir).model.name
  state_dict = flax_to_torch(arch, variables)
  # Write then rename, so an interrupted export never leaves a half-written file.
  tmp = out_path.with_name(out_path.name + ".tmp")
  if out_path.suffix == ".safetensors":
    _optional("safetensors.numpy").save_file(state_dict, str(tmp))
  else:
    torch = _optional("torch")
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp)
  os.replace(tmp, out_path)
