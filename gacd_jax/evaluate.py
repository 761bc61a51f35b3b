"""Robustness evaluation: accuracy on the test (or validation) split under the standard attacks.

The model is in eval mode and deterministic; attacks with a random start use a fixed key, so two
evaluations of the same run agree. Every attack is one jit over the mesh (`evaluator.map_split`:
the test batch split on `data`, the last batch padded and masked), compiled once per model,
attack and batch shape.
"""

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from gacd_jax import attacks
from gacd_jax import autoattack
from gacd_jax import checkpoints
from gacd_jax import config as config_lib
from gacd_jax import data
from gacd_jax import errors
from gacd_jax import evaluator
from gacd_jax import report
from gacd_jax import runtime

ApplyFn = Callable[[Any, jax.Array], jax.Array]  # (variables, x) -> logits
AttackFn = Callable[[Callable[[jax.Array], jax.Array], jax.Array, jax.Array, jax.Array, Any],
                    jax.Array]  # (logits_fn, x, y, rng, eps) -> x_adv

ATTACK_LABELS = {"clean": "clean", "fgsm": "FGSM", "pgd20": "PGD-20", "cw": "CW-inf"}
RESULT_LABELS = {**ATTACK_LABELS, "autoattack": "AutoAttack"}  # the keys of `evaluate_run`'s result


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  eps: float = 8 / 255
  pgd_steps: int = 20
  pgd_step_size: float = 2 / 255
  cw_steps: int = 30
  cw_step_size: float = 2 / 255
  batch_size: int = 256
  max_examples: int = 0

  @classmethod
  def from_config(cls, eval_config: ConfigDict) -> "EvalSettings":
    return cls(**{f.name: eval_config[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Attack:
  """A named attack as `(logits_fn, x, y, rng, eps) -> x_adv`, holding only what it computes
  with, so that equal attacks share their compilations. PGD's step size scales with
  `eps / reference_eps`, so an eps sweep keeps the step/eps ratio."""
  name: str
  steps: int = 0
  step_size: float = 0.0
  reference_eps: float = 0.0

  def __post_init__(self):
    if self.name not in ATTACK_LABELS:
      raise ValueError(f"unknown attack {self.name!r}; known: {', '.join(ATTACK_LABELS)}")

  def __call__(self, f, x, y, rng, eps):
    if self.name == "clean":
      return x
    if self.name == "fgsm":
      return attacks.fgsm(attacks.cross_entropy_objective(f, y), x, eps=eps)
    objective = (attacks.margin_objective if self.name == "cw"
                 else attacks.cross_entropy_objective)
    step_size = (self.step_size * eps / self.reference_eps if self.reference_eps
                 else self.step_size)
    return attacks.pgd(objective(f, y), x, rng, eps=eps, step_size=step_size, steps=self.steps,
                       start="uniform", unroll=False)


def attack_fn(name: str, settings: EvalSettings | None) -> Attack:
  """The named attack (a key of `ATTACK_LABELS`) with the steps and step size of `settings`
  (which 'clean' and 'fgsm' do not need)."""
  if name == "pgd20":
    return Attack(name, settings.pgd_steps, settings.pgd_step_size, settings.eps)
  if name == "cw":
    return Attack(name, settings.cw_steps, settings.cw_step_size, settings.eps)
  return Attack(name)


@dataclasses.dataclass(frozen=True)
class Logits:
  """`(variables, x) -> logits` of a Linen module in eval mode. Hashable (modules are), so the
  evaluations of equal modules share their compilations."""
  module: Any

  def __call__(self, variables, x):
    return self.module.apply(variables, x, train=False)[0]


def logits_fn(module) -> Logits:
  """`(variables, x) -> logits` of `module` in eval mode (equal for equal modules)."""
  return Logits(module)


@dataclasses.dataclass(frozen=True)
class _Correct:
  """Per example: whether `apply_fn` classifies `attack`'s adversarial example correctly."""
  apply_fn: ApplyFn
  attack: AttackFn

  def __call__(self, variables, x, y, rng, eps):
    f = functools.partial(self.apply_fn, variables)
    return {"correct": f(self.attack(f, x, y, rng, eps)).argmax(-1) == y}


def robust_accuracy(apply_fn: ApplyFn, variables: Any, source: data.Source, attack: AttackFn,
                    *, eps: float | list[float], batch_size: int, mesh=None,
                    max_examples: int = 0, seed: int = 0,
                    desc: Optional[str] = "") -> list[float]:
  """Accuracy of `apply_fn` on `source` under `attack`, for each eps (one pass over the data),
  with a progress bar labelled `desc` (None: none).

  `apply_fn` and `attack` should be hashable (`Logits`, `Attack`): the jit is cached on them.
  Batch `i` attacks with the key `fold_in(key(seed), i)`.

  Returns:
    One accuracy in [0, 1] per eps.
  """
  eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
  for e in eps_list:
    attacks.check_eps(float(e))
  results = evaluator.map_split(
      _Correct(apply_fn, attack), variables, source, batch_size=batch_size,
      max_examples=max_examples, seed=seed, mesh=mesh,
      sweep=[(jnp.float32(e),) for e in eps_list], desc=None if desc is None else desc or "eval")
  return [int(r["correct"].sum()) / max(len(r["correct"]), 1) for r in results]


def evaluate_model(apply_fn: ApplyFn, variables: Any, source: data.Source,
                   settings: EvalSettings, *, names=tuple(ATTACK_LABELS), mesh=None,
                   desc: Optional[str] = "") -> tuple[dict[str, float], dict[str, float]]:
  """Accuracy under each named attack at `settings.eps`: `(accuracies, seconds per attack)`;
  a progress bar per attack labelled `desc` (None: no bars)."""
  results, seconds = {}, {}
  for name in names:
    tic = time.perf_counter()
    results[name] = robust_accuracy(
        apply_fn, variables, source, attack_fn(name, settings), eps=settings.eps,
        batch_size=settings.batch_size, mesh=mesh, max_examples=settings.max_examples,
        desc=None if desc is None else f"{desc} {ATTACK_LABELS[name]}".strip())[0]
    seconds[name] = time.perf_counter() - tic
  return results, seconds


def eps_curve(apply_fn: ApplyFn, variables: Any, source: data.Source, settings: EvalSettings,
              eps_values, *, mesh=None, desc: Optional[str] = "") -> list[float]:
  """PGD accuracy at each eps (step size scaled with eps); `desc` None: no progress bar."""
  return robust_accuracy(apply_fn, variables, source, attack_fn("pgd20", settings),
                         eps=list(eps_values), batch_size=settings.batch_size, mesh=mesh,
                         max_examples=settings.max_examples,
                         desc=None if desc is None else f"{desc} eps sweep".strip())


def check_channels(workdir: str, source: data.Source) -> None:
  """A model runs on any image size (global pooling) but not on another channel count."""
  channels = checkpoints.read_run_info(workdir)["image_shape"][-1]
  if channels != source.image_shape[-1]:
    raise errors.ConfigError(
        f"the model in {workdir} takes {channels}-channel images but {source.name} has "
        f"{source.image_shape[-1]}; set config.data.channels={channels}")


def check_classes(workdir: str, source: data.Source) -> None:
  """Accuracy is only meaningful on the labels the model predicts: the same number of classes."""
  num_classes = checkpoints.read_run_info(workdir)["num_classes"]
  if num_classes != source.num_classes:
    raise errors.ConfigError(
        f"the model in {workdir} predicts {num_classes} classes but {source.name} "
        f"{source.split} has {source.num_classes}; evaluate on the data the model was trained "
        "on (its config.json), e.g. with the same config.data.classes")


def test_source(config: ConfigDict, split: str = "") -> data.Source:
  """The split of `config.data` that evaluation reads: `split`, else `config.eval.split`."""
  return data.from_config(config.data, split or config.eval.split, seed=config.seed)


AUTOATTACK_LABELS = {"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T",
                     "fab": "FAB", "fab-t": "FAB-T", "square": "Square"}


def test_arrays(source: data.Source, max_examples: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The first `max_examples` (0: all) images and labels of `source` as host arrays."""
  batch = source.get(np.arange(_n_examples(source, max_examples)))
  return batch["image"], batch["label"]


def run_autoattack(apply_fn: ApplyFn, variables: Any, source: data.Source, config: ConfigDict,
                   *, progress: bool = True) -> autoattack.Evaluation:
  """AutoAttack (version `config.eval.suite`) on the test examples `config.eval` selects."""
  if jax.process_count() > 1:
    raise errors.ConfigError(
        "AutoAttack in `evaluate` runs in one process; evaluate without --distributed (one "
        "host's devices), or call gacd_jax.autoattack.evaluate on each host's share")
  x, y = test_arrays(source, config.eval.max_examples)
  return autoattack.evaluate(
      apply_fn, x, y, params=variables, eps=config.eval.eps, norm="linf",
      version=config.eval.suite, batch_size=config.eval.batch_size, seed=config.seed,
      n_iter=config.eval.autoattack_n_iter, n_queries=config.eval.autoattack_n_queries,
      progress=progress)


def evaluate_run(config: ConfigDict, workdir: str, *, curve: bool = False,
                 progress: bool = True) -> dict[str, Any]:
  """Evaluate the run in `workdir` on the split `config.eval.split` of `config.data`.

  Runs clean, FGSM, PGD-20 and CW-inf, then AutoAttack if `config.eval.suite` names a version
  ('fast', 'standard', 'plus'). Writes into the workdir `eval.json` (accuracies in [0, 1] and
  seconds per attack, and AutoAttack's accuracy after each of its attacks) and `report.md` (the
  table, with the time per attack); on the validation split `eval-validation.json` and
  `report-validation.md`, so the two never overwrite each other. Returns the accuracies by attack
  name ('autoattack' for the ensemble; with `curve`, also the PGD accuracy per eps of
  `config.eval.eps_curve` under 'eps_curve').
  """
  config_lib.validate(config)
  module, variables = checkpoints.load_model(
      workdir, store_conv_inputs=runtime.store_conv_inputs(jax.default_backend()))
  source = test_source(config)
  check_channels(workdir, source)
  check_classes(workdir, source)
  if jax.process_index() == 0:  # before the attacks run, not when their results are written
    checkpoints.check_writable(workdir, "--workdir")
  settings = EvalSettings.from_config(config.eval)
  workdir = pathlib.Path(workdir)
  name = workdir.name
  desc = name if progress else None
  accuracy, seconds = evaluate_model(logits_fn(module), variables, source, settings, desc=desc)
  rows = [{"attack": ATTACK_LABELS[k], "accuracy (%)": f"{100 * v:.2f}",
           "time (s)": f"{seconds[k]:.1f}"} for k, v in accuracy.items()]
  summary: dict[str, Any] = {"suite": config.eval.suite, "eps": settings.eps,
                             "examples": _n_examples(source, settings.max_examples)}
  if config.eval.suite != "basic":
    result = run_autoattack(logits_fn(module), variables, source, config, progress=progress)
    accuracy["autoattack"] = result.robust_accuracy
    seconds["autoattack"] = sum(result.seconds.values())
    summary["autoattack"] = {"version": result.version, "clean": result.clean_accuracy,
                             "accuracy_after": result.accuracy_after, "seconds": result.seconds}
    rows.append({"attack": f"AutoAttack ({result.version})",
                 "accuracy (%)": f"{100 * result.robust_accuracy:.2f}",
                 "time (s)": f"{seconds['autoattack']:.1f}"})
    rows += [{"attack": f"- after {AUTOATTACK_LABELS[k]}", "accuracy (%)": f"{100 * v:.2f}",
              "time (s)": f"{result.seconds[k]:.1f}"} for k, v in result.accuracy_after.items()]
  summary["split"] = config.eval.split
  checkpoints.write_json(workdir / results_file(config.eval.split),
                         {"accuracy": accuracy, "seconds": seconds, **summary})
  (workdir / report_file(config.eval.split)).write_text(
      f"# Evaluation of {workdir}\n\n{config.data.name} {config.eval.split} split "
      f"({summary['examples']} examples), eps = {settings.eps:.4f} (Linf), {config.model.name}, "
      f"model in eval mode\n\n" + report.markdown_table(rows) + "\n")
  out: dict[str, Any] = dict(accuracy)
  if curve:
    out["eps_curve"] = eps_curve(logits_fn(module), variables, source, settings,
                                 config.eval.eps_curve, desc=desc)
  return out


def _n_examples(source: data.Source, max_examples: int) -> int:
  return min(max_examples, source.num_examples) if max_examples else source.num_examples


def results_file(split: str) -> str:
  """The file `evaluate_run` writes its results of `split` to, inside the workdir."""
  return "eval.json" if split == "test" else f"eval-{split}.json"


def report_file(split: str) -> str:
  """The file `evaluate_run` writes its markdown table of `split` to, inside the workdir."""
  return "report.md" if split == "test" else f"report-{split}.md"


def read_results(workdir: str, split: str = "test") -> Optional[dict]:
  """The accuracies `evaluate_run` wrote into `workdir` for `split`, or None if it has not run."""
  path = pathlib.Path(workdir) / results_file(split)
  return json.loads(path.read_text())["accuracy"] if path.exists() else None
