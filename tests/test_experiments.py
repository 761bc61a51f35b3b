"""The benchmark and the profile summary run and report what they claim (tiny models; no timing
is asserted)."""

import contextlib
import importlib.util
import io

import numpy as np
import pytest

pytest.importorskip("torch")

from experiments import benchmark  # pylint: disable=g-import-not-at-top
from experiments import profile_step  # pylint: disable=g-import-not-at-top


@pytest.mark.parametrize("name,kind", [
    ("transpose_copy_fusion.29", "layout transpose (+ fused elementwise)"),
    ("convolution-base-dilated.5", "convolution"),
    ("conv_general_dilated.61", "convolution"),
    ("ynn_fusion.39", "YNNPACK / oneDNN call"),
    ("add_maximum_fusion.9", "other fusion (elementwise)"),
    ("SlinkyThreadPool::Await", "waiting for the thread pool"),
    ("copy.3", "copy / slice / other"),
])
def test_profile_kinds(name, kind):
  assert profile_step.kind_of(name) == kind


def test_benchmark_reports_every_row_and_the_bf16_drift(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")  # the benchmark sets the project's flags only if unset
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    benchmark.main(["--student=small_cnn", "--teacher=small_cnn", "--image-size=8",
                    "--batch=8", "--negatives=8,16", "--num-examples=64", "--repeats=1",
                    "--warmup=0", "--precision=bf16", "--only=gacd_step,rslad_step"])
  text = out.getvalue()
  assert "logit drift of bf16 from fp32" in text
  rows = [line for line in text.splitlines() if line.startswith(("| gacd_step", "| rslad_step"))]
  # GACD for each K, RSLAD once (it has no negatives)
  assert len(rows) == 3 and sum(r.startswith("| rslad_step") for r in rows) == 1
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) > 0 and float(cells[4]) > 0  # JAX and PyTorch img/s


@pytest.mark.parametrize("fmt", ["python", "binary", "folder", "npz", "tfds"])
def test_input_pipeline_writes_each_format_and_measures_its_reading(fmt, tmp_path):
  """The benchmark's files read back as written, and each measured rate is a positive number."""
  from experiments import input_pipeline  # pylint: disable=g-import-not-at-top
  if fmt not in input_pipeline.formats():
    pytest.skip("writing tfds array_record needs TensorFlow (not a dependency: pip install "
                "tensorflow-cpu); reading it is tested in test_data_files")
  from gacd_jax import data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  splits = {split: (rng.integers(256, size=(n, 32, 32, 3), dtype=np.uint8),
                    np.sort(rng.integers(10, size=n))) for split, n in (("train", 40), ("test", 10))}
  input_pipeline.write_cifar10(tmp_path, fmt, splits)
  test = data.build("cifar10", "test", data_dir=str(tmp_path))
  np.testing.assert_array_equal(test.get(np.arange(10))["image"],
                                splits["test"][0] / np.float32(255))
  row = input_pipeline.measure(fmt, tmp_path, batch=8, steps=3)
  assert row["format"] == fmt
  for key in ("open img/s", "sync img/s", "delivered img/s"):
    assert float(row[key].replace(",", "")) > 0, key


def test_input_pipeline_leaves_out_tfds_without_tensorflow_and_says_so(monkeypatch, capsys):
  from experiments import input_pipeline  # pylint: disable=g-import-not-at-top
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "tensorflow" else real(name, *a))
  assert input_pipeline.formats() == ("python", "binary", "folder", "npz")
  monkeypatch.setattr(input_pipeline, "FORMATS", ("tfds",))  # nothing left to measure
  assert input_pipeline.run(num_examples=8, batch=4) == []
  assert "tfds: not measured (writing it needs TensorFlow" in capsys.readouterr().out


def _tiny_speed_model(n: int = 6):
  """`autoattack_speed.Model`: a random small_cnn, the same weights in both frameworks."""
  import torch  # pylint: disable=g-import-not-at-top
  from experiments import autoattack_speed  # pylint: disable=g-import-not-at-top
  from experiments.pytorch_baseline import models as torch_models  # pylint: disable=g-import-not-at-top
  from gacd_jax import models  # pylint: disable=g-import-not-at-top
  from gacd_jax import torch_convert  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = torch_models.build("small_cnn", 10, width=4)
  state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  variables = torch_convert.torch_to_flax("small_cnn", state, 10, width=4)
  module = models.build("small_cnn", 10, width=4)
  x = np.random.default_rng(0).uniform(0, 1, (n, 16, 16, 3)).astype(np.float32)
  return autoattack_speed.Model(torch_models.LogitsOnly(net),
                                autoattack_speed.apply_builder(module), variables, x,
                                np.arange(n) % 10)


def test_autoattack_speed_interleaves_the_packages_and_divides_their_medians(monkeypatch):
  """gacd_jax's first call (with a function it has not compiled), then pyautoattack and
  gacd_jax in turn; compile = first call minus the later median."""
  from experiments import autoattack_speed  # pylint: disable=g-import-not-at-top
  calls, functions = [], []
  ours_seconds, theirs_seconds = iter([10.0, 4.0, 6.0]), iter([8.0, 12.0])

  def ours(apply_fn, variables, x, y, row):
    calls.append("ours")
    functions.append(apply_fn)
    return 0.5, next(ours_seconds)

  def official(net, x, y, row):
    calls.append("official")
    assert len(x) == row.examples
    return 0.25, next(theirs_seconds)

  monkeypatch.setattr(autoattack_speed, "ours", ours)
  monkeypatch.setattr(autoattack_speed, "official", official)
  model = _tiny_speed_model()
  row = autoattack_speed.Row("t", "digits", "custom", ("apgd-ce",), 4, 0.1)
  result = autoattack_speed.time_row(model, row, repeats=2)
  assert calls == ["ours", "official", "ours", "official", "ours"]
  assert len({id(f) for f in functions}) == 1  # later calls reuse the first call's compilation
  assert result["images"] == "4" and result["gacd_jax first call s"] == "10.0"
  assert result["of which compile"] == "5.0"
  assert result["gacd_jax later s"] == "5.0 (4.0-6.0)"
  assert result["pyautoattack s"] == "10.0 (8.0-12.0)"
  assert result["speed-up incl. compile"] == "1.00x" and result["speed-up steady"] == "2.00x"
  assert result["robust %, gacd_jax / pyautoattack"] == "50.0 / 25.0"


def test_autoattack_speed_times_the_same_gradient_on_both_sides():
  from experiments import autoattack_speed  # pylint: disable=g-import-not-at-top
  row = autoattack_speed.time_gradient_step(_tiny_speed_model(), "tiny", batch=8, repeats=2,
                                            steps=1)
  assert row["batch"] == "8"
  assert float(row["gradient difference (max, relative)"]) < 1e-4
  for key in ("gacd_jax ms/step", "PyTorch ms/step"):
    assert float(row[key].split()[0]) > 0, key


def test_benchmark_runs_the_autoattack_speed_table_only_when_named(monkeypatch):
  from experiments import autoattack_speed  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("XLA_FLAGS", "")
  seen = []
  monkeypatch.setattr(autoattack_speed, "main", seen.append)
  assert "autoattack" not in benchmark.parse_args([]).only.split(",")
  benchmark.main(["--only=autoattack", "--cache="])
  assert len(seen) == 1 and seen[0][:2] == ["--threads", str(benchmark.parse_args([]).threads)]
