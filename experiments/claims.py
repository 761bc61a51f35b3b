"""GACD's other claims, measured against ARD, RSLAD and PGD-AT (issue 10, item 4).

Three measurements, each resumable (what is already computed in `--workdir` is reused) and
reported as mean ± std (sample std) over seeds:

  structure   linear CKA and the correlation of pairwise-similarity matrices between each student
              of the study and its seed's teacher, on clean and on PGD inputs (the test split;
              `gacd_jax.analysis`). Reads the study's runs; trains nothing.
  probe       a linear probe on each study student's frozen features, trained and attacked end
              to end (clean, PGD-20) on the other dataset: digits students on mnist5k shrunk to
              8x8, mnist5k students on digits enlarged to 28x28 (`gacd_jax.probe`), at the
              student's own training eps. Reads the study's runs; trains only probes.
  crosstask   a PGD-AT teacher (width 32) trained on digits 0-4 distils, with GACD, a student
              (width 8) on digits 5-9; against the same student trained by PGD-AT alone and
              naturally, same schedule and attack budget. Evaluated on the test split of 5-9:
              clean, PGD-20, AutoAttack (version 'fast': APGD-CE + APGD-T). Trains its own runs.

  python -m experiments.claims structure --study-workdir runs/study --workdir runs/claims
  python -m experiments.claims probe --study-workdir runs/study --workdir runs/claims
  python -m experiments.claims crosstask --workdir runs/claims

The study's runs are `<study-workdir>/<dataset>/seed<s>/{teacher,<method>}` (experiments/study.py);
one that is not finished yet (no eval.json) is skipped with a note, so the tables fill in as the
study proceeds. Results go to `--out` (default experiments/results): claims_<kind>.md, .json and
(structure, crosstask) .png. A call for some datasets replaces theirs in the json and rewrites
the table from it.
"""

import argparse
import dataclasses
import hashlib
import json
import pathlib
import shlex
import sys
from typing import Any, Callable, Optional

import numpy as np
from ml_collections import ConfigDict

from experiments import study
from gacd_jax import analysis
from gacd_jax import checkpoints
from gacd_jax import data
from gacd_jax import evaluate
from gacd_jax import methods
from gacd_jax import probe
from gacd_jax import recipes
from gacd_jax import report
from gacd_jax import runtime
from gacd_jax.methods import gacd as gacd_lib

KINDS = ("structure", "probe", "crosstask")
# The students compared, and the references shown beside them where they are finished.
STUDENTS = ("gacd", "ard", "rslad", "pgd_at")
STRUCTURE_REFERENCES = ("natural",)
PROBE_REFERENCES = ("teacher", "natural")
# The probe's task for a student of each dataset (resized to the student's input size).
PROBE_TASK = {"digits": "mnist5k", "mnist5k": "digits"}
PROBE_ATTACKS = ("clean", "pgd20")
# The probe is attacked at fractions of the student's own eps, per student dataset: MNIST shrunk
# to 8x8 has about half the ink of sklearn's digits (mean pixel 0.13 against 0.31), so the same
# eps is a larger perturbation of it (digits students: eps and eps/2). sklearn's 8x8 digits
# enlarged to 28x28 are blurred strokes that mnist5k's eps 0.3 (and 0.15, 0.075) erases for
# every model, the teacher's probe too (0% at all three, seed 0); at eps/8 the probes differ
# (mnist5k students: eps, eps/2, eps/8).
PROBE_EPS_FRACTIONS = {"digits": {"pgd20": 1.0, "pgd20_half_eps": 0.5},
                       "mnist5k": {"pgd20": 1.0, "pgd20_half_eps": 0.5,
                                   "pgd20_eighth_eps": 0.125}}
# Cross-task: the teacher's classes and the student's (original labels).
TEACHER_CLASSES = (0, 1, 2, 3, 4)
STUDENT_CLASSES = (5, 6, 7, 8, 9)
CROSSTASK_METHODS = ("gacd", "pgd_at", "natural")
CROSSTASK_SUITE = "fast"
CROSSTASK_METRICS = ("clean", "pgd20", "autoattack")
ACCURACY_LABELS = {"clean": "clean", "pgd20": "PGD-20", "autoattack": "AutoAttack (fast)"}
EVAL_FILE = evaluate.results_file("test")


def method_config(dataset: str, method: str) -> ConfigDict:
  """The config every run of the claims starts from: the study's (`configs/<dataset>.py:METHOD`).
  Tests replace it with a tiny one."""
  return recipes.small_method_config(dataset, method)


# ---------------------------------------------------------------------------------------------
# Reading the study.


def study_run(study_root: pathlib.Path, dataset: str, seed: int, name: str) -> pathlib.Path:
  """The study's run `name` ('teacher' or a method) of `dataset` and `seed`."""
  return study_root / dataset / f"seed{seed}" / name


def finished(run: pathlib.Path) -> bool:
  """A run of the study is finished once it is evaluated on the test split."""
  return (run / EVAL_FILE).is_file()


def fingerprint(*runs: pathlib.Path) -> str:
  """Changes whenever one of the runs is trained or evaluated again."""
  h = hashlib.sha256()
  for run in runs:
    for name in (checkpoints.CONFIG_FILE, checkpoints.RUN_FILE, EVAL_FILE):
      h.update(name.encode())
      h.update((run / name).read_bytes())
  return h.hexdigest()


def cached(path: pathlib.Path, key: str, compute: Callable[[], Any]) -> Any:
  """`compute()`, stored at `path` with `key`; reused while the key matches."""
  if path.is_file():
    stored = json.loads(path.read_text())
    if stored.get("fingerprint") == key:
      return stored["value"]
  value = compute()
  path.parent.mkdir(parents=True, exist_ok=True)
  checkpoints.write_json(path, {"fingerprint": key, "value": value})
  return value


def study_gacd(study_root: pathlib.Path, datasets: list[str], seeds: list[int]) -> dict:
  """`{dataset: {seed: config.method.gacd}}` of the study's finished GACD students: which GACD
  the tables measured (the study retrains them when the default changes)."""
  out: dict[str, dict[str, Any]] = {}
  for dataset in datasets:
    for seed in seeds:
      run = study_run(study_root, dataset, seed, "gacd")
      if finished(run):
        switches = checkpoints.read_config(run).method.gacd.to_dict()
        out.setdefault(dataset, {})[str(seed)] = switches
  return out


def summarise(per_seed: dict[str, dict[str, Any]], measures: tuple[str, ...]) -> dict:
  """`{name: {measure: {'mean', 'std', 'n'}}}` of `{name: {'seeds': [...], measure: [...]}}`;
  std is the sample standard deviation (0 for one seed)."""
  out = {}
  for name, entry in per_seed.items():
    out[name] = {}
    for m in measures:
      if entry.get(m):
        mean, std = study.mean_std(entry[m])
        out[name][m] = {"mean": mean, "std": std, "n": len(entry[m])}
  return out


def _add(per_seed: dict, name: str, seed: int, values: dict[str, float]) -> None:
  entry = per_seed.setdefault(name, {"seeds": []})
  entry["seeds"].append(seed)
  for key, value in values.items():
    entry.setdefault(key, []).append(value)


# ---------------------------------------------------------------------------------------------
# Structure.


def structure_config(dataset: str, seed: int) -> ConfigDict:
  """Data (test split) and attack (eps, PGD-20) of the structure analysis: the study's."""
  c = method_config(dataset, study.TEACHER_METHOD)
  c.seed = seed
  c.eval.split = "test"
  return c


def finished_or_skipped(run: pathlib.Path, skipped: list[str], why: str = "") -> bool:
  """Whether the study run is finished; if not, it is added to `skipped` and said so."""
  if finished(run):
    return True
  skipped.append(str(run))
  print(f"skip: {run} is not finished (no {EVAL_FILE}){why}", flush=True)
  return False


def run_structure(study_root: pathlib.Path, root: pathlib.Path, datasets: list[str],
                  seeds: list[int], names: list[str], max_examples: int) -> tuple[dict, list[str]]:
  """`({dataset: {method: {'seeds': [...], measure: [per seed]}}}, skipped runs)`."""
  results, skipped = {}, []
  for dataset in datasets:
    per_seed: dict[str, dict] = {}
    for seed in seeds:
      teacher = study_run(study_root, dataset, seed, "teacher")
      if not finished_or_skipped(teacher, skipped, f"; seed {seed} of {dataset} left out of the "
                                 "structure table"):
        continue
      config = structure_config(dataset, seed)
      for name in names:
        run = study_run(study_root, dataset, seed, name)
        if not finished_or_skipped(run, skipped):
          continue
        row = cached(
            root / "structure" / dataset / f"seed{seed}" / f"{name}.json",
            fingerprint(run, teacher) + f"/{max_examples}",
            lambda: analysis.analyse_runs([str(run)], str(teacher), config,
                                          max_examples=max_examples)[0])
        print(f"[{dataset} seed {seed}] {name}: "
              + ", ".join(f"{k} {row[k]:.3f}" for k in analysis.MEASURES), flush=True)
        _add(per_seed, name, seed, {k: row[k] for k in analysis.MEASURES})
    results[dataset] = per_seed
  return results, skipped


# ---------------------------------------------------------------------------------------------
# Probe.


def probe_config(student_dataset: str, image_size: int, seed: int) -> ConfigDict:
  """The probe's task for a student of `student_dataset`: the other bundled dataset at the
  student's image size, attacked at the student's own training eps."""
  task = PROBE_TASK[student_dataset]
  eps = method_config(student_dataset, study.TEACHER_METHOD).eval.eps
  c = method_config(task, study.TEACHER_METHOD)
  c.data.image_size = image_size
  c.seed = seed
  c.eval.split = "test"
  c.eval.suite = "basic"
  c.eval.eps = eps
  c.eval.pgd_step_size = eps / 8
  return c


def run_probes(study_root: pathlib.Path, root: pathlib.Path, datasets: list[str],
               seeds: list[int], names: list[str], max_examples: int,
               settings: probe.ProbeSettings, progress: bool) -> tuple[dict, list[str]]:
  """`({dataset: {name: {'seeds', 'clean', 'pgd20', 'pgd20_half_eps', 'train_accuracy':
  [per seed]}}}, skipped)`."""
  results, skipped = {}, []
  for dataset in datasets:
    per_seed: dict[str, dict] = {}
    for seed in seeds:
      for name in names:
        run = study_run(study_root, dataset, seed, name)
        if not finished_or_skipped(run, skipped):
          continue
        image_size = checkpoints.read_run_info(run)["image_shape"][0]
        config = probe_config(dataset, image_size, seed)
        config.eval.max_examples = max_examples
        out = root / "probe" / dataset / f"seed{seed}" / name

        def compute(run=run, config=config, out=out):
          values = {}
          for key, fraction in PROBE_EPS_FRACTIONS[dataset].items():
            c = config.copy_and_resolve_references()
            c.eval.eps *= fraction
            c.eval.pgd_step_size *= fraction
            # The probe is the same each time (deterministic); only the attack differs.
            result = probe.run_probe(str(run), c, str(out / key), settings, attacks=PROBE_ATTACKS,
                                     progress=progress)
            values.update(train_accuracy=result["train_accuracy"],
                          clean=result["accuracy"]["clean"])
            values[key] = result["accuracy"]["pgd20"]
          return values

        key = fingerprint(run) + json.dumps(
            [max_examples, dataclasses.asdict(settings), PROBE_EPS_FRACTIONS[dataset]],
            sort_keys=True)
        values = cached(out / "claims.json", key, compute)
        print(f"[{dataset} seed {seed}] {name} probed on {config.data.name} ({image_size}x"
              f"{image_size}): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in values.items()),
              flush=True)
        _add(per_seed, name, seed, values)
    results[dataset] = per_seed
  return results, skipped


# ---------------------------------------------------------------------------------------------
# Cross-task transfer.


def crosstask_runs(root: pathlib.Path, dataset: str, seed: int,
                   names: tuple[str, ...] = CROSSTASK_METHODS) -> list[study.Run]:
  """The teacher on `TEACHER_CLASSES`, then the students on `STUDENT_CLASSES`."""
  base = root / "crosstask" / dataset / f"seed{seed}"
  teacher_config = method_config(dataset, study.TEACHER_METHOD)
  teacher_config.data.classes = TEACHER_CLASSES
  runs = [study.Run(dataset, seed, "teacher", teacher_config, base / "teacher")]
  for name in names:
    c = method_config(dataset, name)
    # Every student is narrow, also PGD-AT's (whose config trains teachers), as in the study.
    c.model.small_cnn.width = recipes.SMALL_DATA[dataset].student_width
    c.data.classes = STUDENT_CLASSES
    if methods.build(c.method).uses_teacher:
      if name != "gacd":
        raise ValueError(f"{name} distils soft labels, which a teacher of other classes cannot "
                         "give; cross-task compares gacd with methods that use no teacher")
      c.teacher.workdir = str(base / "teacher")
      feature_only_gacd(c.method.gacd)
    runs.append(study.Run(dataset, seed, name, c, base / name))
  for run in runs:
    run.config.seed = seed
    run.config.eval.split = "test"
    run.config.eval.suite = CROSSTASK_SUITE
  return runs


def feature_only_gacd(gacd: ConfigDict) -> None:
  """GACD that uses nothing but the teacher's features (`gacd_lib.make_feature_only`): the
  teacher's probabilities are of other classes. Prints what changed."""
  for change in gacd_lib.make_feature_only(gacd):
    print(f"note: cross-task GACD uses the teacher's features only: {change}", flush=True)


def run_crosstask(root: pathlib.Path, datasets: list[str], seeds: list[int],
                  names: tuple[str, ...], progress: bool) -> tuple[dict, dict]:
  """`({dataset: {name: {'seeds', metric: [per seed]}}}, {dataset: GACD's switches})`."""
  results, switches = {}, {}
  for dataset in datasets:
    per_seed: dict[str, dict] = {}
    for seed in seeds:
      for run in crosstask_runs(root, dataset, seed, names):
        stored = study.train_and_evaluate(run, progress=progress)
        accuracy = {m: stored["accuracy"][m] for m in CROSSTASK_METRICS}
        print(f"[{dataset} seed {seed}] cross-task {run.name}: "
              + ", ".join(f"{k} {100 * v:.1f}" for k, v in accuracy.items())
              + f" (train {stored.get('train_seconds', 0) / 60:.1f} min, evaluate "
              f"{stored.get('eval_seconds', 0) / 60:.1f} min)", flush=True)
        _add(per_seed, run.name, seed, accuracy)
        if run.name == "gacd":
          switches[dataset] = run.config.method.gacd.to_dict()
    results[dataset] = per_seed
  return results, switches


# ---------------------------------------------------------------------------------------------
# Writing the results.


def merge(path: pathlib.Path, results: dict, extra: dict,
          per_dataset: Optional[dict[str, dict]] = None) -> dict:
  """Replace the datasets of `results` (and of each `per_dataset` entry, `{key: {dataset: ...}}`)
  in the json at `path`, keeping the other datasets; set `extra`; recompute the summaries;
  return everything."""
  everything = json.loads(path.read_text()) if path.exists() else {}
  for key, by_dataset in {"results": results, **(per_dataset or {})}.items():
    everything.setdefault(key, {}).update(by_dataset)
  everything.update(extra)
  everything["summary"] = {dataset: summarise(per_seed, _measures(per_seed))
                           for dataset, per_seed in everything["results"].items()}
  checkpoints.write_json(path, everything)
  return everything


def _measures(per_seed: dict) -> tuple[str, ...]:
  return tuple(dict.fromkeys(k for entry in per_seed.values() for k in entry if k != "seeds"))


def _ordered(names, order: tuple[str, ...]) -> list[str]:
  """`names` in `order`, those not in it last."""
  return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def table(per_seed: dict, labels: dict[str, str], order: tuple[str, ...], percent: bool) -> str:
  names = _ordered(per_seed, order)
  rows = [{"": n, **{label: study.format_cell(per_seed[n].get(k, []), percent)
                     for k, label in labels.items()},
           "seeds": ",".join(map(str, per_seed[n]["seeds"]))} for n in names]
  return report.markdown_table(rows) if rows else "(no finished runs yet)"


def _commands(argv: list[str], results: dict) -> dict[str, str]:
  """The command of this call, for each dataset it measured."""
  return {dataset: "python -m experiments.claims " + shlex.join(argv) for dataset in results}


def _command_line(everything: dict, dataset: str) -> str:
  command = everything.get("commands", {}).get(dataset, "(not recorded)")
  return f"Command (resumable; regenerates this section): `{command}`\n\n"


def _skipped_note(skipped: list[str]) -> str:
  if not skipped:
    return ""
  return (f"\n\nLeft out, not finished when this was written ({len(skipped)}): "
          + ", ".join(f"`{s}`" for s in skipped) + ".")


def write_structure(out: pathlib.Path, results: dict, skipped: list[str], argv: list[str],
                    study_root: pathlib.Path, seeds: list[int]) -> str:
  everything = merge(out / "claims_structure.json", results,
                     {"study_workdir": str(study_root), "measures": analysis.MEASURES,
                      "skipped": skipped},
                     {"study_gacd": study_gacd(study_root, list(results), seeds),
                      "commands": _commands(argv, results)})
  order = STUDENTS + STRUCTURE_REFERENCES
  sections = []
  for dataset, per_seed in everything["results"].items():
    eps = recipes.SMALL_DATA[dataset].eps
    sections.append(f"## {dataset}\n\n{_command_line(everything, dataset)}"
                    f"Test split, Linf eps {eps}; PGD-20 against the student, "
                    "its adversarial inputs fed to both models.\n\n"
                    + table(per_seed, analysis.MEASURES, order, percent=False) + "\n")
  groups = {f"{d} {n}": {label: r[n].get(k, []) for k, label in analysis.MEASURES.items()}
            for d, r in everything["results"].items() for n in _ordered(r, order)}
  if groups:
    report.plot_bars(groups, out / "claims_structure.png", ylabel="similarity to the teacher",
                     title="students against their teacher (mean ± std over seeds)")
  markdown = (
      "# Structure: how much of the teacher's feature geometry each student captured\n\n"
      "Each dataset's section names the command that regenerates it (and its part of "
      "claims_structure.json and .png).\n\n"
      "Every student of the study (small_cnn width 8, same schedule and training attack) against "
      "the PGD-AT teacher (width 32) of its seed: linear CKA between their penultimate features, "
      "and the Pearson correlation of their pairwise cosine-similarity matrices (upper triangle), "
      "on clean test inputs and on PGD-20 inputs crafted against the student (`gacd_jax."
      "analysis`). 1 = the same structure. Mean ± sample std over seeds; 'natural' (no teacher, "
      "no attack) is the reference for what a student shares with the teacher without "
      "distillation." + _skipped_note(skipped) + "\n\n" + "\n".join(sections)
      + "\n![structure](claims_structure.png)\n")
  (out / "claims_structure.md").write_text(markdown)
  return markdown


def write_probe(out: pathlib.Path, results: dict, skipped: list[str], argv: list[str],
                study_root: pathlib.Path, seeds: list[int], settings: probe.ProbeSettings) -> str:
  everything = merge(out / "claims_probe.json", results,
                     {"study_workdir": str(study_root), "probe_task": PROBE_TASK,
                      "settings": dataclasses.asdict(settings), "skipped": skipped},
                     {"study_gacd": study_gacd(study_root, list(results), seeds),
                      "commands": _commands(argv, results)})
  labels = {"clean": "probe clean", "pgd20": "probe PGD-20", "pgd20_half_eps": "at eps/2",
            "pgd20_eighth_eps": "at eps/8",
            "train_accuracy": "probe train"}
  order = STUDENTS + PROBE_REFERENCES
  sections = []
  for dataset, per_seed in everything["results"].items():
    task = PROBE_TASK[dataset]
    size = recipes.SMALL_DATA[dataset].image_size
    source = data.build(task, "test", image_size=size)
    fractions = PROBE_EPS_FRACTIONS[dataset]
    shown = {k: v for k, v in labels.items() if k in fractions or not k.startswith("pgd20")}
    sections.append(
        f"## {dataset} students, probed on {task} at {size}x{size}\n\n"
        + _command_line(everything, dataset) +
        f"Probe trained on the {task} train split, tested on its {source.num_examples} test "
        f"images; PGD-20 at Linf eps {recipes.SMALL_DATA[dataset].eps} (the students' own) and at "
        + ", ".join(f"{f:g}" for f in list(fractions.values())[1:]) + " of it.\n\n"
        + table(per_seed, shown, order, percent=True) + "\n")
  markdown = (
      "# Robust features: a linear probe on frozen student features, on a task it never saw\n\n"
      "Each dataset's section names the command that regenerates it (and its part of "
      "claims_probe.json).\n\n"
      "Each run of the study is frozen (eval mode); a softmax regression on its penultimate "
      f"features is trained ({settings.steps} Adam steps, lr {settings.learning_rate:g}, weight "
      f"decay {settings.weight_decay:g}, standardised features) on the other dataset, resized to "
      "the run's input size: digits students on mnist5k shrunk to 8x8, mnist5k students on digits "
      "enlarged to 28x28. Probe and backbone are then attacked end to end (PGD-20, random start, "
      "step eps/8), so the robust accuracy is that of the transferred features "
      "(`gacd_jax.probe`), at the student's own eps and at fractions of it: half for digits "
      "students (MNIST shrunk to 8x8 has about half the ink of sklearn's digits, mean pixel 0.13 "
      "against 0.31, so the same eps perturbs it more), also an eighth for mnist5k students "
      "(sklearn's digits enlarged to 28x28 are blurred strokes that eps 0.3, 0.15 and 0.075 "
      "erase for every model, the teacher's probe too). Accuracy (%), mean ± sample std over "
      "seeds; 'teacher' (width 32) and "
      "'natural' (not robust) are references." + _skipped_note(skipped) + "\n\n"
      + "\n".join(sections))
  (out / "claims_probe.md").write_text(markdown)
  return markdown


def write_crosstask(out: pathlib.Path, results: dict, switches: dict, argv: list[str]) -> str:
  everything = merge(out / "claims_crosstask.json", results,
                     {"teacher_classes": list(TEACHER_CLASSES),
                      "student_classes": list(STUDENT_CLASSES),
                      "autoattack_version": CROSSTASK_SUITE},
                     {"gacd_switches": switches, "commands": _commands(argv, results)})
  order = ("teacher",) + CROSSTASK_METHODS
  sections = []
  for dataset, per_seed in everything["results"].items():
    d = recipes.SMALL_DATA[dataset]
    students = {n: r for n, r in per_seed.items() if n != "teacher"}
    teacher = {n: r for n, r in per_seed.items() if n == "teacher"}
    gacd = everything["gacd_switches"].get(dataset, {})
    gacd_note = ", ".join(f"{k} {gacd[k]}" for k in ("estimator", "anchor", "attack_objective",
                                                     "reweighting", "contrastive_weight",
                                                     "kl_weight") if k in gacd)
    sections.append(
        f"## {dataset}\n\n{_command_line(everything, dataset)}"
        f"Students (small_cnn width {d.student_width}) on the {dataset} images of "
        f"digits {STUDENT_CLASSES[0]}-{STUDENT_CLASSES[-1]}, evaluated on those of the test split; "
        f"Linf eps {d.eps}, {d.epochs} epochs. GACD: {gacd_note}.\n\n"
        + table(students, ACCURACY_LABELS, order, percent=True)
        + f"\n\nThe teacher (width {d.teacher_width}, PGD-AT) on its own digits "
        f"{TEACHER_CLASSES[0]}-{TEACHER_CLASSES[-1]}, for reference:\n\n"
        + table(teacher, ACCURACY_LABELS, order, percent=True) + "\n")
  groups = {f"{d} {n}": {label: [100 * v for v in r[n].get(k, [])]
                         for k, label in ACCURACY_LABELS.items()}
            for d, r in everything["results"].items() for n in _ordered(r, order)
            if n != "teacher"}
  if groups:
    report.plot_bars(groups, out / "claims_crosstask.png", ylabel="accuracy (%)",
                     title=f"digits {STUDENT_CLASSES[0]}-{STUDENT_CLASSES[-1]}, teacher on "
                           f"{TEACHER_CLASSES[0]}-{TEACHER_CLASSES[-1]} (mean ± std over seeds)")
  markdown = (
      "# Cross-task transfer: a teacher of other classes distils a robust student\n\n"
      "Each dataset's section names the command that regenerates it (and its part of "
      "claims_crosstask.json and .png).\n\n"
      f"A PGD-AT teacher trained on digits {TEACHER_CLASSES[0]}-{TEACHER_CLASSES[-1]} of a "
      f"dataset; students on digits {STUDENT_CLASSES[0]}-{STUDENT_CLASSES[-1]} of the same "
      "dataset (`config.data.classes`, relabelled 0-4). GACD pulls the student's features on "
      "adversarial inputs toward the teacher's, which needs no teacher probability of the "
      "student's labels, so its sample reweighting is off ('none'); soft-label methods (ARD, "
      "RSLAD) cannot run here. The references train the same student with the same schedule "
      "and training attack: PGD-AT alone, and naturally (no attack). Accuracy (%) on the test "
      f"split of the student's digits, mean ± sample std over seeds; AutoAttack version "
      f"'{CROSSTASK_SUITE}' (APGD-CE + APGD-T), not 'standard', to keep the CPU budget.\n\n"
      + "\n".join(sections) + "\n![cross-task](claims_crosstask.png)\n")
  (out / "claims_crosstask.md").write_text(markdown)
  return markdown


# ---------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("kind", choices=KINDS)
  parser.add_argument("--workdir", required=True, help="where the claims' own runs and caches go")
  parser.add_argument("--study-workdir", default="runs/study",
                      help="structure, probe: the study's workdir (read only)")
  parser.add_argument("--out", default="experiments/results")
  parser.add_argument("--datasets", default="digits,mnist5k")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--names", default="", help="structure, probe: the study runs to measure "
                      "(default: the students and references); crosstask: its students")
  parser.add_argument("--max-examples", type=int, default=0,
                      help="structure, probe: the first N test examples (0: all)")
  parser.add_argument("--probe-steps", type=int, default=probe.ProbeSettings.steps)
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  argv = list(argv if argv is not None else sys.argv[1:])
  runtime.configure()

  datasets, seeds = study.datasets_and_seeds(parser, args.datasets, args.seeds)
  defaults = {"structure": STUDENTS + STRUCTURE_REFERENCES, "probe": STUDENTS + PROBE_REFERENCES,
              "crosstask": CROSSTASK_METHODS}[args.kind]
  names = args.names.split(",") if args.names else list(defaults)
  known = (CROSSTASK_METHODS if args.kind == "crosstask"
           else ("teacher", *methods.names()))
  for name in names:
    if name not in known:
      parser.error(f"unknown name {name!r} for {args.kind}; known: {', '.join(known)}")
  root, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
  study_root = pathlib.Path(args.study_workdir)
  out.mkdir(parents=True, exist_ok=True)

  if args.kind == "structure":
    results, skipped = run_structure(study_root, root, datasets, seeds, names, args.max_examples)
    markdown = write_structure(out, results, skipped, argv, study_root, seeds)
  elif args.kind == "probe":
    settings = probe.ProbeSettings(steps=args.probe_steps)
    results, skipped = run_probes(study_root, root, datasets, seeds, names, args.max_examples,
                                  settings, progress=not args.no_progress)
    markdown = write_probe(out, results, skipped, argv, study_root, seeds, settings)
  else:
    results, switches = run_crosstask(root, datasets, seeds, tuple(names),
                                      progress=not args.no_progress)
    markdown = write_crosstask(out, results, switches, argv)
  print(markdown)


if __name__ == "__main__":
  main()
