"""Structure analysis, attack-strength curves and linear probes: the measures against a numpy
reference and their invariances, the convergence verdict, a probe attacked through its backbone,
and the analyse command end to end on tiny runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gacd_jax import analysis
from gacd_jax import checkpoints
from gacd_jax import evaluate
from gacd_jax import probe
from gacd_jax import similarity
from gacd_jax import train
from gacd_jax.errors import ConfigError
from tests import helpers


def _cka_reference(x: np.ndarray, y: np.ndarray) -> float:
  """Linear CKA in its HSIC form: centred Gram matrices K = H X X^T H and L = H Y Y^T H,
  <K, L>_F / (||K||_F ||L||_F), in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  centring = np.eye(len(x)) - 1.0 / len(x)
  k = centring @ x @ x.T @ centring
  l = centring @ y @ y.T @ centring
  return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def _features(seed: int, n: int = 50, d: int = 12) -> np.ndarray:
  # A non-zero mean, as ReLU features have, so that centring matters.
  return np.random.default_rng(seed).normal(1.0, 1.0, (n, d)).astype(np.float32)


def _rotation(seed: int, d: int) -> np.ndarray:
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q.astype(np.float32)


def test_cka_matches_the_hsic_form():
  x, y = _features(0), _features(1, d=7)
  related = x[:, :7] + 0.5 * y
  for a, b in ((x, y), (x, related), (related, y)):
    np.testing.assert_allclose(similarity.linear_cka(a, b), _cka_reference(a, b), rtol=1e-4)


def test_cka_is_one_for_a_representation_and_its_rotations_and_scalings():
  x, y = _features(0), _features(1)
  np.testing.assert_allclose(similarity.linear_cka(x, x), 1.0, rtol=1e-5)
  expected = float(similarity.linear_cka(x, y))
  transformed = 3.5 * x @ _rotation(2, x.shape[1])
  np.testing.assert_allclose(similarity.linear_cka(transformed, x), 1.0, rtol=1e-5)
  np.testing.assert_allclose(similarity.linear_cka(transformed, y), expected, rtol=1e-4)
  assert expected < 0.9  # unrelated random features are far from 1


def test_similarity_correlation():
  x, y = _features(0), _features(1)
  np.testing.assert_allclose(similarity.similarity_correlation(x, x), 1.0, rtol=1e-5)
  # Cosine similarities ignore rotations and scalings of the features (about the origin).
  rotated = 0.2 * x @ _rotation(3, x.shape[1])
  np.testing.assert_allclose(similarity.similarity_correlation(rotated, y),
                             similarity.similarity_correlation(x, y), rtol=1e-4)
  unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
  upper = np.triu_indices(len(x), k=1)
  reference = np.corrcoef((unit(x) @ unit(x).T)[upper], (unit(y) @ unit(y).T)[upper])[0, 1]
  np.testing.assert_allclose(similarity.similarity_correlation(x, y), reference, rtol=1e-4,
                             atol=1e-6)


@pytest.mark.parametrize("last,too_weak", [(0.489, True), (0.491, False), (0.5, False),
                                           (0.2, True)])
def test_the_too_weak_verdict(last, too_weak):
  steps = [1, 2, 5, 10, 20, 50]
  accuracies = [0.9, 0.7, 0.6, 0.55, 0.5, last]
  assert analysis.attack_too_weak(steps, accuracies) is too_weak
  # Only the last doubling counts: a steep start does not make an evaluation weak.
  assert analysis.attack_too_weak(steps, [0.9, 0.1, 0.1, 0.1, 0.1, 0.1]) is False


def test_the_curves_report_says_when_the_evaluation_is_too_weak(tmp_path):
  config = helpers.tiny_config()
  row = {"examples": 64, "eps": [0.0, 0.15], "eps_accuracy": [0.9, 0.5], "steps": [10, 20]}
  rows = [{**row, "run": "converged", "steps_accuracy": [0.5, 0.495], "too_weak": False},
          {**row, "run": "still_falling", "steps_accuracy": [0.5, 0.45], "too_weak": True}]
  markdown = analysis.write_curves(rows, str(tmp_path), config=config)
  assert "too weak for still_falling**" in markdown
  assert "converged for every run" not in markdown and "NO: evaluation too weak" in markdown
  assert markdown == (tmp_path / "curves.md").read_text()
  assert (tmp_path / "steps_curve.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("steps", [[1, 2, 5, 10, 20, 30], [1], [2, 1, 4], [0, 2]])
def test_steps_that_cannot_judge_convergence(steps):
  with pytest.raises(ConfigError):
    analysis.check_steps(steps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A teacher and two students (small_cnn, width 4), naturally trained for 4 steps on 128
  digits from different seeds."""
  root = tmp_path_factory.mktemp("runs")
  dirs = {}
  for seed, name in enumerate(("teacher", "student_a", "student_b")):
    config = helpers.tiny_config("natural")
    config.seed = seed  # the same computation for all three, so they compile once
    train.train(config, str(root / name), progress=False)
    dirs[name] = root / name
  return dirs


def test_steps_curve_is_non_increasing(runs):
  module, variables = checkpoints.load_model(runs["student_a"])
  config = helpers.tiny_config()
  source = evaluate.test_source(config)
  settings = evaluate.EvalSettings.from_config(config.eval)
  curve = analysis.steps_curve(evaluate.logits_fn(module), variables, source, settings,
                               steps=(1, 2, 4), start="none")
  assert all(0.0 <= a <= 1.0 for a in curve)
  assert curve == sorted(curve, reverse=True), curve
  clean = evaluate.robust_accuracy(evaluate.logits_fn(module), variables, source,
                                   evaluate.attack_fn("clean", settings), eps=settings.eps,
                                   batch_size=settings.batch_size,
                                   max_examples=settings.max_examples)[0]
  assert curve[0] <= clean


def test_the_probe_attack_goes_through_the_backbone(runs):
  module, backbone = checkpoints.load_model(runs["student_a"])
  _, other_backbone = checkpoints.load_model(runs["student_b"])  # same architecture
  x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1))
  features = np.asarray(jax.jit(module.apply)(backbone, x)[1])
  params, _ = probe.train_probe(features, np.array([0, 1, 2]), 5,
                                probe.ProbeSettings(steps=20, learning_rate=0.1))
  logits_fn = probe.end_to_end(module)
  variables = {"backbone": backbone, "probe": params}
  assert jax.jit(logits_fn)(variables, x).shape == (3, 5)
  input_grad = jax.jit(jax.grad(lambda v, xx: logits_fn(v, xx)[:, 0].sum(), argnums=1))
  grad = input_grad(variables, x)
  assert float(jnp.abs(grad).max()) > 0
  # The gradient reaches the input only through the backbone, so it depends on its weights.
  other = input_grad({**variables, "backbone": other_backbone}, x)
  assert not np.allclose(grad, other)


def test_a_probe_on_another_dataset(runs, tmp_path):
  """A digits student's frozen features, probed on the 10-class 'synthetic' images."""
  config = helpers.tiny_config()
  config.data.name = "synthetic"
  config.data.num_examples = 256
  result = probe.run_probe(str(runs["student_a"]), config, str(tmp_path),
                           probe.ProbeSettings(steps=200), attacks=("clean", "pgd20"))
  accuracy = result["accuracy"]
  assert accuracy["clean"] >= 0.3, result  # chance is 0.1
  assert accuracy["pgd20"] <= accuracy["clean"]
  assert json.loads((tmp_path / "probe.json").read_text())["accuracy"] == accuracy
  assert "PGD-20" in (tmp_path / "probe.md").read_text()


def test_analyse_command(runs, tmp_path):
  out = tmp_path / "analysis"
  proc = helpers.run_cli("analyse", f"--runs={runs['student_a']},{runs['student_b']}",
                         f"--teacher={runs['teacher']}", f"--out={out}", "--max_examples=48",
                         "--curves", "--steps=1,2")
  assert proc.returncode == 0, proc.stderr
  table = (out / "structure.md").read_text()
  rows = json.loads((out / "structure.json").read_text())["runs"]
  assert [r["run"] for r in rows] == ["student_a", "student_b"]
  for row in rows:
    assert row["run"] in table
    assert all(-1.0 <= row[k] <= 1.0 + 1e-6 for k in analysis.MEASURES), row
  curves = json.loads((out / "curves.json").read_text())["runs"]
  assert [len(r["steps_accuracy"]) for r in curves] == [2, 2]
  for png in ("structure.png", "eps_curve.png", "steps_curve.png"):
    assert (out / png).read_bytes().startswith(b"\x89PNG"), png


def test_analyse_without_a_teacher_is_one_clear_message(runs, tmp_path):
  proc = helpers.run_cli("analyse", f"--runs={runs['student_a']}", f"--out={tmp_path}")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
  assert "--teacher" in proc.stderr
