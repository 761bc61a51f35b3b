"""How a student's features relate to its teacher's, and whether an evaluation's attack converged.

Structure (METHODS.md section 3): the penultimate features of a student and of the teacher on the
same inputs, clean and adversarial (PGD against the student at the config's eps, the same PGD as
`evaluate`'s PGD-20), compared two ways:
  * linear CKA (Kornblith et al., ICML 2019): 1 for representations equal up to a rotation and an
    isotropic scaling, so it compares their geometry rather than their coordinates (the models'
    feature widths may differ);
  * the Pearson correlation of the two models' pairwise cosine-similarity matrices (upper
    triangle): whether both models find the same pairs of examples alike.

Curves: accuracy against eps (`evaluate.eps_curve`) and against the number of PGD steps. The steps
are checkpoints of one PGD trajectory per example (one random start, shared by all step counts):
an example counts as broken at K steps if it is misclassified at the start or at any checkpoint up
to K. The curve is therefore non-increasing, and it should flatten: if the last doubling of the
steps (e.g. 20 -> 50) still lowers the accuracy by more than 1 percentage point, the attack has not
converged and the evaluation is too weak to trust.

The models run over the split through `evaluator.map_split`, as `evaluate`'s attacks do: one jit
per model and batch shape, the batch sharded over the mesh.
"""

import dataclasses
import functools
import pathlib
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from gacd_jax import attacks
from gacd_jax import checkpoints
from gacd_jax import data
from gacd_jax import errors
from gacd_jax import evaluate
from gacd_jax import evaluator
from gacd_jax import report
from gacd_jax import similarity

# Column key -> label, in table order.
MEASURES = {
    "cka_clean": "CKA clean",
    "cka_adv": "CKA adversarial",
    "simcorr_clean": "similarity corr. clean",
    "simcorr_adv": "similarity corr. adversarial",
}
DEFAULT_STEPS = (1, 2, 5, 10, 20, 50)
# How much the last doubling of PGD steps may still lower the accuracy (a fraction: 1 pp).
CONVERGENCE_TOLERANCE = 0.01


def _settings(config: ConfigDict, max_examples: int) -> evaluate.EvalSettings:
  if not isinstance(max_examples, int) or max_examples < 0:
    raise errors.ConfigError(
        f"max_examples={max_examples!r} must be an integer >= 0 (0: the whole test split)")
  return dataclasses.replace(evaluate.EvalSettings.from_config(config.eval),
                             max_examples=max_examples)


# ---------------------------------------------------------------------------------------------
# Structure.


def paired_features(student: Any, student_variables: Any, teacher: Any, teacher_variables: Any,
                    source: data.Source, settings: evaluate.EvalSettings,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """Penultimate features of student and teacher on the same clean and adversarial inputs.

  The adversarial inputs are PGD against the student (`evaluate.attack_fn('pgd20', settings)` at
  `settings.eps`), fed to both models.

  Returns:
    `{'student_clean', 'teacher_clean', 'student_adv', 'teacher_adv'}`: [n, d_student] or
    [n, d_teacher], n = the first `settings.max_examples` test examples (0: all).
  """
  fn = _PairedFeatures(student, teacher, evaluate.attack_fn("pgd20", settings), settings.eps)
  return evaluator.map_split(fn, (student_variables, teacher_variables), source,
                             batch_size=settings.batch_size, max_examples=settings.max_examples,
                             seed=seed)[0]


@dataclasses.dataclass(frozen=True)
class _PairedFeatures:
  """`paired_features` on one batch: the attack against the student at `eps`, fed to both."""
  student: Any
  teacher: Any
  attack: evaluate.AttackFn
  eps: float

  def __call__(self, variables, x, y, rng):
    student_variables, teacher_variables = variables
    student_logits = functools.partial(evaluate.logits_fn(self.student), student_variables)
    x_adv = self.attack(student_logits, x, y, rng, self.eps)
    features = lambda model, model_variables, xx: model.apply(model_variables, xx, train=False)[1]
    return {"student_clean": features(self.student, student_variables, x),
            "teacher_clean": features(self.teacher, teacher_variables, x),
            "student_adv": features(self.student, student_variables, x_adv),
            "teacher_adv": features(self.teacher, teacher_variables, x_adv)}


def structure_measures(features: dict[str, np.ndarray]) -> dict[str, float]:
  """The `MEASURES` of a `paired_features` result."""
  out = {}
  for condition in ("clean", "adv"):
    s = jnp.asarray(features[f"student_{condition}"])
    t = jnp.asarray(features[f"teacher_{condition}"])
    out[f"cka_{condition}"] = float(similarity.linear_cka(s, t))
    out[f"simcorr_{condition}"] = float(similarity.similarity_correlation(s, t))
  return out


def recorded_teacher(run_dirs: Sequence[str]) -> str:
  """The teacher the runs were distilled from (run.json), if they all name the same one."""
  teachers = {(checkpoints.read_run_info(r).get("teacher") or {}).get("workdir") for r in run_dirs}
  if len(teachers) != 1 or None in teachers:
    raise errors.ConfigError(
        "the runs do not all record the same teacher (runs trained without one record none); "
        "name the teacher to compare against with --teacher=DIR")
  return teachers.pop()


def analyse_runs(run_dirs: Sequence[str], teacher_dir: str, config: ConfigDict, *,
                 max_examples: int = 1000) -> list[dict[str, Any]]:
  """Structure measures of each run against the teacher in `teacher_dir`.

  Args:
    run_dirs: run directories (students, or any models).
    teacher_dir: the run directory of the reference model.
    config: supplies the data (its test split) and the attack (`eval.*`: eps, PGD steps).
    max_examples: the first N test examples (0: all; the similarity matrices take O(N^2) memory).

  Returns:
    One row per run: `run` (directory name), `method`, `examples` (how many were used), and every
    key of `MEASURES` (floats).
  """
  source = evaluate.test_source(config)
  settings = _settings(config, max_examples)
  if 0 < max_examples < 3:
    raise errors.ConfigError(
        f"max_examples={max_examples}: the similarity correlation compares pairs of examples "
        "and needs at least 3; use more (0: the whole test split)")
  evaluate.check_channels(teacher_dir, source)
  teacher, teacher_variables = checkpoints.load_model(teacher_dir)
  rows = []
  for run in run_dirs:
    evaluate.check_channels(run, source)
    student, student_variables = checkpoints.load_model(run)
    features = paired_features(student, student_variables, teacher, teacher_variables, source,
                               settings, seed=config.seed)
    rows.append({"run": pathlib.Path(run).name,
                 "method": checkpoints.read_config(run).method.name,
                 "examples": len(features["student_clean"]), **structure_measures(features)})
  return rows


def write_structure(rows: list[dict[str, Any]], out_dir: str, *, teacher_dir: str,
                    config: ConfigDict) -> str:
  """Write `structure.json` (the rows), `structure.md` (a table) and `structure.png` (a heatmap,
  runs x measures) into `out_dir`; return the markdown."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  checkpoints.write_json(out / "structure.json", {
      "teacher": str(teacher_dir), "data": config.data.name, "eps": config.eval.eps,
      "pgd_steps": config.eval.pgd_steps, "runs": rows})
  table = report.markdown_table(
      [{"run": r["run"], "method": r["method"], **{label: f"{r[k]:.3f}"
                                                  for k, label in MEASURES.items()}}
       for r in rows])
  markdown = (
      f"# Structure: students against the teacher {teacher_dir}\n\n"
      f"Penultimate features on the first {rows[0]['examples']} {config.data.name} test "
      f"examples, clean and under PGD-{config.eval.pgd_steps} against the student (Linf eps = "
      f"{config.eval.eps:.4f}), fed to both models. Linear CKA and the Pearson correlation of "
      "pairwise cosine similarities: 1 = the same structure.\n\n"
      f"{table}\n\n![heatmap](structure.png)\n")
  (out / "structure.md").write_text(markdown)
  report.plot_heatmap([[r[k] for k in MEASURES] for r in rows], [r["run"] for r in rows],
                      list(MEASURES.values()), out / "structure.png",
                      title="students against the teacher")
  return markdown


# ---------------------------------------------------------------------------------------------
# Curves.


def check_steps(steps: Sequence[int]) -> None:
  """Raise a ConfigError unless `steps` is increasing, positive and ends with a doubling."""
  if (len(steps) < 2 or any(s <= 0 for s in steps)
      or any(a >= b for a, b in zip(steps, steps[1:]))):
    raise errors.ConfigError(
        f"PGD steps {list(steps)} must be positive and increasing, at least two of them, e.g. "
        f"{','.join(map(str, DEFAULT_STEPS))}")
  if steps[-1] < 2 * steps[-2]:
    raise errors.ConfigError(
        f"the last PGD step count ({steps[-1]}) must be at least twice the one before "
        f"({steps[-2]}): whether the attack converged is judged over that doubling")


def steps_curve(apply_fn: evaluate.ApplyFn, variables: Any, source: data.Source,
                settings: evaluate.EvalSettings, steps: Sequence[int] = DEFAULT_STEPS, *,
                start: attacks.Start = "uniform", seed: int = 0) -> list[float]:
  """Accuracy under PGD (cross-entropy, `settings.eps`, `settings.pgd_step_size`) per step count.

  All step counts share each example's start, so the runs are checkpoints of one trajectory; an
  example counts as broken at K steps if it is misclassified at the start or at any checkpoint up
  to K. The curve is non-increasing by construction, and with `start='none'` at most the clean
  accuracy.

  Args:
    apply_fn: `(variables, x) -> logits`.
    variables: the model's variables.
    source: the split (its first `settings.max_examples` examples; 0: all).
    settings: the attack's eps and step size, the batch size.
    steps: increasing step counts.
    start: 'uniform' in the eps-ball (a fixed key), or 'none' (the clean input).
    seed: the key of the random start.

  Returns:
    One accuracy in [0, 1] per entry of `steps`.
  """
  check_steps(steps)
  fn = _PGDCheckpoints(apply_fn, settings.eps, settings.pgd_step_size, tuple(steps), start)
  robust = evaluator.map_split(fn, variables, source, batch_size=settings.batch_size,
                               max_examples=settings.max_examples, seed=seed)[0]["robust"]
  return [float(a) for a in robust.mean(axis=0)]


@dataclasses.dataclass(frozen=True)
class _PGDCheckpoints:
  """`steps_curve` on one batch: per example and step count, whether it is still robust."""
  apply_fn: evaluate.ApplyFn
  eps: float
  step_size: float
  steps: tuple[int, ...]
  start: attacks.Start

  def __call__(self, variables, x, y, rng):
    logits_fn = functools.partial(self.apply_fn, variables)
    objective = attacks.cross_entropy_objective(logits_fn, y)
    correct = jnp.stack([
        logits_fn(attacks.pgd(objective, x, rng, eps=self.eps, step_size=self.step_size,
                              steps=k, start=self.start, unroll=False)).argmax(-1) == y
        for k in (0, *self.steps)], axis=1)  # [B, 1 + len(steps)]; 0 steps is the start
    return {"robust": jnp.cumprod(correct, axis=1)[:, 1:]}


def attack_too_weak(steps: Sequence[int], accuracies: Sequence[float],
                    tolerance: float = CONVERGENCE_TOLERANCE) -> bool:
  """Whether the last doubling of PGD steps still lowered accuracy by more than `tolerance`.

  Args:
    steps: increasing step counts whose last is at least twice the one before (`check_steps`).
    accuracies: the accuracy in [0, 1] at each.
    tolerance: the largest acceptable drop, as a fraction (0.01 = 1 percentage point).
  """
  check_steps(steps)
  if len(accuracies) != len(steps):
    raise ValueError(f"{len(steps)} step counts but {len(accuracies)} accuracies")
  return accuracies[-2] - accuracies[-1] > tolerance


def curve_runs(run_dirs: Sequence[str], config: ConfigDict, *,
               steps: Sequence[int] = DEFAULT_STEPS,
               max_examples: int = 1000) -> list[dict[str, Any]]:
  """Accuracy against eps (`config.eval.eps_curve`) and against PGD steps for each run.

  Returns:
    One row per run: `run`, `examples` (how many were used), `eps`, `eps_accuracy`, `steps`,
    `steps_accuracy` (accuracies in [0, 1]) and `too_weak` (see `attack_too_weak`).
  """
  check_steps(steps)
  source = evaluate.test_source(config)
  settings = _settings(config, max_examples)
  rows = []
  for run in run_dirs:
    evaluate.check_channels(run, source)
    module, variables = checkpoints.load_model(run)
    apply_fn = evaluate.logits_fn(module)
    name = pathlib.Path(run).name
    eps_accuracy = evaluate.eps_curve(apply_fn, variables, source, settings,
                                      config.eval.eps_curve, desc=name)
    steps_accuracy = steps_curve(apply_fn, variables, source, settings, steps, seed=config.seed)
    rows.append({"run": name, "examples": min(source.num_examples,
                                              max_examples or source.num_examples),
                 "eps": list(config.eval.eps_curve), "eps_accuracy": eps_accuracy,
                 "steps": list(steps), "steps_accuracy": steps_accuracy,
                 "too_weak": attack_too_weak(steps, steps_accuracy)})
  return rows


def write_curves(rows: list[dict[str, Any]], out_dir: str, *, config: ConfigDict) -> str:
  """Write `curves.json`, `curves.md`, `eps_curve.png` and `steps_curve.png` into `out_dir`;
  return the markdown."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  checkpoints.write_json(out / "curves.json", {
      "data": config.data.name, "eps": config.eval.eps, "runs": rows})
  steps = rows[0]["steps"]
  table = report.markdown_table([
      {"run": r["run"],
       **{f"PGD-{k}": f"{100 * a:.1f}" for k, a in zip(steps, r["steps_accuracy"])},
       "converged": "NO: evaluation too weak" if r["too_weak"] else "yes"} for r in rows])
  weak = [r["run"] for r in rows if r["too_weak"]]
  tolerance = f"{100 * CONVERGENCE_TOLERANCE:g} percentage point"
  verdict = (f"**The evaluation is too weak for {', '.join(weak)}**: going from {steps[-2]} to "
             f"{steps[-1]} PGD steps still lowers the accuracy by more than {tolerance}; use "
             "more steps (or AutoAttack) before trusting its robust accuracy." if weak else
             f"The attack converged for every run: going from {steps[-2]} to {steps[-1]} PGD "
             f"steps lowers the accuracy by at most {tolerance}.")
  markdown = (
      f"# Robust accuracy against eps and against PGD steps\n\n"
      f"The first {rows[0]['examples']} {config.data.name} test examples. Accuracy (%) under "
      f"PGD at Linf eps = {config.eval.eps:.4f}, step size {config.eval.pgd_step_size:.4f}; the "
      "step counts are checkpoints of one trajectory per example (an example is broken at K steps "
      "if the start or any checkpoint up to K fools the model).\n\n"
      f"{table}\n\n{verdict}\n\n![accuracy against eps](eps_curve.png)\n\n"
      "![accuracy against steps](steps_curve.png)\n")
  (out / "curves.md").write_text(markdown)
  report.plot_curves({r["run"]: (r["eps"], [100 * a for a in r["eps_accuracy"]]) for r in rows},
                     out / "eps_curve.png", xlabel="eps (Linf)", ylabel="PGD accuracy (%)",
                     title=f"{config.data.name}: accuracy under PGD-{config.eval.pgd_steps}")
  report.plot_curves({r["run"]: (r["steps"], [100 * a for a in r["steps_accuracy"]])
                      for r in rows},
                     out / "steps_curve.png", xlabel="PGD steps", ylabel="PGD accuracy (%)",
                     title=f"{config.data.name}: accuracy against PGD steps (eps = "
                     f"{config.eval.eps:.3g})")
  return markdown
