"""The study: dataset x method x seed, resumable, evaluated with AutoAttack; and GACD's ablation.

Every method of the grid trains the same student (small_cnn, width 8) with the same schedule and
attack budget (`gacd_jax.recipes.SMALL_DATA`), distilling from one PGD-AT teacher (width 32) per
dataset and seed. Runs already trained and evaluated in the workdir are reused, so an interrupted
study resumes where it stopped; a run whose config changed (e.g. a new GACD default) is trained
again.

  # every method, 3 seeds, AutoAttack (standard) on the test split: study.json/.md/.png
  python experiments/study.py grid --workdir runs/study --datasets digits,mnist5k
  # GACD's switches one at a time and combined, chosen on the validation split (AutoAttack fast)
  python experiments/study.py ablation --workdir runs/study --datasets digits

Results are merged into `--out` (default experiments/results): a second call for another dataset
adds to `study.json` / `gacd_ablation.json`, a call for some methods of a dataset replaces their
rows and keeps the others', and the tables and plots are rewritten from them; each dataset's
section names the commands that made its rows (kept in `study.commands.json` /
`gacd_ablation.commands.json`; `--tables-only` changes none). The json holds, per dataset and
row, a list over seeds of each of 'clean', 'pgd20', 'autoattack' and 'autoattack/<attack>' (the
accuracy left after that attack of AutoAttack's sequence), as fractions, and 'seeds' (which).
Runs go seed by seed (every method of seed 0, then of seed 1, ...), so an early stop leaves
complete comparisons; the tables are rewritten after every run. The teachers are trained first and
evaluated last (their AutoAttack is the slowest). `--shard K/N` runs every N-th run from the K-th
(the teachers by shard 0; the other shards wait for them), so N processes can share a machine.
"""

import argparse
import functools
import json
import pathlib
import shlex
import sys
import time
from typing import Any, NamedTuple, Optional

import numpy as np
from ml_collections import ConfigDict

from gacd_jax import checkpoints
from gacd_jax import config as config_lib
from gacd_jax import data
from gacd_jax import evaluate
from gacd_jax import methods
from gacd_jax import recipes
from gacd_jax import report
from gacd_jax import rundir
from gacd_jax import runtime
from gacd_jax import train
from gacd_jax.methods import gacd as gacd_lib

TEACHER_METHOD = "pgd_at"
# The methods of the grid: every built-in (KD and CRD distil on clean inputs only: the references
# for no robustness, with natural).
GRID_METHODS = ("natural", "kd", "crd", "pgd_at", "trades", "ard", "rslad", "iad", "adaad", "gacd",
                "crdnd")
METRICS = ("clean", "pgd20", "autoattack")
STAGE = "autoattack/"  # prefix of a result key: accuracy after that attack of AutoAttack's sequence

# GACD's ablation starts from the reconstruction as METHODS.md section 3 defines it (GACD's
# default before this study chose another), fixed so that the ablation does not move when
# DEFAULTS['gacd'] does. Each row changes config.method.gacd.* from it: one switch at a time,
# the paper's components removed, then combinations.
ABLATION_BASE = gacd_lib.RECONSTRUCTION
GACD_VARIANTS: dict[str, dict[str, Any]] = {
    "METHODS.md §3": {},
    # the guided attack's objective
    "attack=ce": {"attack_objective": "ce"},
    "attack=kl": {"attack_objective": "kl"},
    # anchor and estimator
    "anchor=adv": {"anchor": "adv"},
    "estimator=infonce": {"estimator": "infonce"},
    # reweighting
    "reweighting=none": {"reweighting": "none"},
    "reweighting=power(2)": {"reweighting": "power", "reweight_gamma": 2.0},
    "reweighting=correct": {"reweighting": "correct"},
    "reweighting=teacher_prob_adv": {"reweighting": "teacher_prob_adv"},
    # loss weights and temperature
    "contrastive_weight=2": {"contrastive_weight": 2.0},
    "temperature=0.2": {"temperature": 0.2},
    "+kl": {"kl_weight": 1.0},
    "+clean_ce": {"clean_ce_weight": 1.0},
    # the paper's components removed ('attack=ce' above is GACD without the guided attack,
    # 'reweighting=none' without reweighting)
    "no contrastive term": {"contrastive_weight": 0.0},
    "attack=ce, no contrastive (= PGD-AT)": {"attack_objective": "ce", "contrastive_weight": 0.0},
    # combinations: soft labels and the contrastive term with the two soft-label attacks
    "attack=ce +kl": {"attack_objective": "ce", "kl_weight": 1.0},
    "attack=ce, infonce": {"attack_objective": "ce", "estimator": "infonce"},
    "attack=ce +kl(T=30) -ce": {"attack_objective": "ce", "kl_weight": 1.0,
                                "kl_temperature": 30.0, "ce_weight": 0.0},
    "attack=kl +kl -ce": {"attack_objective": "kl", "kl_weight": 1.0, "ce_weight": 0.0},
    "attack=kl +kl -ce, no contrastive": {"attack_objective": "kl", "kl_weight": 1.0,
                                          "ce_weight": 0.0, "contrastive_weight": 0.0},
    "attack=kl +kl -ce, no reweighting": {"attack_objective": "kl", "kl_weight": 1.0,
                                          "ce_weight": 0.0, "reweighting": "none"},
    "attack=kl +kl -ce, infonce": {"attack_objective": "kl", "kl_weight": 1.0, "ce_weight": 0.0,
                                   "estimator": "infonce"},
    # the components of that combination (GACD's default) removed one at a time: its guided
    # (KL) attack, its reweighting ('no contrastive' above is the third)
    "attack=ce +kl -ce, infonce": {"attack_objective": "ce", "kl_weight": 1.0, "ce_weight": 0.0,
                                   "estimator": "infonce"},
    "attack=kl +kl -ce, infonce, no reweighting": {"attack_objective": "kl", "kl_weight": 1.0,
                                                   "ce_weight": 0.0, "estimator": "infonce",
                                                   "reweighting": "none"},
}


class Run(NamedTuple):
  dataset: str
  seed: int
  name: str           # 'teacher', a method name, or 'gacd/<variant>'
  config: ConfigDict
  workdir: pathlib.Path


def _variant_dir(variant: str) -> str:
  return "".join(c if c.isalnum() or c in "=.-" else "_" for c in variant)


def teacher_run(root: pathlib.Path, dataset: str, seed: int) -> Run:
  c = recipes.small_method_config(dataset, TEACHER_METHOD)
  c.seed = seed
  return Run(dataset, seed, "teacher", c, root / dataset / f"seed{seed}" / "teacher")


def student_run(root: pathlib.Path, dataset: str, seed: int, method: str,
                gacd_overrides: Optional[dict[str, Any]] = None, name: str = "") -> Run:
  """A student of the grid (a method on its own config, `gacd_overrides` None) or of the ablation
  (GACD with `gacd_overrides` on top of its config)."""
  teacher = teacher_run(root, dataset, seed)
  c = recipes.small_method_config(dataset, method)
  # The grid's students are all narrow, also those of the methods that train teachers.
  c.model.small_cnn.width = recipes.SMALL_DATA[dataset].student_width
  c.seed = seed
  if methods.build(c.method).uses_teacher:
    c.teacher.workdir = str(teacher.workdir)
  for key, value in (gacd_overrides or {}).items():
    c.method.gacd[key] = value
  seed_dir = root / dataset / f"seed{seed}"
  if gacd_overrides is None:
    return Run(dataset, seed, method, c, seed_dir / method)
  return Run(dataset, seed, name, c, seed_dir / "gacd_ablation" / _variant_dir(name))


def _complete(run: Run) -> bool:
  info_path = run.workdir / checkpoints.RUN_FILE
  if not info_path.exists():
    return False
  info = json.loads(info_path.read_text())
  return checkpoints.latest_step(run.workdir) == info["steps_per_epoch"] * run.config.train.epochs


def _split_size(config: ConfigDict) -> int:
  """The examples of the split `config` evaluates on."""
  return _cached_split_size(config.data.to_json(), config.eval.split, config.seed)


@functools.cache
def _cached_split_size(data_json: str, split: str, seed: int) -> int:
  return data.from_config(ConfigDict(json.loads(data_json)), split, seed=seed).num_examples


def _stored_result(run: Run) -> Optional[dict]:
  """The evaluation already in the run's workdir, if the run was trained with the run's config (as
  far as a resumed run must keep it, `rundir.config_differences`) and evaluated with its eval
  settings; else None, and `train_and_evaluate` trains it again."""
  path = run.workdir / evaluate.results_file(run.config.eval.split)
  if not path.exists() or not _complete(run):
    return None
  trained_with = checkpoints.read_json(run.workdir / checkpoints.CONFIG_FILE)
  if rundir.config_differences(trained_with, json.loads(config_lib.to_json(run.config))):
    return None
  stored = json.loads(path.read_text())
  size = _split_size(run.config)
  examples = min(run.config.eval.max_examples or size, size)
  if stored.get("suite") != run.config.eval.suite or stored.get("examples") != examples:
    return None
  return stored


def train_and_evaluate(run: Run, *, progress: bool) -> dict:
  """Train the run (or resume it, or reuse it) and evaluate it; the stored eval json."""
  stored = _stored_result(run)
  if stored is not None:
    return stored
  tic = time.perf_counter()
  train.train(run.config, str(run.workdir), overwrite=True, progress=progress)
  trained = time.perf_counter()
  evaluate.evaluate_run(run.config, str(run.workdir), progress=progress)
  stored = json.loads((run.workdir / evaluate.results_file(run.config.eval.split)).read_text())
  stored["train_seconds"] = trained - tic
  stored["eval_seconds"] = time.perf_counter() - trained
  checkpoints.write_json(run.workdir / evaluate.results_file(run.config.eval.split), stored)
  return stored


def _wait_for(run: Run, poll_seconds: float = 20.0) -> None:
  """Block until another shard has trained and evaluated `run`."""
  while _stored_result(run) is None:
    time.sleep(poll_seconds)


def _wait_for_training(run: Run, poll_seconds: float = 20.0) -> None:
  """Block until shard 0 has trained `run` (a teacher)."""
  while not _complete(run):
    time.sleep(poll_seconds)


# ---------------------------------------------------------------------------------------------
# Tables and plots.


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; 0 for one value)."""
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_cell(values: list[float], percent: bool = True) -> str:
  """'mean ± std' of `values`, the value alone for one, '-' for none: accuracies in [0, 1] as
  percent to one decimal, or (`percent=False`) the values themselves to three."""
  if not values:
    return "-"
  mean, std = mean_std([100 * v for v in values] if percent else values)
  digits = 1 if percent else 3
  return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def in_order(results: dict[str, Any]) -> dict[str, Any]:
  """`results` with the teacher first, then the methods and variants in the order defined here."""
  order = ["teacher", *GRID_METHODS, *GACD_VARIANTS]
  return dict(sorted(results.items(),
                     key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def results_table(results: dict[str, dict[str, list[float]]],
                  metrics: tuple[str, ...] = METRICS) -> str:
  labels = {"clean": "clean", "pgd20": "PGD-20", "autoattack": "AutoAttack"}
  results = in_order(results)
  rows = [{"": name, **{labels[m]: format_cell(r.get(m, [])) for m in metrics},
           "seeds": str(len(r.get("clean", [])))} for name, r in results.items()]
  return report.markdown_table(rows)


def stages_table(results: dict[str, dict[str, list[float]]]) -> str:
  """Robust accuracy after each attack of AutoAttack's sequence (each attacks what the ones before
  left standing, so the last column is the AutoAttack accuracy), beside PGD-20: which attack
  finds what PGD-20 misses. '' when no row has them."""
  stages = list(dict.fromkeys(k for r in results.values() for k in r if k.startswith(STAGE)))
  if not stages:
    return ""
  rows = [{"": name, "PGD-20": format_cell(r.get("pgd20", [])),
           **{f"after {k[len(STAGE):]}": format_cell(r.get(k, [])) for k in stages}}
          for name, r in in_order(results).items() if any(k in r for k in stages)]
  return report.markdown_table(rows)


def paired_table(results: dict[str, dict[str, list]], reference: str) -> str:
  """Each row minus `reference`, seed by seed (the same seed trains from the same teacher and
  data order, so their difference is free of the teacher-to-teacher spread): mean ± sample std
  of the differences in points, over the seeds both have. '' when `reference` has no seeds."""
  if not results.get(reference, {}).get("seeds"):
    return ""
  ref = results[reference]
  rows = []
  for name, r in in_order(results).items():
    if name in ("teacher", reference) or not r.get("seeds"):
      continue
    both = [s for s in r["seeds"] if s in ref["seeds"]]
    if not both:
      continue
    row = {"": name}
    for metric, label in (("clean", "clean"), ("autoattack", "AutoAttack")):
      diff = [100 * (r[metric][r["seeds"].index(s)] - ref[metric][ref["seeds"].index(s)])
              for s in both]
      mean, std = mean_std(diff)
      row[f"{label} − reference"] = (f"{mean:+.1f} ± {std:.1f}" if len(diff) > 1
                                       else f"{mean:+.1f}")
    rows.append({**row, "seeds": str(len(both))})
  return report.markdown_table(rows) if rows else ""


def variant_switches(name: str) -> dict[str, Any]:
  """GACD's switches in the ablation's variant `name`: METHODS.md section 3 with its changes."""
  return {**ABLATION_BASE, **GACD_VARIANTS[name]}


def selected_variant(results: dict[str, dict[str, list[float]]]) -> str:
  """The variant with the highest mean AutoAttack accuracy among those that keep a contrastive
  term (without one it is not GACD)."""
  candidates = {name: np.mean(r["autoattack"]) for name, r in results.items()
                if name in GACD_VARIANTS and r.get("autoattack")
                and variant_switches(name)["contrastive_weight"] > 0}
  return max(candidates, key=candidates.get)


def default_variant() -> Optional[str]:
  """The variant whose switches are the shipped `DEFAULTS['gacd']` (None if none is)."""
  default = gacd_lib.DEFAULTS["gacd"]
  for name in GACD_VARIANTS:
    if all(default[k] == v for k, v in variant_switches(name).items()):
      return name
  return None


def selection_note(results: dict[str, dict[str, list[float]]]) -> str:
  best, default = selected_variant(results), default_variant()
  switches = ", ".join(f"{k}={v!r}" for k, v in GACD_VARIANTS[best].items())
  shipped = ("the same" if best == default else
             f"**{default}**" if default else "none of these")
  return (f"Highest mean AutoAttack accuracy among the variants here that keep a contrastive "
          f"term: **{best}** ({switches} on top of METHODS.md §3); the shipped default "
          f"(`DEFAULTS['gacd']`): {shipped}. Rows without the contrastive term are the component "
          "ablation, not candidates.")


def target_check(results: dict[str, dict[str, list[float]]]) -> str:
  """Issue #10's target, checked: GACD's mean AutoAttack accuracy at least that of the better of
  ARD and RSLAD (a shortfall within one standard error of the difference of means counts as met,
  and says so), with clean accuracy at most 2 points below that method's."""
  if not all(results.get(m, {}).get("autoattack") for m in ("gacd", "ard", "rslad")):
    return "Target (GACD vs ARD and RSLAD): not all three have results yet."

  def stats(method, metric):
    values = 100 * np.asarray(results[method][metric], float)
    return values.mean(), (values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0)

  best = max(("ard", "rslad"), key=lambda m: stats(m, "autoattack")[0])
  (gacd, gacd_se), (base, base_se) = stats("gacd", "autoattack"), stats(best, "autoattack")
  gap, se = base - gacd, float(np.hypot(gacd_se, base_se))
  clean_gap = stats(best, "clean")[0] - stats("gacd", "clean")[0]
  robust = ("met" if gap <= 0 else f"met within one standard error ({gap:.1f} < {se:.1f})"
            if gap <= se else f"**not met** ({gap:.1f} points below, standard error {se:.1f})")
  clean = ("met" if clean_gap <= 2 else f"**not met** ({clean_gap:.1f} points below)")
  clean_relation = (f"{clean_gap:.1f} points below" if clean_gap > 0 else
               f"{-clean_gap:.1f} points above")
  return (f"Target: GACD's AutoAttack accuracy {gacd:.1f} vs {best.upper()} {base:.1f} (the better "
          f"of ARD and RSLAD): {robust}; clean accuracy at most 2 points below "
          f"{best.upper()}'s (GACD's is {clean_relation}): {clean}.")


def merge(everything: dict, commands: dict, dataset: str, results: dict, entry: dict,
          ran: bool = True) -> None:
  """Merge one call's rows of `dataset` into `everything` (`{dataset: {row: metrics}}`, the
  results json) and `commands` (`{dataset: [entry]}`, the commands json), in place. `entry` is
  the call's command, split, suite and the rows it planned (`rows`): those rows are replaced
  (dropped if not evaluated yet), an earlier call's other rows stay with their command, so a
  method re-run after a change of its config updates its rows alone. Rows made with another split
  or suite go (they are not one table). A call that only rewrote the tables (`ran` False) keeps
  the recorded commands."""
  previous = command_entries(commands, everything, dataset)
  if any((e["split"], e["suite"]) != (entry["split"], entry["suite"]) for e in previous):
    previous, everything[dataset] = [], {}
  rows = set(entry["rows"])
  kept = {name: r for name, r in everything.get(dataset, {}).items() if name not in rows}
  everything[dataset] = {**kept, **results}
  if ran or not previous:
    previous = [{**e, "rows": [r for r in e["rows"] if r not in rows]} for e in previous]
    previous = [e for e in previous if e["rows"]] + [entry]
  commands[dataset] = previous


def command_entries(commands: dict, everything: dict, dataset: str) -> list[dict]:
  """The entries of `dataset` in `commands`; a file written when one command made every row of a
  dataset holds a single entry without `rows`: it made all of them."""
  entries = commands.get(dataset, [])
  if isinstance(entries, dict):
    return [{**entries, "rows": sorted(everything.get(dataset, {}))}]
  return entries


def commands_line(entries: list[dict]) -> str:
  """How a dataset's section names the command(s) that made its rows."""
  if len(entries) == 1:
    return f"Command (resumable; regenerates these rows): `{entries[0]['command']}`"
  return ("Commands (resumable; each regenerates the rows it names):\n\n" + "\n".join(
      f"- `{e['command']}`: {', '.join(in_order(dict.fromkeys(e['rows'])))}" for e in entries))


def collect(runs: list[Run], stored: dict[pathlib.Path, dict]) -> dict[str, dict[str, list[float]]]:
  """`{run name: {metric: [per seed, in seed order], 'seeds': [those seeds]}}` of the runs
  evaluated so far."""
  out: dict[str, dict[str, list[float]]] = {}
  for run in sorted((r for r in runs if r.workdir in stored), key=lambda r: r.seed):
    accuracy = stored[run.workdir]["accuracy"]
    entry = out.setdefault(run.name, {m: [] for m in METRICS} | {"seeds": []})
    entry["seeds"].append(run.seed)
    for m in METRICS:
      if m in accuracy:
        entry[m].append(accuracy[m])
    after = stored[run.workdir].get("autoattack", {}).get("accuracy_after", {})
    for attack, value in after.items():
      entry.setdefault(STAGE + attack, []).append(value)
  return out


# ---------------------------------------------------------------------------------------------


def plan(kind: str, root: pathlib.Path, datasets: list[str], seeds: list[int],
         names: list[str], split: str, suite: str) -> tuple[list[Run], list[Run]]:
  """(teachers, students) of a grid or an ablation, with their evaluation settings."""
  teachers = [teacher_run(root, d, s) for d in datasets for s in seeds]
  if kind == "grid":
    students = [student_run(root, d, s, m) for d in datasets for s in seeds for m in names]
  else:
    students = [student_run(root, d, s, "gacd", variant_switches(v), name=v)
                for d in datasets for s in seeds for v in names]
  for run in teachers + students:
    run.config.eval.split = split
    run.config.eval.suite = suite
  return teachers, students


def datasets_and_seeds(parser: argparse.ArgumentParser, datasets: str,
                       seeds: str) -> tuple[list[str], list[int]]:
  """The comma-separated `--datasets` (bundled ones only) and `--seeds`; a usage error else."""
  names = datasets.split(",")
  for name in names:
    if name not in recipes.SMALL_DATA:
      parser.error(f"unknown dataset {name!r}; use {', '.join(recipes.SMALL_DATA)}")
  try:
    return names, [int(s) for s in seeds.split(",")]
  except ValueError:
    parser.error(f"--seeds={seeds!r} is not a comma-separated list of integers")


def rerun_command(argv: list[str]) -> list[str]:
  """`argv` as a user reruns the whole study: without how this process took part in it
  (`--shard K/N`, `--tables-only`)."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == "--shard":
      skip = True
    elif not (arg.startswith("--shard=") or arg == "--tables-only"):
      out.append(arg)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("kind", choices=("grid", "ablation"))
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default="experiments/results")
  parser.add_argument("--datasets", default="digits,mnist5k")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--names", default="",
                      help="grid: methods, comma-separated (default GRID_METHODS); ablation: "
                      "variants, separated by ';' as their names hold commas (default all)")
  parser.add_argument("--split", default="", help="default: test for grid, validation for ablation")
  parser.add_argument("--suite", default="", help="AutoAttack version; default: standard for "
                      "grid, fast for ablation")
  parser.add_argument("--shard", default="0/1", help="K/N: this process runs every N-th run")
  parser.add_argument("--tables-only", action="store_true",
                      help="rewrite the tables and plots from the runs finished so far, and stop")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  runtime.configure()

  datasets, seeds = datasets_and_seeds(parser, args.datasets, args.seeds)
  default_names = GRID_METHODS if args.kind == "grid" else tuple(GACD_VARIANTS)
  separator = "," if args.kind == "grid" else ";"
  names = args.names.split(separator) if args.names else list(default_names)
  known = methods.names() if args.kind == "grid" else list(GACD_VARIANTS)
  for name in names:
    if name not in known:
      parser.error(f"unknown {'method' if args.kind == 'grid' else 'variant'} {name!r}; known: "
                   f"{', '.join(known)}")
  split = args.split or ("test" if args.kind == "grid" else "validation")
  suite = args.suite or ("standard" if args.kind == "grid" else "fast")
  shard, num_shards = (int(v) for v in args.shard.split("/"))
  progress = not args.no_progress

  root = pathlib.Path(args.workdir)
  teachers, students = plan(args.kind, root, datasets, seeds, names, split, suite)
  stored: dict[pathlib.Path, dict] = {}
  command = rerun_command(argv if argv is not None else sys.argv[1:])

  def report(final: bool) -> None:
    if shard == 0:
      for run in teachers + students:  # also what the other shards finished
        if run.workdir not in stored and (result := _stored_result(run)) is not None:
          stored[run.workdir] = result
      write_results(args.kind, pathlib.Path(args.out), datasets, teachers, students, stored,
                    split, suite, command, echo=final, ran=not args.tables_only)

  if args.tables_only:
    report(final=True)
    return

  # The teachers are trained first (every student needs one) and evaluated last: the widest
  # model's AutoAttack is the slowest run, and no student waits for it.
  for run in teachers:
    if shard == 0:
      if _stored_result(run) is None:
        train.train(run.config, str(run.workdir), progress=progress)
    else:
      _wait_for_training(run)
  for i, run in enumerate(students):
    if i % num_shards != shard:
      continue
    stored[run.workdir] = train_and_evaluate(run, progress=progress)
    acc = stored[run.workdir]["accuracy"]
    print(f"[{run.dataset} seed {run.seed}] {run.name}: "
          + ", ".join(f"{k} {100 * v:.1f}" for k, v in acc.items())
          + f" (train {stored[run.workdir].get('train_seconds', 0) / 60:.1f} min, evaluate "
          f"{stored[run.workdir].get('eval_seconds', 0) / 60:.1f} min)", flush=True)
    report(final=False)
  if shard == 0:
    for run in teachers:
      stored[run.workdir] = train_and_evaluate(run, progress=progress)
      report(final=False)
  if num_shards > 1:
    for run in teachers + students:
      if run.workdir not in stored:
        _wait_for(run)
        stored[run.workdir] = _stored_result(run)
  report(final=True)


def write_results(kind: str, out: pathlib.Path, datasets: list[str], teachers: list[Run],
                  students: list[Run], stored: dict[pathlib.Path, dict], split: str, suite: str,
                  argv: list[str], echo: bool = True, ran: bool = True) -> None:
  """Merge the runs evaluated so far into `out`'s json and rewrite its markdown and plots. Each
  dataset's section names the commands that made its rows (`merge`)."""
  out.mkdir(parents=True, exist_ok=True)
  stem = "study" if kind == "grid" else "gacd_ablation"
  results_path, commands_path = out / f"{stem}.json", out / f"{stem}.commands.json"
  everything = json.loads(results_path.read_text()) if results_path.exists() else {}
  commands = json.loads(commands_path.read_text()) if commands_path.exists() else {}
  for dataset in datasets:
    runs = [r for r in teachers + students if r.dataset == dataset]
    entry = {"command": "python experiments/study.py " + shlex.join(argv), "split": split,
             "suite": suite, "rows": list(dict.fromkeys(r.name for r in runs))}
    merge(everything, commands, dataset, collect(runs, stored), entry, ran)
  checkpoints.write_json(results_path, everything)
  checkpoints.write_json(commands_path, commands)
  sections = []
  for dataset, results in everything.items():
    d = recipes.SMALL_DATA[dataset]
    entries = command_entries(commands, everything, dataset) or [
        {"command": "(not recorded)", "split": split, "suite": suite, "rows": list(results)}]
    made = entries[0]
    source = data.build(dataset, made["split"])
    sections.append(
        f"## {dataset}\n\n{commands_line(entries)}\n\n"
        f"{source.num_examples} {made['split']} images, Linf eps {d.eps}; AutoAttack version "
        f"`{made['suite']}`; students small_cnn width {d.student_width}, teacher width "
        f"{d.teacher_width}; {d.epochs} epochs. Accuracy (%), mean ± std over seeds (sample std; "
        f"a single value is one seed).\n\n{results_table(results)}\n")
    if stages := stages_table(results):
      sections.append("Robust accuracy (%) after each attack of AutoAttack's sequence (each "
                      "attacks only the images the attacks before it left robust; the last "
                      f"column is the AutoAttack accuracy), beside PGD-20:\n\n{stages}\n")
    reference = default_variant() or ""
    if kind == "ablation" and (paired := paired_table(results, reference)):
      sections.append(f"Each variant minus the reference, the shipped default "
                      f"(**{reference}**), seed by seed (same teacher and data order), "
                      "mean ± std of the differences in points:\n\n"
                      f"{paired}\n")
    sections.append((selection_note(results) if kind == "ablation" else target_check(results))
                    + "\n")
    report.plot_bars({name: {m: [100 * v for v in r.get(m, [])] for m in METRICS}
                      for name, r in in_order(results).items()},
                     out / f"{stem}_{dataset}.png",
                     title=f"{dataset}: {'every method' if kind == 'grid' else 'GACD ablation'} "
                           f"({made['split']} split, mean ± std over seeds)",
                     ylabel="accuracy (%)")
  title = ("# Every method, same student and budget, several seeds" if kind == "grid" else
           "# GACD's switches, chosen on the validation split")
  (out / f"{stem}.md").write_text(
      f"{title}\n\nEach dataset's section names the command that regenerates its rows (and "
      f"{stem}.json, {stem}.commands.json and the PNGs). PGD-20 with a random start, step eps/8. "
      "Every student is a small_cnn of the same width, trained with the same schedule and "
      "training attack (10 steps of eps/4); distillation methods learn from the PGD-AT teacher "
      "of the same seed (row 'teacher').\n\n" + "\n".join(sections))
  if echo:
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
  main()
