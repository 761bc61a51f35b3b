"""The study runner's plan and its tables (the runs themselves are what `experiments/study.py`
does for hours; here only what decides which runs exist and how their numbers are reported)."""

import json
import pathlib

import numpy as np
import pytest

from experiments import study
from gacd_jax import checkpoints
from gacd_jax import config as config_lib
from gacd_jax import recipes
from gacd_jax.methods import gacd as gacd_lib


def test_the_grid_shares_one_teacher_per_dataset_and_seed_and_one_student_width(tmp_path):
  teachers, students = study.plan("grid", tmp_path, ["digits", "mnist5k"], [0, 1],
                                  ["pgd_at", "ard", "gacd"], "test", "standard")
  assert len(teachers) == 4 and len(students) == 12
  for run in students:
    config_lib.validate(run.config)
    assert run.config.model.small_cnn.width == recipes.SMALL_DATA[run.dataset].student_width
    assert (run.config.eval.split, run.config.eval.suite) == ("test", "standard")
    assert run.config.seed == run.seed
    if run.name != "pgd_at":
      assert run.config.teacher.workdir == str(tmp_path / run.dataset / f"seed{run.seed}" /
                                               "teacher")
  # every (dataset, seed, method) once, each in its own directory
  assert len({r.workdir for r in teachers + students}) == 16
  # seed by seed: an early stop leaves every method of the first seeds
  assert [(r.seed, r.name) for r in students[:4]] == [
      (0, "pgd_at"), (0, "ard"), (0, "gacd"), (1, "pgd_at")]


def test_the_ablation_changes_only_gacd_switches_from_a_fixed_base(tmp_path, monkeypatch):
  _, ablation = study.plan("ablation", tmp_path, ["digits"], [0], list(study.GACD_VARIANTS),
                           "validation", "fast")
  base_run = next(r for r in ablation if r.name == "METHODS.md §3")
  base = json.loads(config_lib.to_json(base_run.config))
  assert {k: base["method"]["gacd"][k] for k in study.ABLATION_BASE} == study.ABLATION_BASE
  assert len({r.workdir for r in ablation}) == len(ablation)
  for run in ablation:
    changed = json.loads(config_lib.to_json(run.config))
    assert {k: v for k, v in changed.items() if k != "method"} == {
        k: v for k, v in base.items() if k != "method"}
    overrides = study.GACD_VARIANTS[run.name]
    assert {k for k in changed["method"]["gacd"]
            if changed["method"]["gacd"][k] != base["method"]["gacd"][k]} == {
                k for k, v in overrides.items() if base["method"]["gacd"][k] != v}
  # The ablation does not move when GACD's defaults do.
  monkeypatch.setitem(gacd_lib.DEFAULTS["gacd"], "attack_objective", "kl")
  _, again = study.plan("ablation", tmp_path, ["digits"], [0], ["METHODS.md §3"], "validation",
                        "fast")
  assert again[0].config.method.gacd.attack_objective == "contrastive"


def test_a_finished_run_is_reused_only_with_the_config_it_was_trained_with(tmp_path,
                                                                          monkeypatch):
  _, (run,) = study.plan("grid", tmp_path, ["digits"], [0], ["ard"], "test", "fast")
  monkeypatch.setattr(study, "_complete", lambda run: True)  # every step trained
  run.workdir.mkdir(parents=True)
  checkpoints.write_json(run.workdir / checkpoints.CONFIG_FILE,
                         json.loads(config_lib.to_json(run.config)))
  examples = study._split_size(run.config)
  checkpoints.write_json(run.workdir / "eval.json", {"suite": "fast", "examples": examples})
  assert study._stored_result(run) == {"suite": "fast", "examples": examples}
  run.config.eval.suite = "standard"  # evaluated with another suite
  assert study._stored_result(run) is None
  run.config.eval.suite = "fast"
  run.config.method.ard.temperature = 5.0  # a default changed since: train it again
  assert study._stored_result(run) is None


def test_tables_report_the_mean_and_sample_std_over_seeds(tmp_path):
  stored, runs = {}, []
  values = {"ard": [0.5, 0.6, 0.7], "gacd": [0.4, 0.45, 0.5]}
  for name, accs in values.items():
    for seed, acc in enumerate(accs):
      run = study.Run("digits", seed, name, None, tmp_path / f"{name}{seed}")
      runs.append(run)
      stored[run.workdir] = {"accuracy": {"clean": 0.9, "pgd20": acc + 0.05, "autoattack": acc}}
  unfinished = study.Run("digits", 0, "rslad", None, tmp_path / "rslad0")  # not evaluated yet
  results = study.collect(runs[::-1] + [unfinished], stored)  # seed order is restored
  assert results["ard"]["autoattack"] == [0.5, 0.6, 0.7] and "rslad" not in results
  assert results["ard"]["seeds"] == [0, 1, 2]
  mean, std = study.mean_std([100 * v for v in values["gacd"]])
  assert mean == pytest.approx(45.0) and std == pytest.approx(np.std([40, 45, 50], ddof=1))
  table = study.results_table(results)
  assert "| ard " in table and "60.0 ± 10.0" in table and "45.0 ± 5.0" in table
  assert study.format_cell([]) == "-"
  assert study.format_cell([0.5]) == "50.0"  # one seed: no std to show
  assert study.format_cell([0.5, 0.7], percent=False) == "0.600 ± 0.141"  # sample std


def test_the_selection_takes_the_best_mean_among_variants_with_a_contrastive_term():
  results = {
      "teacher": {"autoattack": [0.9, 0.9]},
      "attack=ce, no contrastive (= PGD-AT)": {"autoattack": [0.8, 0.8]},  # not GACD
      "attack=ce": {"autoattack": [0.5, 0.7]},
      "attack=ce, infonce": {"autoattack": [0.62, 0.62]},
  }
  assert study.selected_variant(results) == "attack=ce, infonce"
  note = study.selection_note(results)
  assert "**attack=ce, infonce** (attack_objective='ce', estimator='infonce'" in note
  assert "the shipped default (`DEFAULTS['gacd']`): **attack=kl +kl -ce, infonce**" in note
  results["attack=kl +kl -ce, infonce"] = {"autoattack": [0.7, 0.7]}
  assert "the shipped default (`DEFAULTS['gacd']`): the same" in study.selection_note(results)


def test_the_paired_table_subtracts_the_reference_seed_by_seed():
  results = {
      "teacher": {"seeds": [0, 1, 2], "clean": [0.9] * 3, "autoattack": [0.6] * 3},
      "ref": {"seeds": [0, 1, 2], "clean": [0.80, 0.70, 0.90], "autoattack": [0.30, 0.20, 0.40]},
      # seed 2 missing, seed 3 not in the reference: only seeds 0 and 1 pair up
      "a": {"seeds": [0, 1, 3], "clean": [0.85, 0.70, 0.10], "autoattack": [0.35, 0.30, 0.0]},
      "b": {"seeds": [2], "clean": [0.80], "autoattack": [0.30]},
      "old": {"clean": [0.5], "autoattack": [0.1]},  # stored before seeds were: left out
  }
  table = study.paired_table(results, "ref")
  rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
  assert set(rows) == {"a", "b"}  # not the teacher, the reference or a row without seeds
  clean_a = np.array([85.0, 70.0]) - np.array([80.0, 70.0])
  aa_a = np.array([35.0, 30.0]) - np.array([30.0, 20.0])
  assert f"{clean_a.mean():+.1f} ± {clean_a.std(ddof=1):.1f}" in rows["a"]
  assert f"{aa_a.mean():+.1f} ± {aa_a.std(ddof=1):.1f}" in rows["a"]
  assert "-10.0 " in rows["b"] and "| 1 " in rows["b"]  # one pair: the difference alone
  assert study.paired_table(results, "old") == "" and study.paired_table(results, "x") == ""


def test_the_default_variant_is_the_shipped_gacd_default():
  name = study.default_variant()
  config = {**study.ABLATION_BASE, **study.GACD_VARIANTS[name]}
  assert all(study.gacd_lib.DEFAULTS["gacd"][k] == v for k, v in config.items())
  # Exactly one variant is the default.
  others = [v for v in study.GACD_VARIANTS if v != name
            and all(study.gacd_lib.DEFAULTS["gacd"][k] == value
                    for k, value in {**study.ABLATION_BASE, **study.GACD_VARIANTS[v]}.items())]
  assert not others


def test_the_target_check_compares_gacd_with_the_better_of_ard_and_rslad():
  def entry(aa, clean):
    return {"autoattack": aa, "clean": clean}
  results = {"ard": entry([0.40, 0.44], [0.95, 0.95]), "rslad": entry([0.42, 0.46], [0.90, 0.90]),
             "gacd": entry([0.45, 0.45], [0.89, 0.89])}
  assert "vs RSLAD 44.0" in study.target_check(results)
  assert study.target_check(results).count(": met") == 2
  # 1 point below RSLAD with a standard error of the difference of 2: met within one SE.
  results["gacd"] = entry([0.43, 0.43], [0.89, 0.89])
  assert "met within one standard error (1.0 < 2.0)" in study.target_check(results)
  # 3 points below: not met; 4 points less clean than RSLAD: not met either.
  results["gacd"] = entry([0.41, 0.41], [0.86, 0.86])
  check = study.target_check(results)
  assert "**not met** (3.0 points below" in check and "**not met** (4.0 points below)" in check
  assert "not all three" in study.target_check({"gacd": entry([0.5], [0.9])})


def test_teachers_train_first_and_evaluate_last_and_tables_follow_every_run(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(study, "_stored_result", lambda run: None)
  monkeypatch.setattr(study.train, "train", lambda config, workdir, **_: calls.append(
      ("train", pathlib.Path(workdir).name)))

  def evaluated(run, progress):
    calls.append(("evaluate", run.name))
    return {"accuracy": {"clean": 0.9, "pgd20": 0.5, "autoattack": 0.4}}
  monkeypatch.setattr(study, "train_and_evaluate", evaluated)
  monkeypatch.setattr(study, "write_results", lambda *args, echo, ran: calls.append(
      ("write", len(args[5]), echo)))
  study.main(["grid", "--workdir", str(tmp_path), "--datasets", "digits", "--seeds", "0,1",
              "--names", "ard,gacd", "--no-progress"])
  assert calls == [("train", "teacher"), ("train", "teacher"),
                   ("evaluate", "ard"), ("write", 1, False), ("evaluate", "gacd"),
                   ("write", 2, False), ("evaluate", "ard"), ("write", 3, False),
                   ("evaluate", "gacd"), ("write", 4, False),
                   ("evaluate", "teacher"), ("write", 5, False), ("evaluate", "teacher"),
                   ("write", 6, False), ("write", 6, True)]


def test_tables_only_reports_every_finished_run_and_a_command_without_the_shard(tmp_path,
                                                                                monkeypatch):
  calls = []
  finished = {"ard": {"accuracy": {"clean": 0.9, "pgd20": 0.5, "autoattack": 0.4}}}
  monkeypatch.setattr(study, "_stored_result", lambda run: finished.get(run.name))
  monkeypatch.setattr(study.train, "train", lambda *_, **__: calls.append("train"))
  monkeypatch.setattr(study, "train_and_evaluate", lambda *_, **__: calls.append("evaluate"))
  monkeypatch.setattr(study, "write_results", lambda *args, echo, ran: calls.append(
      ("write", sorted(p.name for p in args[5]), args[8], echo, ran)))
  study.main(["grid", "--workdir", str(tmp_path), "--datasets", "digits", "--seeds", "0,1",
              "--names", "ard,gacd", "--shard", "0/2", "--tables-only", "--no-progress"])
  # Both seeds' ARD (run by any shard) are in the tables; nothing is trained or evaluated.
  assert calls == [("write", ["ard", "ard"], ["grid", "--workdir", str(tmp_path), "--datasets",
                                             "digits", "--seeds", "0,1", "--names", "ard,gacd",
                                             "--no-progress"], True, False)]
  assert study.rerun_command(["grid", "--shard=1/2", "--seeds", "0"]) == ["grid", "--seeds", "0"]


def test_each_dataset_section_names_the_command_that_made_its_rows(tmp_path):
  def write(dataset, argv, ran=True):
    run = study.Run(dataset, 0, "ard", None, tmp_path / dataset / "ard")
    stored = {run.workdir: {"accuracy": {"clean": 0.9, "pgd20": 0.5, "autoattack": 0.4}}}
    study.write_results("grid", tmp_path / "out", [dataset], [], [run], stored, "test",
                        "standard", argv, echo=False, ran=ran)
    return (tmp_path / "out" / "study.md").read_text()

  write("digits", ["grid", "--datasets", "digits", "--names", "a;b c"])
  # A commands file from before rows were recorded (one command per dataset) still reads.
  path = tmp_path / "out" / "study.commands.json"
  path.write_text(json.dumps({"digits": {k: v for k, v in json.loads(path.read_text())[
      "digits"][0].items() if k != "rows"}}))
  write("mnist5k", ["grid", "--datasets", "mnist5k"])
  markdown = write("digits", ["grid", "--datasets", "digits,mnist5k", "--names", "x"], ran=False)
  digits, mnist5k = markdown.split("## digits")[1].split("## mnist5k")
  # Quoted as a shell needs it; a call that only rewrote the tables changes no command.
  assert "`python experiments/study.py grid --datasets digits --names 'a;b c'`" in digits
  assert "`python experiments/study.py grid --datasets mnist5k`" in mnist5k
  assert "--names x" not in markdown and "| 50.0 " in markdown
  write("digits", ["grid", "--datasets", "digits", "--seeds", "0"])  # a run replaces it
  assert json.loads((tmp_path / "out" / "study.commands.json").read_text())["digits"] == [{
      "command": "python experiments/study.py grid --datasets digits --seeds 0",
      "split": "test", "suite": "standard", "rows": ["ard"]}]


def test_a_call_for_some_rows_replaces_them_and_keeps_the_others_with_their_command():
  def entry(command, rows, suite="standard"):
    return {"command": command, "split": "test", "suite": suite, "rows": rows}
  row = {"clean": [0.9]}
  # A file from before rows were recorded: one command made every row.
  everything = {"digits": {"teacher": row, "ard": row, "rslad": row},
                "mnist5k": {"ard": {"clean": [0.1]}}}
  commands = {"digits": {"command": "all", "split": "test", "suite": "standard"}}
  # 'rslad' re-run: its new result and the teacher's replace theirs; ARD's row and command stay.
  new = {"teacher": {"clean": [0.8]}, "rslad": {"clean": [0.5]}}
  study.merge(everything, commands, "digits", new, entry("some", ["teacher", "rslad"]))
  assert everything["digits"] == {"ard": row, **new} and everything["mnist5k"]["ard"]
  assert commands["digits"] == [entry("all", ["ard"]), entry("some", ["teacher", "rslad"])]
  assert "- `some`: teacher, rslad" in study.commands_line(commands["digits"])
  # A planned row not evaluated yet is dropped, not left with another command's number.
  study.merge(everything, commands, "digits", {}, entry("again", ["ard"]))
  assert "ard" not in everything["digits"] and [e["command"] for e in commands["digits"]] == [
      "some", "again"]
  # Another AutoAttack version is another table: every earlier row goes.
  study.merge(everything, commands, "digits", {"kd": row}, entry("fast", ["kd"], "fast"))
  assert everything["digits"] == {"kd": row} and commands["digits"] == [entry("fast", ["kd"],
                                                                              "fast")]
  # A call that only rewrote the tables keeps the recorded command.
  study.merge(everything, commands, "digits", {"kd": row}, entry("t", ["kd"], "fast"), ran=False)
  assert commands["digits"] == [entry("fast", ["kd"], "fast")]


def test_the_stages_of_autoattack_are_kept_per_seed_and_tabled_beside_pgd20(tmp_path):
  stored, runs = {}, []
  for seed, (apgd, square) in enumerate([(0.30, 0.20), (0.40, 0.30)]):
    run = study.Run("mnist5k", seed, "trades", None, tmp_path / f"trades{seed}")
    runs.append(run)
    stored[run.workdir] = {
        "accuracy": {"clean": 0.8, "pgd20": 0.5, "autoattack": square},
        "autoattack": {"accuracy_after": {"apgd-ce": apgd, "square": square}}}
  old = study.Run("mnist5k", 0, "ard", None, tmp_path / "ard0")  # an eval without the stages
  runs.append(old)
  stored[old.workdir] = {"accuracy": {"clean": 0.9, "pgd20": 0.4, "autoattack": 0.3}}
  results = study.collect(runs, stored)
  assert results["trades"]["autoattack/apgd-ce"] == [0.30, 0.40]
  assert results["trades"]["autoattack/square"] == [0.20, 0.30]
  table = study.stages_table(results)
  header = table.splitlines()[0]
  assert header.index("PGD-20") < header.index("after apgd-ce") < header.index("after square")
  assert "| trades " in table and "35.0 ± 7.1" in table and "25.0 ± 7.1" in table
  assert "ard" not in table  # no stages recorded: no row
  assert study.stages_table({"ard": results["ard"]}) == ""
