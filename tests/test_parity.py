"""Parity with the project's own eager PyTorch port (experiments/pytorch_baseline/) on the same
weights.

The port is this project's rewrite, not the field's public code: it mirrors the math of the
gacd_jax methods in eager PyTorch, written the way the public codebases write a step (a Python
attack loop, `zero_grad(); backward(); step()`). So these tests do not show that a method is what
its paper's code computes; they show that the JAX side has no framework-level error: weight-layout
conversion (torch_convert), BatchNorm train/eval semantics, autodiff through the attack and the
heads, the optimizer and the memory-bank updates. The behaviours pinned to the public code, with
its constants, are in tests/test_baselines.py (ARD, TRADES, RSLAD, IAD, AdaAD: random start,
BatchNorm mode during the attack, defaults, against numpy formulas) and tests/test_contrastive.py
(RepDistiller's CRD: NCE with momentum 0.5 memory banks and Z, against numpy). Checked here:
  * GACD's and ARD's loss, its gradient w.r.t. the student's parameters and the GACD heads, and the
    state the loss leaves (BatchNorm statistics, memory banks, Z), with the adversarial input and
    the negatives fixed on both sides and the student in train mode, as in the step;
  * PGD from the clean input (CE and GACD's guided objective, BatchNorm on running statistics);
  * one whole GACD step (attack, loss, SGD update, bank update), run twice; two RSLAD steps.

Relative errors are max |a - b| / max |b| per tensor.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gacd_jax import attacks
from gacd_jax import config as config_lib
from gacd_jax import methods
from gacd_jax import models
from gacd_jax import torch_convert
from gacd_jax import train
from gacd_jax.methods import contrastive
from gacd_jax.methods import gacd as gacd_lib
from gacd_jax.methods.base import Context, InitInfo
from tests import helpers

torch = pytest.importorskip("torch")
from experiments.pytorch_baseline import (  # pylint: disable=g-import-not-at-top
    attacks as torch_attacks, crd as torch_crd, models as torch_models, steps as torch_steps)

NUM_CLASSES, BATCH, SIZE = 10, 8, 16
STUDENT_WIDTH, TEACHER_WIDTH = 4, 8      # features: 16 and 32
FEAT_DIM, NUM_NEGATIVES = 16, 16
EPS, STEP_SIZE, PGD_STEPS = 8 / 255, 2 / 255, 10
RTOL = 1e-4
PGD_ATOL = 1e-5
# An input gradient element below this fraction of its example's largest is within reach of
# float32 noise (~1e-7 relative to the terms summed into it), and the sign of noise, the PGD step,
# is arbitrary. Relative because the gradient's scale varies by orders of magnitude per example.
GRAD_NOISE = 1e-4


# ---------------------------------------------------------------------------------------------
# Shared weights and data.


def _torch_model(width: int, seed: int) -> "torch.nn.Module":
  """A PyTorch small_cnn with random weights, BatchNorm affine parameters and statistics."""
  torch.manual_seed(seed)
  return helpers.randomize_batch_norm(
      torch_models.build("small_cnn", NUM_CLASSES, width=width))


def _flax_variables(torch_model: "torch.nn.Module", width: int) -> dict:
  state_dict = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
  return jax.tree.map(jnp.asarray, torch_convert.torch_to_flax(
      "small_cnn", state_dict, NUM_CLASSES, image_shape=(SIZE, SIZE, 3), width=width))


def _as_torch(variables_or_grads: dict) -> dict[str, np.ndarray]:
  """A Flax pytree ({'params': ..., 'batch_stats': ...}) in PyTorch keys and layouts."""
  flat = torch_convert.flax_to_torch("small_cnn", variables_or_grads)
  return {k: v for k, v in flat.items() if not k.endswith("num_batches_tracked")}


def _relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def _assert_close(actual: dict, expected: dict, what: str, rtol: float = RTOL) -> None:
  assert set(actual) == set(expected), (what, set(actual) ^ set(expected))
  errors = {k: _relative_error(actual[k], expected[k]) for k in expected}
  worst = max(errors, key=errors.get)
  assert errors[worst] <= rtol, f"{what}: {worst} differs by {errors[worst]:.2e} (relative)"


class Setup:
  """A student and a teacher in both frameworks with the same weights, a batch and the labels of
  a training set of `num_examples`."""

  def __init__(self, num_examples: int = 64, balanced: bool = False):
    self.student_t = _torch_model(STUDENT_WIDTH, seed=0)
    self.teacher_t = _torch_model(TEACHER_WIDTH, seed=1).eval()
    self.student = models.build("small_cnn", NUM_CLASSES, width=STUDENT_WIDTH)
    self.teacher = models.build("small_cnn", NUM_CLASSES, width=TEACHER_WIDTH)
    self.student_vars = _flax_variables(self.student_t, STUDENT_WIDTH)
    self.teacher_vars = _flax_variables(self.teacher_t, TEACHER_WIDTH)

    rng = np.random.default_rng(2)
    self.train_labels = (np.arange(num_examples) % NUM_CLASSES if balanced
                         else rng.integers(0, NUM_CLASSES, num_examples)).astype(np.int32)
    index = rng.choice(num_examples, BATCH, replace=False).astype(np.int32)
    image = rng.uniform(0, 1, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
    self.batch = {"image": jnp.asarray(image), "label": jnp.asarray(self.train_labels[index]),
                  "index": jnp.asarray(index)}
    self.x_t = torch.from_numpy(torch_convert.nhwc_to_nchw(image))
    self.y_t = torch.from_numpy(self.train_labels[index]).long()
    self.index_t = torch.from_numpy(index).long()
    # A fixed adversarial input inside the eps-ball, shared by both sides.
    x_adv = np.clip(image + rng.uniform(-EPS, EPS, image.shape), 0, 1).astype(np.float32)
    self.x_adv = jnp.asarray(x_adv)
    self.x_adv_t = torch.from_numpy(torch_convert.nhwc_to_nchw(x_adv))

  def info(self) -> InitInfo:
    return InitInfo(num_examples=len(self.train_labels), train_labels=self.train_labels,
                    steps_per_epoch=1, num_classes=NUM_CLASSES,
                    student_feature_dim=4 * STUDENT_WIDTH,
                    teacher_feature_dim=4 * TEACHER_WIDTH, teacher_num_classes=NUM_CLASSES)

  def teacher_clean(self):
    return self.teacher.apply(self.teacher_vars, self.batch["image"], train=False)

  def context(self, student, method_params=None, method_state=None, rng=None) -> Context:
    return Context(student=student, teacher=None, teacher_clean=self.teacher_clean(),
                   batch=self.batch, params=method_params or {}, state=method_state or {},
                   rng=rng if rng is not None else jax.random.key(0),
                   step=jnp.zeros((), jnp.int32))


def _method(name: str, **switches):
  cfg = config_lib.default().method
  cfg.name = name
  for key, value in switches.items():
    if key == "kl_reduction":
      cfg.kl_reduction = value
    else:
      cfg[name][key] = value
  return methods.build(cfg)


def _gacd(num_negatives: int = NUM_NEGATIVES):
  # The PyTorch side writes METHODS.md section 3's GACD: the guided attack, CE + 0.8 CRD NCE.
  return _method("gacd", num_negatives=num_negatives, feat_dim=FEAT_DIM,
                 **gacd_lib.RECONSTRUCTION)


def _jax_loss_and_grads(setup: Setup, method, x_adv, method_params=None, method_state=None,
                        rng=None):
  """The method's loss at `x_adv` with the student in train mode, as `train.make_step` runs it:
  (loss, grads {'student', 'method'}, new method state, new batch_stats)."""

  def loss_fn(params):
    student = train.StudentForward(setup.student, params["student"],
                                   setup.student_vars["batch_stats"])
    loss, _, state = method.loss(
        setup.context(student, params["method"], method_state, rng), x_adv)
    return loss, (state, student.batch_stats)

  params = {"student": setup.student_vars["params"], "method": method_params or {}}
  (loss, (state, batch_stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params)
  return float(loss), grads, state, batch_stats


def _torch_grads(module: "torch.nn.Module") -> dict[str, np.ndarray]:
  return {k: p.grad.numpy().copy() for k, p in module.named_parameters()}


def _running_stats(module: "torch.nn.Module") -> dict[str, np.ndarray]:
  return {k: v.numpy().copy() for k, v in module.state_dict().items()
          if k.endswith(("running_mean", "running_var"))}


def _numpy_state(module: "torch.nn.Module", parameters_only: bool = False
                 ) -> dict[str, np.ndarray]:
  """Parameters (and, unless `parameters_only`, BatchNorm statistics) as numpy copies."""
  items = (module.named_parameters() if parameters_only else module.state_dict().items())
  return {k: v.detach().numpy().copy() for k, v in items
          if not k.endswith("num_batches_tracked") and not k.startswith("memory.")}


def _minus(a: dict, b: dict) -> dict:
  return {k: np.asarray(a[k]) - b[k] for k in b}


def _bank_state(state) -> dict[str, np.ndarray]:
  return {f"memory.{k}": np.asarray(state[k])
          for k in ("memory_student", "memory_teacher", "z_student", "z_teacher")}


def _torch_bank_state(contrast) -> dict[str, np.ndarray]:
  return {k: v.numpy().copy() for k, v in contrast.state_dict().items() if k.startswith("memory.")}


# ---------------------------------------------------------------------------------------------
# Losses and gradients.


# N = 64: scores from all N dot products (K D > N); N = 512: from gathered bank rows.
# 'first': Z is computed from this batch; 'frozen': the state after one earlier loss call.
@pytest.mark.parametrize("num_examples", [64, 512])
@pytest.mark.parametrize("normalizer", ["first", "frozen"])
def test_gacd_loss_gradients_and_state_match_pytorch(num_examples, normalizer):
  setup = Setup(num_examples)
  method = _gacd()
  method_params, state = method.init(jax.random.key(3), setup.info())
  if normalizer == "frozen":
    _, _, state, _ = _jax_loss_and_grads(setup, method, setup.batch["image"], method_params,
                                         state, jax.random.key(4))
    assert float(state["z_student"]) > 0 and float(state["z_teacher"]) > 0
  rng = jax.random.key(5)
  loss, grads, new_state, batch_stats = _jax_loss_and_grads(setup, method, setup.x_adv,
                                                            method_params, state, rng)
  # The negatives the JAX loss drew (its Estimator.sample with the context's key), given to
  # PyTorch explicitly.
  contrast_index = contrastive.sample_contrast_index(
      rng, state, setup.batch["index"], setup.batch["label"], NUM_NEGATIVES)

  contrast = torch_crd.ContrastiveDistillation(4 * STUDENT_WIDTH, 4 * TEACHER_WIDTH,
                                               num_examples, FEAT_DIM)
  contrast.load_gacd_jax(method_params, state)
  with torch.no_grad():
    teacher_logits, teacher_features = setup.teacher_t(setup.x_t)
  setup.student_t.train()
  loss_t = torch_steps.gacd_loss(
      setup.student_t, contrast, setup.x_adv_t, setup.y_t, setup.index_t,
      torch.from_numpy(np.array(contrast_index)).long(), teacher_logits, teacher_features)
  loss_t.backward()

  assert _relative_error(loss, loss_t.item()) <= RTOL
  _assert_close(_as_torch({"params": grads["student"]}), _torch_grads(setup.student_t),
                "student gradient")
  _assert_close(_as_torch({"params": grads["method"]}), _torch_grads(contrast), "head gradient")
  _assert_close(_bank_state(new_state), _torch_bank_state(contrast), "memory banks and Z")
  _assert_close(_as_torch({"batch_stats": batch_stats}), _running_stats(setup.student_t),
                "BatchNorm statistics")


# ARD's own settings (T = 30, alpha = 1), and a clean CE term with ARD's 'mean' KL reduction.
@pytest.mark.parametrize("alpha,temperature,kl_reduction",
                         [(1.0, 30.0, "batchmean"), (0.9, 4.0, "mean")])
@pytest.mark.filterwarnings("ignore:reduction. 'mean':UserWarning")  # ARD's own choice
def test_ard_loss_and_gradients_match_pytorch(alpha, temperature, kl_reduction):
  setup = Setup()
  method = _method("ard", alpha=alpha, temperature=temperature, kl_reduction=kl_reduction)
  loss, grads, _, batch_stats = _jax_loss_and_grads(setup, method, setup.x_adv)

  with torch.no_grad():
    teacher_logits, _ = setup.teacher_t(setup.x_t)
  setup.student_t.train()
  loss_t = torch_steps.ard_loss(setup.student_t, setup.x_t, setup.y_t, setup.x_adv_t,
                                teacher_logits, alpha=alpha, temperature=temperature,
                                kl_reduction=kl_reduction)
  loss_t.backward()

  # At T = 30 the KL is ~1e-5 of the log-probabilities whose difference it is, so float32 (either
  # framework; each is ~1e-3 off a float64 evaluation) resolves it only to about one ulp of
  # those, times T^2. The gradient, T (q - p), has no such cancellation.
  log_p = torch.log_softmax(teacher_logits / temperature, dim=1)
  resolution = temperature**2 * float(np.spacing(np.float32(log_p.abs().max())))
  assert abs(loss - loss_t.item()) <= max(RTOL * abs(loss_t.item()), resolution)
  _assert_close(_as_torch({"params": grads["student"]}), _torch_grads(setup.student_t),
                "student gradient")
  _assert_close(_as_torch({"batch_stats": batch_stats}), _running_stats(setup.student_t),
                "BatchNorm statistics")


# ---------------------------------------------------------------------------------------------
# PGD.


def _noisy_elements(objective, x: "torch.Tensor", steps: int) -> np.ndarray:
  """`[B, H, W, C]` True where the input gradient was float noise at some iterate of PGD."""
  noisy = torch.zeros_like(x, dtype=torch.bool)
  for k in range(steps):
    x_k = torch_attacks.pgd(objective, x, eps=EPS, step_size=STEP_SIZE, steps=k, start="none")
    x_k.requires_grad_()
    grad = torch.autograd.grad(objective(x_k).sum(), [x_k])[0].abs()
    noisy |= grad < GRAD_NOISE * grad.amax(dim=(1, 2, 3), keepdim=True)
  return torch_convert.nchw_to_nhwc(noisy.numpy())


@pytest.mark.parametrize("objective", ["cross_entropy", "gacd_guided"])
def test_pgd_from_the_clean_input_matches_pytorch(objective):
  setup = Setup()
  setup.student_t.eval()
  if objective == "cross_entropy":
    apply = lambda x: setup.student.apply(setup.student_vars, x, train=False)[0]
    objective_jax = attacks.cross_entropy_objective(apply, setup.batch["label"])
    objective_t = torch_attacks.cross_entropy_objective(setup.student_t, setup.y_t)
  else:
    method = _gacd()
    method_params, state = method.init(jax.random.key(3), setup.info())
    rng = jax.random.key(6)
    student = train.attack_forward(setup.student, setup.student_vars["params"],
                                   setup.student_vars["batch_stats"], "eval")
    objective_jax = method.objective(setup.context(student, method_params, state, rng))
    contrast_index = contrastive.sample_contrast_index(
        rng, state, setup.batch["index"], setup.batch["label"], NUM_NEGATIVES)
    contrast = torch_crd.ContrastiveDistillation(4 * STUDENT_WIDTH, 4 * TEACHER_WIDTH,
                                                 len(setup.train_labels), FEAT_DIM)
    contrast.load_gacd_jax(method_params, state)
    with torch.no_grad():
      _, teacher_features = setup.teacher_t(setup.x_t)
    objective_t = torch_steps.gacd_objective(
        setup.student_t, contrast, teacher_features, setup.index_t,
        torch.from_numpy(np.array(contrast_index)).long())

  x_adv = jax.jit(lambda x: attacks.pgd(objective_jax, x, eps=EPS, step_size=STEP_SIZE,
                                        steps=PGD_STEPS, start="none"))(setup.batch["image"])
  x_adv_t = torch_attacks.pgd(objective_t, setup.x_t, eps=EPS, step_size=STEP_SIZE,
                              steps=PGD_STEPS, start="none")
  x_adv_t = torch_convert.nchw_to_nhwc(x_adv_t.numpy())

  noisy = _noisy_elements(objective_t, setup.x_t, PGD_STEPS)
  assert noisy.mean() < 0.01  # the comparison below covers nearly every element
  difference = np.abs(np.asarray(x_adv) - x_adv_t)
  assert difference[~noisy].max() <= PGD_ATOL
  assert np.abs(np.asarray(x_adv) - np.asarray(setup.batch["image"])).max() > EPS / 2


# ---------------------------------------------------------------------------------------------
# A whole step.


def _whole_step(setup: Setup, method, method_params=None, method_state=None):
  """(jitted `make_step` of `method` with PGD-10 from the clean input, its initial state, the
  optimizer config both sides use)."""
  cfg = config_lib.default()
  cfg.optim.schedule = "constant"
  tx = train.make_optimizer(cfg.optim, steps_per_epoch=1, total_steps=2)
  attack = train.AttackSettings(eps=EPS, step_size=STEP_SIZE, steps=PGD_STEPS, norm="linf",
                                start="none", bn_mode="eval", unroll=True)
  step = jax.jit(train.make_step(setup.student, method, tx, attack, setup.teacher,
                                 crop_padding=0, flip=False))
  params = {"student": setup.student_vars["params"], "method": method_params or {}}
  state = dict(step=jnp.zeros((), jnp.int32), params=params,
               batch_stats=setup.student_vars["batch_stats"], opt_state=tx.init(params),
               method_state=method_state or {})
  return step, state, cfg.optim


def test_two_gacd_steps_match_pytorch():
  """make_step against `gacd_step`: the attack starts at the clean input and every sample's
  negatives are all the examples of other classes (a balanced set with K = N - N / C), so both
  sides draw the same set in different orders and the NCE sums do not depend on the order."""
  num_examples = 4 * NUM_CLASSES
  num_negatives = num_examples - num_examples // NUM_CLASSES
  setup = Setup(num_examples, balanced=True)
  method = _gacd(num_negatives)
  method_params, method_state = method.init(jax.random.key(3), setup.info())
  step, state, optim = _whole_step(setup, method, method_params, method_state)

  contrast = torch_crd.ContrastiveDistillation(4 * STUDENT_WIDTH, 4 * TEACHER_WIDTH,
                                               num_examples, FEAT_DIM)
  contrast.load_gacd_jax(method_params, method_state)
  optimizer = torch_steps.sgd(list(setup.student_t.parameters()) + list(contrast.parameters()),
                              lr=optim.lr, momentum=optim.momentum,
                              weight_decay=optim.weight_decay)
  sampler = torch_crd.NegativeSampler(setup.train_labels, num_negatives)
  torch_attack = torch_steps.AttackSettings(EPS, STEP_SIZE, PGD_STEPS, start="none")
  student_before = _numpy_state(setup.student_t)
  heads_before = _numpy_state(contrast, parameters_only=True)

  for _ in range(2):
    state, metrics = step(state, setup.teacher_vars, setup.batch, jax.random.key(7))
    loss_t = torch_steps.gacd_step(
        setup.student_t, setup.teacher_t, contrast, optimizer, setup.x_t, setup.y_t,
        setup.index_t, sampler(setup.index_t, setup.y_t), sampler(setup.index_t, setup.y_t),
        torch_attack)
    assert _relative_error(metrics["loss"], loss_t) <= RTOL

  # The updates, not the parameters: these are small next to the parameters themselves.
  student_after = _as_torch({"params": state["params"]["student"],
                             "batch_stats": state["batch_stats"]})
  _assert_close(_minus(student_after, student_before),
                _minus(_numpy_state(setup.student_t), student_before), "student updates")
  _assert_close(_minus(_as_torch({"params": state["params"]["method"]}), heads_before),
                _minus(_numpy_state(contrast, parameters_only=True), heads_before),
                "head updates")
  _assert_close(_bank_state(state["method_state"]), _torch_bank_state(contrast),
                "memory banks and Z after two steps")


def test_two_rslad_steps_match_pytorch():
  """make_step against `rslad_step` (zibojia/RSLAD's step; the benchmark's PyTorch side): the
  attack on the KL starts at the clean input, the loss averages the KL over batch x classes."""
  setup = Setup()
  step, state, optim = _whole_step(setup, _method("rslad", kl_reduction="mean"))
  optimizer = torch_steps.sgd(setup.student_t.parameters(), lr=optim.lr,
                              momentum=optim.momentum, weight_decay=optim.weight_decay)
  torch_attack = torch_steps.AttackSettings(EPS, STEP_SIZE, PGD_STEPS, start="none")
  before = _numpy_state(setup.student_t)
  for _ in range(2):
    state, metrics = step(state, setup.teacher_vars, setup.batch, jax.random.key(7))
    loss_t = torch_steps.rslad_step(setup.student_t, setup.teacher_t, optimizer, setup.x_t,
                                    torch_attack)
    assert _relative_error(metrics["loss"], loss_t) <= RTOL
  after = _as_torch({"params": state["params"]["student"], "batch_stats": state["batch_stats"]})
  _assert_close(_minus(after, before), _minus(_numpy_state(setup.student_t), before),
                "student updates")
