"""AutoAttack: threat-model constraints, the ensemble's worst case, the official checks, and parity
of the losses, the APGD schedule and APGD-CE with independent references (numpy, pyautoattack).

Everything runs on a tanh MLP trained on 8x8 digits with few iterations and queries, and but for
the tests of the loop modes, with the attacks' loops as XLA loops (`XLA_LOOPS`).
"""

import functools
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from gacd_jax import autoattack as aa
from gacd_jax import losses
from gacd_jax import runtime

EPS = {"Linf": 0.1, "L2": 0.7}
# One compilation per attack and batch shape. The CPU's default, the loops called from the host
# (`runtime.host_attack_loops`), computes the same (`test_host_loops_...`) but compiles about a
# fifth longer (three to eleven programs per shape), so only the tests of the loop modes use it.
XLA_LOOPS = {"host_loops": False}


def _mlp(w, xx):
  """A 64-32-10 tanh MLP: `[B, 8, 8, 1] -> [B, 10]`."""
  hidden = jnp.tanh(xx.reshape(xx.shape[0], -1) @ w["k1"] + w["b1"])
  return hidden @ w["k2"] + w["b2"]


@pytest.fixture(scope="module")
def trained():
  """`(weights, x, y)`: the MLP trained on 1000 digits, and 128 held-out digits."""
  digits = load_digits()
  x = jnp.asarray(digits.images[:, :, :, None] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target, jnp.int32)
  k1, k2 = jax.random.split(jax.random.key(0))
  w = {"k1": 0.1 * jax.random.normal(k1, (64, 32)), "b1": jnp.zeros(32),
       "k2": 0.1 * jax.random.normal(k2, (32, 10)), "b2": jnp.zeros(10)}
  grad = jax.jit(jax.grad(lambda w: losses.cross_entropy(_mlp(w, x[:1000]), y[:1000]).mean()))
  for _ in range(300):
    w = jax.tree.map(lambda p, g: p - 0.5 * g, w, grad(w))
  assert losses.accuracy(_mlp(w, x[1000:]), y[1000:]) > 0.9
  return w, np.asarray(x[1000:1128]), np.asarray(y[1000:1128])


@pytest.fixture(scope="module")
def mlp(trained):
  """`(f, x, y)`: the trained MLP as a function of images, and the held-out digits."""
  w, x, y = trained
  return functools.partial(_mlp, w), x, y


@pytest.fixture(scope="module")
def noisy(mlp):
  """The MLP with Gaussian noise on its input: `(x, key) -> logits`, a randomized model."""
  f = mlp[0]
  return lambda xx, key: f(xx + 0.05 * jax.random.normal(key, xx.shape))


def _distance(x_adv, x, norm):
  delta = (np.asarray(x_adv) - x).reshape(len(x), -1)
  return np.abs(delta).max(1) if norm == "Linf" else np.linalg.norm(delta, axis=1)


def _keys(n, seed=0):
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(n))


def _model(f):
  return lambda xx, key: f(xx)


def test_dlr_losses_equal_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(32, 10)).astype(np.float32) * 3
  labels = rng.integers(10, size=32)
  labels[:8] = logits[:8].argmax(1)  # some correctly classified, some not
  targets = (labels + 1 + rng.integers(9, size=32)) % 10

  top = -np.sort(-logits, axis=1)
  z_y = logits[np.arange(32), labels]
  others = np.where(np.eye(10, dtype=bool)[labels], -np.inf, logits).max(1)
  expected = -(z_y - others) / (top[:, 0] - top[:, 2] + 1e-12)
  expected_targeted = -(z_y - logits[np.arange(32), targets]) / (
      top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)

  np.testing.assert_allclose(aa.dlr_loss(jnp.asarray(logits), jnp.asarray(labels)), expected,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      aa.dlr_targeted_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(targets)),
      expected_targeted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_iter", [100, 200, 1000])
def test_apgd_checkpoints_follow_the_paper(n_iter):
  # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); w_j = ceil(p_j N).
  p = [0.0, 0.22]
  while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0 + 1e-9:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
  expected = [math.ceil(pj * n_iter - 1e-6) for pj in p[1:]]
  assert aa.apgd_checkpoints(n_iter) == expected
  if n_iter == 100:
    assert expected == [22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_apgd_and_square_stay_in_the_ball_and_the_image_range(mlp, norm):
  f, x, y = mlp
  eps = EPS[norm]
  keys, model_key = _keys(len(x)), jax.random.key(1)
  runs = {"apgd": functools.partial(aa.apgd, loss="ce", n_iter=10),
          "square": functools.partial(aa.square, n_queries=60)}
  for name, attack in runs.items():
    run = jax.jit(functools.partial(attack, _model(f), eps=eps, norm=norm))
    x_adv, fooled = run(jnp.asarray(x), jnp.asarray(y), keys, model_key)
    x_adv, fooled = np.asarray(x_adv), np.asarray(fooled)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0, name
    assert _distance(x_adv, x, norm).max() <= eps + 1e-5, name
    assert fooled.any(), name
    np.testing.assert_array_equal(np.asarray(f(x_adv)).argmax(1)[fooled] != y[fooled], True)


def test_an_apgd_run_stops_once_its_batch_is_fooled_and_keeps_the_first_adversarial_point(mlp):
  """At eps 0.2 every example is fooled within a few steps: the run stops there (the forward
  passes are counted) instead of taking all 50. Each output is the example's first misclassified
  iterate, so attacking each example alone, which stops as soon as that one is fooled, gives the
  same points."""
  f, x, y = mlp
  n, eps = 16, 0.2
  x, y, keys = jnp.asarray(x[:n]), jnp.asarray(y[:n]), _keys(n)
  calls = []

  def counted(xx, key):
    jax.debug.callback(lambda: calls.append(1))
    return f(xx)

  attack = jax.jit(lambda xx, yy, kk: aa.apgd(counted, xx, yy, kk, jax.random.key(1), eps=eps,
                                              loss="ce", n_iter=50))
  together, fooled = attack(x, y, keys)
  assert bool(fooled.all()) and 1 < len(calls) < 10  # the start, then a few steps of 50
  alone = [attack(x[i:i + 1], y[i:i + 1], keys[i:i + 1])[0][0] for i in range(n)]
  np.testing.assert_array_equal(together, np.stack(alone))


@pytest.mark.parametrize("norm,targeted", [("Linf", True), ("L2", True), ("Linf", False)])
def test_fab_outputs_are_images_and_count_only_within_eps(mlp, norm, targeted):
  f, x, y = mlp
  eps = EPS[norm] / 2  # small, so some minimal perturbations found are larger
  run = jax.jit(functools.partial(aa.fab, _model(f), eps=eps, norm=norm, targeted=targeted,
                                  n_iter=10, n_target_classes=2))
  x_adv, fooled = run(jnp.asarray(x), jnp.asarray(y), _keys(len(x)), jax.random.key(1))
  x_adv, fooled = np.asarray(x_adv), np.asarray(fooled)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  dist = _distance(x_adv, x, norm)
  wrong = np.asarray(f(x_adv)).argmax(1) != y
  assert fooled.any()
  assert np.all(dist[fooled] <= eps) and np.all(wrong[fooled])
  assert np.any(wrong & (dist > eps) & ~fooled)  # found, but outside the ball: not counted


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_fab_projection_equals_a_bisection(norm):
  """The step to the hyperplane w . z = b inside the box: d(lam) = clip(lam * v, -t, 1 - t) along
  v = sign(w) (Linf) or w (L2), towards the plane, with lam found by bisection."""
  rng = np.random.default_rng(0)
  n, dim = 64, 20
  t = rng.uniform(size=(n, dim))
  t[:, :4] = rng.integers(0, 2, size=(n, 4))  # some coordinates at the bounds
  w = rng.normal(size=(n, dim))
  w[:, -2:] = 0.0
  b = (w * t).sum(1) + rng.normal(size=n) * rng.choice([0.1, 1.0, 30.0], size=n)

  needed = b - (w * t).sum(1)
  v = np.sign(needed)[:, None] * (np.sign(w) if norm == "Linf" else w)

  def step(lam):
    return np.clip(lam[:, None] * v, -t, 1 - t)

  low, high = np.zeros(n), np.full(n, 1e6)
  for _ in range(200):
    mid = (low + high) / 2
    short = np.abs((w * step(mid)).sum(1)) < np.abs(needed)
    low, high = np.where(short, mid, low), np.where(short, high, mid)
  expected = step(high)  # the box corner where the plane is out of reach

  project = jax.jit(aa.project_onto_hyperplane, static_argnums=3)
  got = project(jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32),
                jnp.asarray(b, jnp.float32), norm)
  np.testing.assert_allclose(got, expected, atol=2e-4)
  reachable = np.abs((w * expected).sum(1) - needed) < 1e-6
  assert 0 < reachable.sum() < n  # both cases occur


def test_ensemble_is_the_worst_case_of_its_attacks(mlp):
  f, x, y = mlp
  kw = dict(eps=EPS["Linf"], n_iter=10, n_queries=100, batch_size=64, progress=False,
            **XLA_LOOPS)
  with warnings.catch_warnings():
    warnings.simplefilter("error", aa.AutoAttackWarning)  # a clean deterministic model: no flags
    standard = aa.evaluate(f, x, y, version="standard", **kw)
  assert standard.attacks == aa.VERSION_ATTACKS["standard"]
  assert standard.robust_accuracy <= standard.clean_accuracy
  accuracies = [standard.accuracy_after[a] for a in standard.attacks]
  assert accuracies == sorted(accuracies, reverse=True)
  assert standard.robust_accuracy == accuracies[-1] == standard.robust.mean()

  # Every returned point is an image in the ball; every broken example is misclassified there.
  assert standard.x_adv.min() >= 0.0 and standard.x_adv.max() <= 1.0
  assert _distance(standard.x_adv, x, "Linf").max() <= EPS["Linf"] + 1e-6
  broken = standard.broken_by >= 1
  assert np.all(np.asarray(f(standard.x_adv)).argmax(1)[broken] != y[broken])
  assert np.all(standard.robust == (standard.broken_by == -1))
  assert {standard.broken_by_name[i] for i in np.flatnonzero(broken)} <= set(standard.attacks)

  for name in standard.attacks:
    alone = aa.evaluate(f, x, y, version="custom", attacks_to_run=[name], **kw)
    assert standard.robust_accuracy <= alone.robust_accuracy, name
    # Per-example random numbers: what an attack breaks alone, it breaks in the ensemble too.
    assert not np.any(standard.robust & ~alone.robust), name


def test_masked_gradients_warn_and_square_still_breaks(mlp):
  f, x, y = mlp
  quantised = lambda xx: f(jnp.round(xx * 8) / 8)  # zero gradient almost everywhere
  with pytest.warns(aa.AutoAttackWarning) as caught:
    result = aa.evaluate(quantised, x, y, eps=0.15, version="custom",
                         attacks_to_run=["apgd-ce", "square"], n_iter=5, n_queries=300,
                         batch_size=128, progress=False, **XLA_LOOPS)
  messages = " ".join(str(w.message) for w in caught)
  assert "zero gradient" in messages
  assert "Square lowered the robust accuracy" in messages
  assert np.sum(np.asarray(result.broken_by_name) == "square") > 0
  assert result.accuracy_after["square"] < result.accuracy_after["apgd-ce"]


def test_the_output_and_randomness_checks(mlp):
  f, x, y = mlp
  noisy = lambda xx, key: f(xx + 0.05 * jax.random.normal(key, xx.shape))
  with pytest.warns(aa.AutoAttackWarning, match="probability distribution"):
    aa.check_range_output(np.asarray(jax.nn.softmax(f(x))))
  with pytest.warns(aa.AutoAttackWarning, match="randomized defense"):
    aa.check_randomized(noisy, jnp.asarray(x), y)
  with warnings.catch_warnings():
    warnings.simplefilter("error", aa.AutoAttackWarning)
    aa.check_range_output(np.asarray(f(x)))
    aa.check_randomized(_model(f), jnp.asarray(x), y)


def test_evaluate_runs_the_checks_and_the_rand_version(mlp, noisy):
  _, x, y = mlp
  with pytest.warns(aa.AutoAttackWarning) as caught:
    aa.evaluate(lambda xx, key: jax.nn.softmax(noisy(xx, key)), x[:64], y[:64], randomized=True,
                version="custom", attacks_to_run=["apgd-ce"], n_iter=2, batch_size=64,
                progress=False, **XLA_LOOPS)
  messages = " ".join(str(w.message) for w in caught)
  assert "randomized defense" in messages and "probability distribution" in messages

  with warnings.catch_warnings():
    warnings.simplefilter("error", aa.AutoAttackWarning)  # 'rand' expects randomness
    result = aa.evaluate(noisy, x[:64], y[:64], randomized=True, version="rand", n_iter=3,
                         eot_iter=4, batch_size=64, progress=False, **XLA_LOOPS)
  assert result.attacks == ("apgd-ce", "apgd-dlr")
  assert result.robust_accuracy < result.clean_accuracy


@pytest.mark.slow
def test_apgd_ce_matches_the_official_package(trained):
  """APGD-CE (100 iterations, 1 restart, seed 0) in pyautoattack, on the same MLP in PyTorch."""
  torch = pytest.importorskip("torch")
  pyautoattack = pytest.importorskip("pyautoattack")
  w, x, y = trained
  x, y = x[:64], y[:64]
  torch_w = {k: torch.from_numpy(np.array(v)) for k, v in w.items()}

  class TorchMLP(torch.nn.Module):
    def forward(self, xx):  # [B, 1, 8, 8]: with one channel, NCHW flattens like NHWC
      hidden = torch.tanh(xx.reshape(xx.shape[0], -1) @ torch_w["k1"] + torch_w["b1"])
      return hidden @ torch_w["k2"] + torch_w["b2"]

  adversary = pyautoattack.AutoAttack(TorchMLP(), norm="Linf", eps=EPS["Linf"], version="custom",
                                      attacks=["apgd-ce"], seed=0)
  adversary.apgd.n_restarts = 1
  with torch.no_grad():
    _, y_adv = adversary.run_standard_evaluation(
        torch.tensor(x).permute(0, 3, 1, 2).contiguous(), torch.tensor(y).long(),
        batch_size=64)
  official = np.mean(y_adv.numpy() == y)

  ours = aa.evaluate(functools.partial(_mlp, w), x, y, eps=EPS["Linf"], version="custom",
                     attacks_to_run=["apgd-ce"], batch_size=64, progress=False, **XLA_LOOPS)
  assert ours.clean_accuracy > ours.robust_accuracy > 0.2  # a test that can tell them apart
  # Each side draws its own random starts: one example near the boundary may go either way.
  assert abs(ours.robust_accuracy - official) <= 1 / 64


def test_params_argument_equals_a_closure(trained):
  """Weights passed as `params` (compiled as an argument) attack exactly like a closure."""
  w, x, y = trained
  kw = dict(eps=EPS["Linf"], version="fast", n_iter=4, batch_size=64, progress=False,
            **XLA_LOOPS)
  closure = aa.evaluate(functools.partial(_mlp, w), x[:64], y[:64], **kw)
  argument = aa.evaluate(_mlp, x[:64], y[:64], params=w, **kw)
  np.testing.assert_array_equal(argument.broken_by, closure.broken_by)
  np.testing.assert_allclose(argument.x_adv, closure.x_adv, atol=1e-6)


def test_evaluate_run_adds_autoattack_to_the_report(tmp_path, capfd):
  """`evaluate_run` with suite 'standard' on a trained run: AutoAttack's row, one row per attack
  with its time, eval.json with accuracies and seconds; the ensemble is at most the clean
  accuracy and equals `autoattack.evaluate` called on the same examples. With progress=False no
  bar is drawn."""
  from gacd_jax import checkpoints, evaluate, train  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_config("natural", epochs=2)
  config.eval.suite = "standard"
  config.eval.autoattack_n_iter = 3
  config.eval.autoattack_n_queries = 10
  train.train(config, str(tmp_path), progress=False)
  capfd.readouterr()
  accuracy = evaluate.evaluate_run(config, str(tmp_path), progress=False)
  assert "it/s" not in capfd.readouterr().err  # no tqdm bar

  saved = json.loads((tmp_path / "eval.json").read_text())
  assert saved["accuracy"] == accuracy and saved["suite"] == "standard"
  assert set(saved["seconds"]) == set(accuracy) == {"clean", "fgsm", "pgd20", "cw", "autoattack"}
  after = saved["autoattack"]["accuracy_after"]
  assert list(after) == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert list(after.values()) == sorted(after.values(), reverse=True)
  assert accuracy["autoattack"] == after["square"] <= accuracy["clean"]
  text = (tmp_path / "report.md").read_text()
  for label in ("AutoAttack (standard)", "after APGD-CE", "after APGD-T", "after FAB-T",
                "after Square", "time (s)"):
    assert label in text, label

  module, variables = checkpoints.load_model(str(tmp_path))
  x, y = evaluate.test_arrays(evaluate.test_source(config), config.eval.max_examples)
  assert len(y) == saved["examples"] == config.eval.max_examples
  direct = aa.evaluate(evaluate.logits_fn(module), x, y, params=variables, eps=config.eval.eps,
                       batch_size=config.eval.batch_size, seed=config.seed, n_iter=3,
                       n_queries=10, progress=False)
  assert direct.robust_accuracy == accuracy["autoattack"]


# With the settings of the tests above, whose XLA loops' compilations are reused.
@pytest.mark.parametrize("version", ["standard", "rand"])
def test_host_loops_break_what_the_xla_loops_break(mlp, noisy, version):
  """The attacks' iterations called from the host (`runtime.host_attack_loops`, the CPU's
  default) or run in XLA loops: the same examples broken, by the same attack, at the same points
  (Linf, where the two are bit-identical here)."""
  f, x, y = mlp
  if version == "standard":
    model, n, kw = f, 128, dict(n_iter=10, n_queries=100, batch_size=64)
  else:  # a randomized model: EOT's draws unrolled with host loops
    model, n, kw = noisy, 64, dict(n_iter=3, eot_iter=4, batch_size=64, randomized=True)
  kw.update(eps=EPS["Linf"], version=version, progress=False)
  xla = aa.evaluate(model, x[:n], y[:n], host_loops=False, **kw)
  host = aa.evaluate(model, x[:n], y[:n], host_loops=True, **kw)
  assert 0 < xla.robust_accuracy < xla.clean_accuracy
  np.testing.assert_array_equal(host.broken_by, xla.broken_by)
  np.testing.assert_allclose(host.x_adv, xla.x_adv, rtol=0, atol=1e-6)


def test_host_loops_compute_every_attack_as_the_xla_loops_do(mlp):
  """APGD-T, FAB, FAB-T and Square in L2 with the settings of 'plus', on one batch, their second
  run (a random restart, or the second target): every output point, broken or not, the same from
  host loops and XLA loops (APGD-CE and APGD-DLR differ from APGD-T only in the loss).

  The computation is the same; only XLA's fusion differs (the loop body is a program of its own),
  so where it sums (L2 norms, FAB's projections) float32 rounding may differ in the last bit or
  two (measured: at most 2e-7): hence the tolerance, far below one pixel level (1/255).
  """
  f, x, y = mlp
  n = 32
  model = aa._WithParams(f, False, False)  # pylint: disable=protected-access
  batch = (jnp.asarray(x[:n]), jnp.asarray(y[:n]), jnp.ones(n, bool), jnp.arange(n))
  broken_any = False
  for name in ("apgd-t", "fab", "fab-t", "square"):
    outputs = []
    for host_loops in (False, True):
      settings = aa._attack_settings(  # pylint: disable=protected-access
          "plus", n_iter=3, n_queries=20, n_target_classes=2, eot_iter=1, host_loops=host_loops)
      attack, kw, n_runs = settings[name]
      run = aa._batch_attack.__wrapped__(  # pylint: disable=protected-access
          model, attack, tuple(sorted(kw.items())), "l2", n_runs > 0, host_loops)
      outputs.append(run(None, *batch, jnp.int32(0), jnp.int32(1 if n_runs else 0),
                         jax.random.key(0), jnp.float32(EPS["L2"])))
    (x_xla, broken_xla), (x_host, broken_host) = outputs
    assert np.abs(np.asarray(x_xla) - x[:n]).max() > 0.01, name  # it moved
    np.testing.assert_array_equal(broken_host, broken_xla, err_msg=name)
    np.testing.assert_allclose(x_host, x_xla, rtol=0, atol=1e-6, err_msg=name)
    broken_any |= bool(np.any(broken_xla))
  assert broken_any


def test_host_loops_shrink_an_apgd_batch_to_the_examples_it_has_not_broken(mlp):
  """Within a run, host loops compact an APGD batch to the next bucket of the examples not yet
  broken: the model sees smaller batches (128, then down to ...), and every result is that of the
  XLA loops, which keep the whole batch."""
  f, x, y = mlp
  sizes = []

  def model(xx):
    jax.debug.callback(lambda: sizes.append(xx.shape[0]))
    return f(xx)

  kw = dict(eps=0.2, version="custom", attacks_to_run=["apgd-ce"], n_iter=20, batch_size=128,
            progress=False)
  host = aa.evaluate(model, x, y, host_loops=True, **kw)
  host_sizes = set(sizes)
  sizes.clear()
  xla = aa.evaluate(model, x, y, host_loops=False, **kw)
  assert 0 < host.robust_accuracy < host.clean_accuracy / 2
  assert max(host_sizes) == 128 and min(host_sizes) <= 32 and set(sizes) == {128}
  np.testing.assert_array_equal(host.broken_by, xla.broken_by)
  np.testing.assert_allclose(host.x_adv, xla.x_adv, rtol=0, atol=1e-6)


# A random MLP on digits, labelled by itself: APGD-T (two targets: compacted between and within
# runs) on one device and on a mesh of eight (buckets multiples of 8), with host loops.
EIGHT_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from sklearn.datasets import load_digits
from gacd_jax import autoattack as aa, sharding
assert len(jax.devices()) == 8
x = (load_digits().images[:96, :, :, None] / 16.0).astype(np.float32)
k1, k2 = jax.random.split(jax.random.key(0))
w = {"k1": jax.random.normal(k1, (64, 32)) / 8, "k2": jax.random.normal(k2, (32, 10)) / 4}
f = lambda p, xx: jnp.tanh(xx.reshape(len(xx), -1) @ p["k1"]) @ p["k2"]
y = np.asarray(f(w, x)).argmax(1)
one, eight = (aa.evaluate(f, x, y, params=w, eps=0.1, version="custom", attacks_to_run=["apgd-t"],
                          n_iter=10, n_target_classes=2, batch_size=64, host_loops=True,
                          progress=False, mesh=sharding.make_mesh(jax.devices()[:devices]))
              for devices in (1, 8))
print(0 < one.robust_accuracy < 0.5, np.array_equal(eight.broken_by, one.broken_by)
      and np.abs(eight.x_adv - one.x_adv).max() < 1e-6)
"""


def test_one_device_and_eight_give_the_same_attacks():
  from tests import helpers  # pylint: disable=g-import-not-at-top
  assert helpers.run_python(EIGHT_DEVICES, devices=8).split()[-2:] == ["True", "True"]


def test_buckets_are_powers_of_two_times_the_devices_up_to_the_batch_size():
  assert [aa.bucket(n, 256) for n in (1, 2, 3, 99, 128, 129, 256, 300)] == [
      1, 2, 4, 128, 128, 256, 256, 256]
  assert [aa.bucket(n, 48, 8) for n in (1, 8, 9, 20, 40, 48)] == [8, 8, 16, 32, 48, 48]


def test_results_do_not_depend_on_the_batch_size(mlp):
  """Per-example keys, compaction between runs and bucketed shapes: the same examples broken, by
  the same attack, at the same points, whether batches hold 128 examples or 16 (and 8, 4, ...
  for the short ones)."""
  f, x, y = mlp
  kw = dict(eps=EPS["Linf"], version="standard", n_iter=5, n_queries=50, n_target_classes=3,
            progress=False, **XLA_LOOPS)
  large = aa.evaluate(f, x, y, batch_size=128, **kw)
  small = aa.evaluate(f, x, y, batch_size=16, **kw)
  assert 0 < large.robust_accuracy < large.clean_accuracy
  assert len(set(large.broken_by[large.broken_by > 0])) > 1  # more than one attack breaks some
  np.testing.assert_array_equal(small.broken_by, large.broken_by)
  np.testing.assert_allclose(small.x_adv, large.x_adv, atol=1e-6)


def test_run_by_run_equals_all_runs_in_one_batch(mlp):
  """The driver's APGD-T, target by target on the examples still robust, breaks exactly the
  examples that `apgd` breaks with its nine targets in one call on the whole batch (same keys)."""
  f, x, y = mlp
  seed, eps = 3, EPS["Linf"]
  driver = aa.evaluate(f, x, y, eps=eps, version="custom", attacks_to_run=["apgd-t"], n_iter=5,
                       batch_size=32, seed=seed, progress=False, **XLA_LOOPS)
  attack_key = jax.random.fold_in(jax.random.key(seed), aa.ATTACKS.index("apgd-t"))
  example_root, _ = jax.random.split(attack_key)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(example_root, jnp.arange(len(x)))
  _, fooled = jax.jit(lambda xx: aa.apgd(_model(f), xx, jnp.asarray(y), keys, jax.random.key(0),
                                         eps=eps, loss="dlr-targeted", n_iter=5))(jnp.asarray(x))
  correct = np.asarray(f(x)).argmax(1) == y
  assert 0 < np.sum(correct & np.asarray(fooled)) < correct.sum()
  np.testing.assert_array_equal(driver.broken_by == 1, correct & np.asarray(fooled))


def test_twenty_examples_are_attacked_in_a_batch_of_at_most_32(mlp, monkeypatch):
  f, x, y = mlp
  shapes, host_loops = [], []
  real = aa._batch_attack  # pylint: disable=protected-access

  def recording(*args):
    host_loops.append(args[-1])
    run = real(*args)
    def call(params, xx, *rest):
      shapes.append(xx.shape[0])
      return run(params, xx, *rest)
    return call

  monkeypatch.setattr(aa, "_batch_attack", recording)
  aa.evaluate(f, x[:20], y[:20], eps=EPS["Linf"], version="fast", n_iter=3, n_target_classes=2,
              batch_size=256, progress=False)
  assert shapes and max(shapes) <= 32
  assert len(shapes) >= 3  # APGD-CE, then APGD-T's two target runs
  # By default the loops are runtime's choice (the tests set $GACD_JAX_ATTACK_LOOPS=xla).
  assert set(host_loops) == {runtime.host_attack_loops(jax.default_backend())} == {False}


def test_host_loops_are_for_the_gradient_attacks_and_square_keeps_its_xla_loop(mlp, monkeypatch):
  f, x, y = mlp
  chosen = {}

  def recording(fn, attack, settings, norm, by_run, host_loops):
    chosen[attack.__name__] = host_loops
    return lambda params, xx, *rest: (xx, np.zeros(len(xx), bool))  # breaks nothing

  monkeypatch.setattr(aa, "_batch_attack", recording)
  aa.evaluate(f, x[:8], y[:8], eps=EPS["Linf"], host_loops=True, progress=False)
  assert chosen == {"apgd": True, "fab": True, "square": False}
  aa.evaluate(f, x[:8], y[:8], eps=EPS["Linf"], host_loops=False, progress=False)
  assert not any(chosen.values())


@pytest.mark.parametrize("loss,forwards", [("ce", 0), ("dlr-targeted", 1)])
def test_an_apgd_run_evaluates_the_model_only_in_its_steps(mlp, loss, forwards):
  """The random start is evaluated by the first step, not by `init`, so host loops compile one
  gradient program per batch shape (APGD-T's init only ranks the clean logits for its target);
  the run still evaluates n_iter + 1 points, as the algorithm does."""
  f, x, y = mlp
  calls = []

  def model(xx, key):
    calls.append(xx.shape)
    return f(xx)

  n = 8
  program = aa.apgd_program(model, jnp.asarray(x[:n]), jnp.asarray(y[:n]),
                            jax.random.split(jax.random.key(0), n), jax.random.key(1), run=0,
                            eps=EPS["Linf"], loss=loss, n_iter=5)
  state = program.init()
  assert len(calls) == forwards
  assert program.loops == ((0, 6),)
  for i in range(*program.loops[0]):
    state = program.body(0, jnp.int32(i), state)
  assert len(calls) == forwards + 6
