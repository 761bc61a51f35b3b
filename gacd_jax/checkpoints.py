"""Run directories: the config a run was made with, its checkpoints, and loading a trained model.

A run directory (a "workdir") holds
  config.json      the full config of the run (`gacd-jax train` refuses another config here),
  run.json         facts the run derived: image shape, number of classes, the teacher's source,
  checkpoints/     orbax checkpoints of the whole train state (written atomically by orbax: a
                   crash leaves the previous checkpoint as the latest complete one); each step's
                   directory holds sha256.json, the SHA-256 of each of its files, checked before
                   it is restored; a damaged one `train` moved aside is `corrupt-<step>`,
  metrics.jsonl, events.* (TensorBoard), eval.json, report.md,
  .lock            locked by the `train` writing the run (`writer_lock`).
A teacher directory is a run directory; `gacd-jax import-teacher` writes the same layout.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import socket
import tempfile
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from ml_collections import ConfigDict

from gacd_jax import errors

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
MANIFEST_FILE = "sha256.json"  # in each checkpoint's step directory
CORRUPT_PREFIX = "corrupt-"    # a damaged checkpoint moved aside: checkpoints/corrupt-<step>


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Write JSON atomically (temporary file, then rename), so a crash never leaves half a file."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # hosts may write the same file
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=list) + "\n")
  os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise errors.CheckpointError(f"{path} is corrupt ({e}); restore it or start a new run") from e


def _check_run_dir(workdir: pathlib.Path) -> None:
  if workdir.is_file():
    raise errors.CheckpointError(f"{workdir} is a file, not a run directory")
  if not workdir.is_dir():
    raise errors.CheckpointError(
        f"run directory {workdir} does not exist; train one with `gacd-jax train` or import a "
        "PyTorch teacher with `gacd-jax import-teacher`")


def read_config(workdir: str | os.PathLike) -> ConfigDict:
  """The config a run was made with."""
  workdir = pathlib.Path(workdir)
  path = workdir / CONFIG_FILE
  _check_run_dir(workdir)
  if not path.is_file():
    raise errors.CheckpointError(
        f"{workdir} holds no {CONFIG_FILE}, so it is not a run directory written by gacd-jax")
  return ConfigDict(read_json(path))


def read_run_info(workdir: str | os.PathLike) -> dict:
  """What the run derived (run.json): image shape, number of classes, the teacher's source."""
  _check_run_dir(pathlib.Path(workdir))
  path = pathlib.Path(workdir) / RUN_FILE
  if not path.is_file():
    raise errors.CheckpointError(f"{path} is missing; the run directory is incomplete")
  return read_json(path)


def check_writable(directory: str | os.PathLike, flag: str, *, create: bool = True) -> None:
  """Raise `WorkdirError` naming `flag` unless this process can create files in `directory`
  (created first, with its parents, if `create`): found before a command spends minutes on
  results it could not save. Writes a temporary file, as permission bits do not tell (root, a
  read-only mount, an immutable directory)."""
  directory = pathlib.Path(directory)
  if directory.exists() and not directory.is_dir():
    raise errors.WorkdirError(f"{flag} {directory} is a file, not a directory; choose another")
  if not create and not directory.is_dir():
    raise errors.WorkdirError(
        f"{flag}: the directory {directory} does not exist; create it or choose another {flag}")
  try:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise errors.WorkdirError(
        f"cannot write to {directory}: {e.strerror or e}; choose another {flag}") from e


@contextlib.contextmanager
def writer_lock(workdir: str | os.PathLike) -> Iterator[None]:
  """Hold the workdir's advisory lock (`flock` on `<workdir>/.lock`, created with the workdir if
  need be) while the block runs, so that one process writes a run at a time.

  A second holder is refused at once with a `WorkdirError` naming the pid and host the lock file
  records. The operating system releases the lock when its process ends, even by `kill -9`, so no
  stale lock survives a crash. Only process 0 of a multi-host run locks: its processes write the
  run together and are started together. `flock` works on local filesystems and on NFS (Linux
  emulates it with byte-range locks there).
  """
  workdir = pathlib.Path(workdir)
  if jax.process_index() != 0:
    yield
    return
  check_writable(workdir, "--workdir")
  try:
    fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise errors.WorkdirError(
        f"cannot write to {workdir}: {e.strerror or e}; choose another --workdir") from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
      raise errors.WorkdirError(
          f"{workdir} is being written by another gacd-jax train "
          f"({holder or 'still starting'}); wait for it to finish or stop it, or use another "
          "--workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def manager(workdir: str | os.PathLike, keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                         create=True)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / CHECKPOINT_DIR, options=options)


def _step_dir(checkpoint_dir: str | os.PathLike, step: int) -> pathlib.Path:
  return pathlib.Path(checkpoint_dir) / str(step)  # orbax's default step directory name


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _file_digests(step_dir: pathlib.Path) -> dict[str, str]:
  return {str(path.relative_to(step_dir)): _sha256(path) for path in sorted(step_dir.rglob("*"))
          if path.is_file() and path != step_dir / MANIFEST_FILE}


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Save the whole train state at `step`, then its files' SHA-256 (orbax writes to a temporary
  directory and renames it when complete, so an interrupted save never becomes the latest
  checkpoint; one interrupted before its manifest is written is restored unverified)."""
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()
  if jax.process_index() == 0:
    step_dir = _step_dir(mngr.directory, step)
    write_json(step_dir / MANIFEST_FILE, {"sha256": _file_digests(step_dir)})


def latest_step(workdir: str | os.PathLike) -> int | None:
  path = pathlib.Path(workdir) / CHECKPOINT_DIR
  if not path.is_dir():
    return None
  with manager(workdir) as mngr:
    return mngr.latest_step()


def damage(workdir: str | os.PathLike, step: int) -> str | None:
  """What is wrong with checkpoint `step`'s files against the SHA-256 manifest saved with it, or
  None if they match. A checkpoint without a manifest (written before gacd-jax wrote them, or
  interrupted between orbax's commit and the manifest) passes: there is nothing to check."""
  step_dir = _step_dir(pathlib.Path(workdir) / CHECKPOINT_DIR, step)
  manifest_path = step_dir / MANIFEST_FILE
  if not manifest_path.is_file():
    return None
  try:
    expected = json.loads(manifest_path.read_text())["sha256"]
    items = sorted(expected.items())
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return f"its {MANIFEST_FILE} is unreadable"
  for name, digest in items:
    path = step_dir / name
    if not path.is_file():
      return f"{name} is missing"
    try:
      if _sha256(path) != digest:
        return f"{name} does not match its SHA-256"
    except OSError as e:
      return f"{name} cannot be read ({e.strerror})"
  return None


def _move_aside(workdir: pathlib.Path, step: int, problem: str) -> None:
  """Rename a damaged checkpoint to `checkpoints/corrupt-<step>` (never delete it)."""
  root = workdir / CHECKPOINT_DIR
  target = root / f"{CORRUPT_PREFIX}{step}"
  if jax.process_index() == 0:
    n = 1
    while target.exists():
      n += 1
      target = root / f"{CORRUPT_PREFIX}{step}-{n}"
    _step_dir(root, step).rename(target)
  logging.warning("checkpoint step %d in %s is damaged (%s): moved it to %s; resuming from the "
                  "newest checkpoint before it", step, workdir, problem, target)


def restore(workdir: str | os.PathLike, abstract_state: Any = None, *,
            fall_back: bool = False) -> tuple[int, Any]:
  """Restore the latest checkpoint: `(step, state)`.

  The checkpoint's files are checked against its SHA-256 manifest first. A damaged one raises
  `CheckpointError`, or, with `fall_back` (what `train` does), is moved aside to
  `checkpoints/corrupt-<step>` with a warning and the next newest is tried.
  With `abstract_state` (a pytree of `jax.ShapeDtypeStruct` with shardings) the result has its
  structure and placement; without it, the tree is returned as saved (nested dicts of arrays).
  """
  workdir = pathlib.Path(workdir)
  steps = []
  if (workdir / CHECKPOINT_DIR).is_dir():
    with manager(workdir) as mngr:
      steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise errors.CheckpointError(
        f"{workdir} holds no checkpoint; the run never saved one (train it first)")
  for step in steps:
    problem = damage(workdir, step)
    if problem is None:
      break
    if not fall_back:
      raise errors.CheckpointError(
          f"checkpoint step {step} in {workdir} is damaged ({problem}); restore the file from a "
          f"copy, or run `gacd-jax train` on this workdir to move it aside and resume from the "
          "newest intact checkpoint")
    _move_aside(workdir, step, problem)
  else:
    raise errors.CheckpointError(
        f"every checkpoint in {workdir} is damaged; they were moved to "
        f"{CHECKPOINT_DIR}/{CORRUPT_PREFIX}*, so running the command again starts the run over")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("gacd_jax.checkpoints.restore")  # after the renames
  try:
    with manager(workdir) as mngr:
      # Without a target, arrays saved from another device topology (a pod, 8 GPUs) land on
      # this process's first device.
      fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state,
                                                               fallback_sharding=fallback))
  except errors.GacdError:
    raise
  except Exception as e:  # orbax raises many types for unreadable or mismatched files
    raise errors.CheckpointError(
        f"cannot restore checkpoint step {step} in {workdir}: {type(e).__name__}: "
        f"{' '.join(str(e).split())[:300]}. If the files are damaged, move "
        f"{CHECKPOINT_DIR}/{step} aside to fall back to an earlier checkpoint; if the config "
        "changed, use the config the run was made with") from e
  return step, state


def content_hash(tree: Any) -> str:
  """SHA-256 of a pytree's leaves (paths, dtypes, shapes and bytes), e.g. to record a teacher."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def shape_mismatches(expected: Any, actual: Any) -> list[str]:
  """Human-readable differences between two pytrees' paths and shapes (empty if they agree)."""
  def shapes(tree):
    return {jax.tree_util.keystr(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, got = shapes(expected), shapes(actual)
  problems = [f"missing {k} {want[k]}" for k in sorted(want.keys() - got.keys())]
  problems += [f"unexpected {k} {got[k]}" for k in sorted(got.keys() - want.keys())]
  problems += [f"{k}: expected shape {want[k]}, found {got[k]}"
               for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
  return problems


def load_model(workdir: str | os.PathLike, *,
               store_conv_inputs: bool | None = None) -> tuple[Any, dict]:
  """The trained model of a run: `(module, variables)`.

  `module.apply(variables, x, train=False)` gives `(logits, features)` for `x` `[B, H, W, C]` in
  [0, 1]. `store_conv_inputs` is `models.build`'s (None: decided for the current backend). Raises
  `CheckpointError` if the directory is not a run, has no checkpoint, or its parameters do not
  fit the architecture its config names.
  """
  from gacd_jax import config as config_lib, models  # pylint: disable=g-import-not-at-top
  cfg = read_config(workdir)
  info = read_run_info(workdir)
  module = models.build(cfg.model.name, info["num_classes"], store_conv_inputs=store_conv_inputs,
                        **config_lib.model_kwargs(cfg.model))
  _, raw = restore(workdir)
  try:
    variables = {"params": raw["params"]["student"], "batch_stats": raw.get("batch_stats", {})}
  except (KeyError, TypeError) as e:
    raise errors.CheckpointError(
        f"the checkpoint in {workdir} has no student parameters; it was not written by "
        "gacd-jax train or import-teacher") from e
  x = jax.ShapeDtypeStruct((1, *info["image_shape"]), np.float32)
  expected = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
  expected = {"params": expected["params"], "batch_stats": expected.get("batch_stats", {})}
  problems = shape_mismatches(expected, variables)
  if problems:
    raise errors.CheckpointError(
        f"the parameters in {workdir} do not fit a {cfg.model.name} with "
        f"{info['num_classes']} classes: " + "; ".join(problems[:20]))
  return module, jax.tree.map(np.asarray, variables)
