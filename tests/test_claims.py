"""experiments/claims.py end to end on a tiny fake study: structure, probe and cross-task."""

import json
import shutil

import numpy as np
import pytest

from experiments import claims
from gacd_jax import checkpoints
from gacd_jax import train
from tests import helpers


def _tiny_method_config(dataset, method):
  """helpers.tiny_config on `dataset`, with a short AutoAttack: seconds per run."""
  c = helpers.tiny_config(method)
  c.data.name = dataset
  c.data.image_size = 0
  c.eval.autoattack_n_iter = 3
  return c


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
  """A study tree of one tiny teacher and two tiny students, laid out so that the students swap
  names ('gacd', 'ard') between seeds 0 and 1 (the per-seed values differ); seed 2 has only its
  teacher (its students are not finished). The structure and the probe only read the models, so
  all three are trained naturally (with different seeds), which compiles once and takes seconds."""
  root = tmp_path_factory.mktemp("claims")
  made = root / "made"
  teacher = made / "teacher"
  students = {"gacd": made / "a", "ard": made / "b"}
  for seed, workdir in enumerate((teacher, *students.values())):
    config = _tiny_method_config("digits", "natural")
    config.seed = seed
    train.train(config, str(workdir), progress=False)
  study_root = root / "study"
  layout = {0: {"teacher": teacher, "gacd": students["gacd"], "ard": students["ard"]},
            1: {"teacher": teacher, "gacd": students["ard"], "ard": students["gacd"]},
            2: {"teacher": teacher}}
  for seed, runs in layout.items():
    for name, source in runs.items():
      target = study_root / "digits" / f"seed{seed}" / name
      shutil.copytree(source, target)
      checkpoints.write_json(target / "eval.json", {"accuracy": {"clean": 0.5}})
  # A run being trained (no eval.json yet) is skipped.
  shutil.copytree(students["gacd"], study_root / "digits" / "seed2" / "gacd")
  return root, study_root


def _check_summary(everything, measures):
  """The summary is mean and sample std (ddof 1) over the per-seed values."""
  for dataset, per_name in everything["results"].items():
    for name, entry in per_name.items():
      for m in measures:
        values = np.asarray(entry[m])
        assert len(values) == len(entry["seeds"])
        summary = everything["summary"][dataset][name][m]
        assert summary["n"] == len(values)
        np.testing.assert_allclose(summary["mean"], values.mean(), rtol=1e-12)
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        np.testing.assert_allclose(summary["std"], std, rtol=1e-12)


def test_structure_and_probe_over_seeds(tiny_study, monkeypatch, capsys):
  root, study_root = tiny_study
  monkeypatch.setattr(claims, "method_config", _tiny_method_config)
  out = root / "results"
  common = ["--workdir", str(root / "claims"), "--study-workdir", str(study_root),
            "--out", str(out), "--datasets", "digits", "--names", "gacd,ard,rslad",
            "--no-progress"]

  claims.main(["structure", *common, "--max-examples", "48"])
  printed = capsys.readouterr().out
  assert "seed2/gacd is not finished" in printed and "study/digits/seed0/rslad" in printed
  everything = json.loads((out / "claims_structure.json").read_text())
  assert "python -m experiments.claims structure" in everything["commands"]["digits"]
  per_name = everything["results"]["digits"]
  assert set(per_name) == {"gacd", "ard"}  # rslad: never finished
  for entry in per_name.values():
    assert entry["seeds"] == [0, 1]
    assert all(0 <= v <= 1 + 1e-6 for m in ("cka_clean", "cka_adv") for v in entry[m])
  # The students swapped names between the seeds: same models, same clean inputs.
  for m in ("cka_clean", "simcorr_clean"):
    np.testing.assert_allclose(per_name["gacd"][m][1], per_name["ard"][m][0], rtol=1e-5)
    np.testing.assert_allclose(per_name["gacd"][m][0], per_name["ard"][m][1], rtol=1e-5)
  _check_summary(everything, tuple(claims.analysis.MEASURES))
  assert set(everything["study_gacd"]["digits"]) == {"0", "1"}  # the config of each 'gacd' run
  markdown = (out / "claims_structure.md").read_text()
  assert everything["commands"]["digits"] in markdown
  assert (out / "claims_structure.png").stat().st_size
  mean, std = (everything["summary"]["digits"]["gacd"]["cka_clean"][k] for k in ("mean", "std"))
  assert f"{mean:.3f} ± {std:.3f}" in markdown
  # Resumable: a second call reuses every stored measurement.
  cache = root / "claims" / "structure" / "digits" / "seed0" / "gacd.json"
  stamp = cache.stat().st_mtime_ns
  claims.main(["structure", *common, "--max-examples", "48"])
  assert cache.stat().st_mtime_ns == stamp

  # The probe: the digits students on mnist5k shrunk to 8x8.
  capsys.readouterr()
  claims.main(["probe", *common, "--max-examples", "32", "--probe-steps", "20"])
  assert "probe gacd" not in capsys.readouterr().err  # --no-progress: no bars
  everything = json.loads((out / "claims_probe.json").read_text())
  per_name = everything["results"]["digits"]
  assert set(per_name) == {"gacd", "ard"} and per_name["gacd"]["seeds"] == [0, 1]
  _check_summary(everything, ("clean", "pgd20", "pgd20_half_eps", "train_accuracy"))
  probed = root / "claims" / "probe" / "digits" / "seed0" / "gacd"
  stored = json.loads((probed / "pgd20" / "probe.json").read_text())
  half = json.loads((probed / "pgd20_half_eps" / "probe.json").read_text())
  assert half["eps"] == pytest.approx(stored["eps"] / 2)
  assert half["accuracy"]["pgd20"] == per_name["gacd"]["pgd20_half_eps"][0]
  assert (stored["trained_on"], stored["probed_on"], stored["image_shape"]) == (
      "digits", "mnist5k", [8, 8, 1])
  assert stored["accuracy"]["clean"] == per_name["gacd"]["clean"][0]
  assert "digits students, probed on mnist5k at 8x8" in (out / "claims_probe.md").read_text()


def test_crosstask_distils_from_a_teacher_of_other_classes(tmp_path, monkeypatch):
  monkeypatch.setattr(claims, "method_config", _tiny_method_config)
  # The student as wide as the tiny teacher: one model shape, so their evaluations (AutoAttack's
  # programs most of all) compile once, not twice.
  digits = claims.recipes.SMALL_DATA["digits"]
  monkeypatch.setitem(claims.recipes.SMALL_DATA, "digits", digits._replace(
      student_width=_tiny_method_config("digits", "natural").model.small_cnn.width))
  out = tmp_path / "results"
  claims.main(["crosstask", "--workdir", str(tmp_path / "claims"), "--out", str(out),
               "--datasets", "digits", "--seeds", "0", "--names", "gacd",
               "--no-progress"])
  base = tmp_path / "claims" / "crosstask" / "digits" / "seed0"
  teacher_info = checkpoints.read_run_info(base / "teacher")
  student_info = checkpoints.read_run_info(base / "gacd")
  assert teacher_info["num_classes"] == student_info["num_classes"] == 5
  assert student_info["teacher"]["workdir"] == str((base / "teacher").absolute())
  assert checkpoints.read_config(base / "gacd").data.classes == [5, 6, 7, 8, 9]
  assert checkpoints.read_config(base / "teacher").data.classes == [0, 1, 2, 3, 4]
  everything = json.loads((out / "claims_crosstask.json").read_text())
  assert set(everything["results"]["digits"]) == {"teacher", "gacd"}
  for entry in everything["results"]["digits"].values():
    assert entry["seeds"] == [0]
    assert set(entry) == {"seeds", "clean", "pgd20", "autoattack"}
  assert everything["gacd_switches"]["digits"]["reweighting"] == "none"
  assert everything["autoattack_version"] == "fast"
  _check_summary(everything, ("clean", "pgd20", "autoattack"))
  assert (out / "claims_crosstask.png").stat().st_size
  assert "AutoAttack version 'fast'" in (out / "claims_crosstask.md").read_text()


def test_every_probe_is_attacked_first_at_the_students_own_eps():
  assert set(claims.PROBE_EPS_FRACTIONS) == set(claims.PROBE_TASK)
  for fractions in claims.PROBE_EPS_FRACTIONS.values():
    assert list(fractions.items())[0] == ("pgd20", 1.0)
    assert all(0 < f <= 1 for f in fractions.values())
