"""A run's directory: the config a resumed run must match, and the logs it appends to.

`prepare_workdir` refuses a workdir that holds another config's run or a run distilled from
another teacher (or replaces it with `overwrite`); `MetricsLog` writes metrics.jsonl and
TensorBoard events so that a resumed run logs each step once.
"""

import json
import os
import pathlib
import shutil
import time
from typing import Optional

import jax
from ml_collections import ConfigDict

from gacd_jax import checkpoints
from gacd_jax import config as config_lib
from gacd_jax import errors

# Keys that may change between a run and its resumption: more epochs, another logging cadence,
# and the optimizer's settings (a lower learning rate or another schedule after a divergence).
# Changing optim.momentum to or from 0 changes the optimizer state's shape, which cannot resume.
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "eval", "optim")


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_differences(old: dict, new: dict) -> list[str]:
  """Config keys whose values differ, ignoring those a resumed run may change.

  A key the old run's config lacks (a switch added to gacd_jax since) is no difference when the
  new config holds its default: a new switch's default is the behaviour the run was made with.
  Neither is a key of another method's settings (`method.ard.*` in a GACD run): a method reads
  only `method.<its name>` and the keys directly under `method`, so a changed ARD default does
  not make a finished GACD run another run.
  """
  old_flat, new_flat = _flatten(old), _flatten(new)
  defaults = _flatten(json.loads(config_lib.to_json(config_lib.default())))
  method = new_flat.get("method.name")

  def unused(key: str) -> bool:
    parts = key.split(".")
    return len(parts) > 2 and parts[0] == "method" and parts[1] != method

  keys = sorted(old_flat.keys() | new_flat.keys())
  return [k for k in keys if old_flat.get(k) != new_flat.get(k) and not unused(k)
          and not (k not in old_flat and k in defaults and new_flat.get(k) == defaults[k])
          and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)]


def prepare_workdir(workdir: pathlib.Path, config: ConfigDict, overwrite: bool,
                    teacher_record: Optional[dict] = None) -> None:
  """Refuse a workdir holding another config's run, or a run distilled from another teacher
  (`teacher_record`: what run.json records of the teacher now), unless told to overwrite it;
  write config.json.

  A config differing only in `RESUMABLE_CHANGES` (e.g. `optim.*`) resumes the run, and
  config.json then records the new config. Call it only once the config is known to be valid.
  """
  config_path = workdir / checkpoints.CONFIG_FILE
  new = json.loads(config_lib.to_json(config))
  if config_path.exists():
    diffs = config_differences(checkpoints.read_json(config_path), new)
    if diffs and not overwrite:
      raise errors.ConfigError(
          f"{workdir} holds a run with a different config (differs in: {', '.join(diffs[:10])}); "
          "use another --workdir, or pass --overwrite to replace that run")
    started_with = None if diffs else _teacher_started_with(workdir, teacher_record)
    if started_with and not overwrite:
      raise errors.CheckpointError(
          f"the teacher changed since the run in {workdir} started: "
          f"{teacher_record['workdir']} now holds weights with hash "
          f"{teacher_record['sha256'][:12]}, the run was distilled from {started_with[:12]}, and "
          "resuming would mix two teachers; point --config.teacher.workdir at the original "
          "teacher, or start over in a new --workdir (or pass --overwrite to replace this run)")
    if diffs or started_with:
      shutil.rmtree(workdir / checkpoints.CHECKPOINT_DIR, ignore_errors=True)
      for pattern in ("metrics.jsonl", "events.out.tfevents.*", "eval*.json", "report*.md"):
        for path in workdir.glob(pattern):
          path.unlink()
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints.write_json(config_path, new)


def _teacher_started_with(workdir: pathlib.Path, teacher_record: Optional[dict]) -> Optional[str]:
  """The content hash of the teacher the run in `workdir` was distilled from, if it has a
  checkpoint to resume and that hash differs from `teacher_record`'s; else None."""
  run_path = workdir / checkpoints.RUN_FILE
  if (teacher_record is None or not run_path.is_file()
      or checkpoints.latest_step(workdir) is None):
    return None
  recorded = (checkpoints.read_json(run_path).get("teacher") or {}).get("sha256")
  return recorded if recorded and recorded != teacher_record["sha256"] else None


class MetricsLog:
  """metrics.jsonl and TensorBoard event files in the workdir (process 0 only).

  A run resumed from `start_step` logs each step once: metrics.jsonl is first cut to the lines
  up to `start_step` (those after it came from steps the checkpoint does not hold, and are logged
  again), and the new event file asks TensorBoard to drop earlier files' events after
  `start_step` (`purge_step`).
  """

  def __init__(self, workdir: pathlib.Path, start_step: int = 0):
    self._enabled = jax.process_index() == 0
    if self._enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      path = workdir / "metrics.jsonl"
      truncate_metrics(path, start_step)
      self._jsonl = open(path, "a")
      # Event files are named by the second they start in; the suffix keeps a resumption in the
      # same second from replacing the earlier file, and sorts after it as TensorBoard reads.
      self._tb = SummaryWriter(str(workdir), purge_step=start_step + 1,
                               filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(f"train/{k}", v, step)

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()


def truncate_metrics(path: pathlib.Path, last_step: int) -> None:
  """Keep the lines of a metrics.jsonl logged at steps up to `last_step`, rewriting it atomically;
  a line cut short by a crash is dropped."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
      continue
    if isinstance(step, int) and step <= last_step:
      kept.append(line + "\n")
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  tmp.write_text("".join(kept))
  os.replace(tmp, path)
