"""Training: the pure step, the optimizer, and the loop that checkpoints, logs and resumes.

The train state is a plain dict pytree:
  step          int32 scalar
  params        {'student': student params, 'method': the method's own trainable params}
  batch_stats   the student's BatchNorm statistics
  opt_state     optax state over `params`
  method_state  what the method carries between steps (e.g. memory banks)
The teacher's variables are a separate, frozen argument of the step: never in the optimizer,
never checkpointed with the student.
"""

import dataclasses
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from ml_collections import ConfigDict

from gacd_jax import attacks
from gacd_jax import checkpoints
from gacd_jax import config as config_lib
from gacd_jax import data
from gacd_jax import errors
from gacd_jax import feed
from gacd_jax import losses
from gacd_jax import methods
from gacd_jax import models
from gacd_jax import rundir
from gacd_jax import runtime
from gacd_jax import sharding
from gacd_jax.methods import Context, InitInfo, Method

PyTree = Any
State = dict[str, Any]

class NonFiniteError(errors.GacdError):
  """The loss, the gradient or the state became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# The pure step.


class StudentForward:
  """`x -> (logits, features)` in train mode, threading BatchNorm statistics through calls.

  Each call uses the statistics left by the previous one, like consecutive PyTorch forwards in
  train mode; a call with `update_stats=False` normalises by its batch's statistics as well but
  leaves the running ones as they were. It holds Python state only within one trace of the step;
  the step returns the final statistics, so the step itself stays pure.
  """

  def __init__(self, model, params: PyTree, batch_stats: PyTree):
    self._model = model
    self._params = params
    self.batch_stats = batch_stats

  def __call__(self, x: jax.Array, *, update_stats: bool = True):
    outputs, updates = self._model.apply(
        {"params": self._params, "batch_stats": self.batch_stats}, x, train=True,
        mutable=["batch_stats"])
    if update_stats:
      self.batch_stats = updates.get("batch_stats", self.batch_stats)
    return outputs


def attack_forward(model, params: PyTree, batch_stats: PyTree, bn_mode: str):
  """The student during the attack: running statistics ('eval') or batch statistics that are
  computed but not kept ('train')."""
  variables = {"params": params, "batch_stats": batch_stats}
  if bn_mode == "eval":
    return lambda x: model.apply(variables, x, train=False)
  return lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])[0]


@dataclasses.dataclass(frozen=True)
class AttackSettings:
  """The training attack, resolved from `config.attack` and the method's defaults."""
  eps: float
  step_size: float
  steps: int
  norm: str
  start: str
  bn_mode: str
  unroll: bool
  warmup_steps: int = 0  # eps and step size grow linearly to their values over these steps

  @classmethod
  def resolve(cls, attack_config: ConfigDict, method: Method,
              steps_per_epoch: int = 0) -> "AttackSettings":
    return cls(eps=attack_config.eps, step_size=attack_config.step_size,
               steps=attack_config.steps, norm=attacks.norm_name(attack_config.norm),
               start=method.attack_start if attack_config.start == "method" else
               attack_config.start,
               bn_mode=method.attack_bn if attack_config.bn_mode == "method" else
               attack_config.bn_mode,
               unroll=attack_config.unroll,
               warmup_steps=round(attack_config.eps_warmup_epochs * steps_per_epoch))

  def scale(self, step: jax.Array) -> jax.Array | float:
    """The fraction of eps and step size in force at train step `step` (0-based)."""
    if not self.warmup_steps:
      return 1.0
    return jnp.minimum(1.0, (step + 1).astype(jnp.float32) / self.warmup_steps)


def make_step(model, method: Method, tx: optax.GradientTransformation, attack: AttackSettings,
              teacher_model=None, *, crop_padding: int = 4, flip: bool = True) -> Callable:
  """The pure train step `(state, teacher_variables, batch, rng) -> (state, metrics)`.

  `batch` holds 'image' `[B, H, W, C]` in [0, 1], 'label' `[B]`, 'index' `[B]`; augmentation
  happens here, keyed by the step, so a resumed run sees the same crops. `rng` is the run's base
  key; the step folds in its step number. `metrics` are scalars: every loss term, accuracies,
  the gradient norm.
  """

  def teacher_forward(teacher_variables, x):
    # The variables, not the outputs, are frozen: an attack may differentiate through the teacher
    # with respect to its input (AdaAD), while no gradient ever reaches the teacher's parameters.
    return teacher_model.apply(jax.lax.stop_gradient(teacher_variables), x, train=False)

  def step(state: State, teacher_variables: PyTree, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state["step"])
    augment_rng, attack_rng, objective_rng, loss_rng = jax.random.split(rng, 4)
    images = data.augment(augment_rng, batch["image"], pad=crop_padding, flip=flip)
    batch = dict(batch, image=images)

    teacher = teacher_clean = None
    if method.uses_teacher:
      teacher = lambda x: teacher_forward(teacher_variables, x)
      teacher_clean = jax.lax.stop_gradient(teacher(images))

    def context(student, params, rng_):
      return Context(student=student, teacher=teacher, teacher_clean=teacher_clean, batch=batch,
                     params=params, state=state["method_state"], rng=rng_, step=state["step"])

    x_adv = None
    if method.objective is not None:
      student = attack_forward(model, state["params"]["student"], state["batch_stats"],
                               attack.bn_mode)
      objective = method.objective(context(student, state["params"]["method"], objective_rng))
      scale = attack.scale(state["step"])
      x_adv = attacks.pgd(objective, images, attack_rng, eps=attack.eps * scale,
                          step_size=attack.step_size * scale, steps=attack.steps, norm=attack.norm,
                          start=attack.start, unroll=attack.unroll)

    def loss_fn(params):
      student = StudentForward(model, params["student"], state["batch_stats"])
      loss, metrics, method_state = method.loss(
          context(student, params["method"], loss_rng), x_adv)
      return loss, (metrics, method_state, student.batch_stats)

    (loss, (metrics, method_state, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)

    metrics = dict(metrics)
    for kind in ("clean", "adv"):
      logits = metrics.pop(f"logits_{kind}", None)
      if logits is not None:
        metrics[f"{kind}_acc"] = losses.accuracy(logits, batch["label"])
    grad_norm = optax.tree.norm(grads)
    metrics.update(loss=loss, grad_norm=grad_norm)
    new_state = dict(step=state["step"] + 1, params=params, batch_stats=batch_stats,
                     opt_state=opt_state, method_state=method_state)
    metrics["nonfinite"] = nonfinite_code(loss, grad_norm, new_state)
    return new_state, metrics

  return step


# What `nonfinite_code` checks, in order: code i + 1 names NONFINITE_GROUPS[i].
NONFINITE_GROUPS = (("loss", "the loss"), ("grad_norm", "the gradient norm"),
                    ("params", "the parameters"), ("batch_stats", "the BatchNorm statistics"),
                    ("opt_state", "the optimizer state"), ("method_state", "the method state"))


def nonfinite_code(loss: jax.Array, grad_norm: jax.Array, state: State) -> jax.Array:
  """0 if the loss, the gradient norm and every floating-point leaf of `state` are finite, else
  1 + the index in `NONFINITE_GROUPS` of the first group that is not: an int32 scalar.

  Everything a checkpoint holds is covered, so the host needs to read only this scalar (with the
  metrics it reads anyway) to know that a state is safe to save.
  """
  def finite(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True
  flags = jnp.stack([finite(loss), finite(grad_norm)] +
                    [finite(state[group]) for group, _ in NONFINITE_GROUPS[2:]])
  return jnp.where(jnp.all(flags), 0, jnp.argmin(flags) + 1).astype(jnp.int32)


def jit_step(step: Callable, mesh) -> Callable:
  """One `jax.jit` over the mesh: batch split on `data`, everything else replicated, the state
  donated."""
  replicated = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, replicated, sharding.batch_sharding(mesh),
                                     replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Optimizer and state.


def learning_rate(optim_config: ConfigDict, steps_per_epoch: int, total_steps: int):
  lr = optim_config.lr
  if optim_config.schedule == "constant":
    return optax.constant_schedule(lr)
  if optim_config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, decay_steps=total_steps)
  boundaries = {int(epoch * steps_per_epoch): optim_config.decay_factor
                for epoch in optim_config.milestones}
  return optax.piecewise_constant_schedule(lr, boundaries)


def make_optimizer(optim_config: ConfigDict, steps_per_epoch: int,
                   total_steps: int) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (the gradient gets `wd * param` before momentum),
  as `torch.optim.SGD(weight_decay=...)` does."""
  return optax.chain(
      optax.add_decayed_weights(optim_config.weight_decay),
      optax.sgd(learning_rate(optim_config, steps_per_epoch, total_steps),
                momentum=optim_config.momentum or None, nesterov=optim_config.nesterov))


def init_state(rng: jax.Array, model, method: Method, tx, image_shape: tuple[int, ...],
               info: InitInfo) -> State:
  model_rng, method_rng = jax.random.split(rng)
  variables = model.init(model_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  method_params, method_state = method.init(method_rng, info)
  params = {"student": variables["params"], "method": method_params}
  return dict(step=jnp.zeros((), jnp.int32), params=params,
              batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
              method_state=method_state)


# ---------------------------------------------------------------------------------------------
# The teacher.


@dataclasses.dataclass(frozen=True)
class Teacher:
  model: Any
  variables: PyTree
  num_classes: int
  feature_dim: int
  record: dict  # what run.json records: path, architecture, content hash


def load_teacher(config: ConfigDict, image_shape: tuple[int, ...]) -> Teacher:
  """Load and check the teacher named by `config.teacher`."""
  workdir = config.teacher.workdir
  if not workdir:
    raise errors.ConfigError(
        f"method {config.method.name!r} distils from a teacher: set --config.teacher.workdir to "
        "a run directory (train one, e.g. with --config.method.name=pgd_at, or convert a PyTorch "
        "checkpoint with `gacd-jax import-teacher`)")
  teacher_config = checkpoints.read_config(workdir)
  expected = config.teacher.model
  if expected and teacher_config.model.name != expected:
    raise errors.CheckpointError(
        f"the teacher in {workdir} is a {teacher_config.model.name}, but config.teacher.model "
        f"says {expected!r}; point --config.teacher.workdir at a {expected} run or change "
        "config.teacher.model")
  module, variables = checkpoints.load_model(workdir)
  info = checkpoints.read_run_info(workdir)
  if tuple(info["image_shape"])[-1] != image_shape[-1]:
    raise errors.ConfigError(
        f"the teacher in {workdir} takes {info['image_shape'][-1]}-channel images but the data "
        f"has {image_shape[-1]} channels; set config.data.channels to match")
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  _, features = jax.eval_shape(lambda x: module.apply(variables, x, train=False), x)
  record = {"workdir": str(pathlib.Path(workdir).absolute()), "model": teacher_config.model.name,
            "sha256": checkpoints.content_hash(variables)}
  return Teacher(module, variables, info["num_classes"], int(features.shape[-1]), record)


def _check_teacher_classes(config: ConfigDict, step: Callable, abstract_state: Any,
                           teacher: Teacher, source: data.Source) -> None:
  """A teacher of other classes than the data's suits only a loss that uses its features alone:
  trace the step once (nothing runs) to find out before anything is written."""
  example = source.get(np.arange(1))
  batch = {k: jax.ShapeDtypeStruct((config.train.batch_size, *v.shape[1:]), v.dtype)
           for k, v in example.items()}
  try:
    jax.eval_shape(step, abstract_state, teacher.variables, batch, jax.random.key(0))
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(
        f"the teacher in {config.teacher.workdir} predicts {teacher.num_classes} classes but "
        f"{config.data.name} has {source.num_classes}; method {config.method.name!r} compares the "
        "teacher's class probabilities with the student's, so it needs a teacher trained on the "
        "same classes (crd, or GACD's feature-only form, distils features alone)") from e


# ---------------------------------------------------------------------------------------------
# The loop.


def _progress(total: int, initial: int, desc: str, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
              disable=not enabled or jax.process_index() != 0)


def train(config: ConfigDict, workdir: str, *, overwrite: bool = False,
          progress: bool = True, stop_after: Optional[int] = None) -> dict[str, float]:
  """Train (or resume) the run in `workdir`; return the last logged metrics.

  Everything that can be checked (the config, the data, the teacher, the batch size against the
  dataset) is checked before anything is written; then the workdir is locked for the run
  (`checkpoints.writer_lock`), so a second `train` on it fails at once. A run is resumed only
  with the teacher it started with (the content hash run.json records). A resumed run continues
  from the newest checkpoint that verifies against its checksums (damaged newer ones are moved
  aside) and truncates the logs to that step. `stop_after` ends the loop after that global step
  (as if the process were killed there, but with a checkpoint); the next call resumes from it.
  """
  config_lib.validate(config)
  runtime.warn_if_slow_cpu()
  workdir = pathlib.Path(workdir)
  source = data.from_config(config.data, "train", seed=config.seed)
  mesh = sharding.make_mesh()
  global_batch = config.train.batch_size
  sharding.check_batch_size(global_batch, mesh)
  steps_per_epoch = data.steps_per_epoch(source.num_examples, global_batch)
  if not steps_per_epoch:
    raise errors.ConfigError(
        f"config.train.batch_size={global_batch} is larger than the {source.num_examples} "
        f"training examples of {config.data.name}, so an epoch has no step; lower it")
  total_steps = steps_per_epoch * config.train.epochs

  method = methods.build(config.method)
  dtype = config_lib.compute_dtype(config)
  store_conv_inputs = runtime.store_conv_inputs(jax.default_backend())
  model = models.build(config.model.name, source.num_classes, dtype=dtype,
                       store_conv_inputs=store_conv_inputs,
                       **config_lib.model_kwargs(config.model))
  teacher = load_teacher(config, source.image_shape) if method.uses_teacher else None
  teacher_model = (teacher.model.clone(dtype=dtype, store_conv_inputs=store_conv_inputs)
                   if teacher else None)

  tx = make_optimizer(config.optim, steps_per_epoch, total_steps)
  info = InitInfo(num_examples=source.num_examples, train_labels=all_labels(source),
                  steps_per_epoch=steps_per_epoch,
                  num_classes=source.num_classes,
                  student_feature_dim=models.feature_dim(model, source.image_shape),
                  teacher_feature_dim=teacher.feature_dim if teacher else None,
                  teacher_num_classes=teacher.num_classes if teacher else None)
  replicated = sharding.replicated(mesh)
  init = jax.jit(lambda rng: init_state(rng, model, method, tx, source.image_shape, info),
                 out_shardings=replicated)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  train_step = make_step(model, method, tx,
                         AttackSettings.resolve(config.attack, method, steps_per_epoch),
                         teacher_model, crop_padding=config.data.crop_padding,
                         flip=config.data.flip)
  if teacher and teacher.num_classes != source.num_classes:
    _check_teacher_classes(config, train_step, jax.eval_shape(init, init_rng), teacher, source)

  with checkpoints.writer_lock(workdir):
    rundir.prepare_workdir(workdir, config, overwrite, teacher.record if teacher else None)
    checkpoints.write_json(workdir / checkpoints.RUN_FILE, {
        "image_shape": list(source.image_shape), "num_classes": source.num_classes,
        "num_examples": source.num_examples, "steps_per_epoch": steps_per_epoch,
        "teacher": teacher.record if teacher else None, "environment": runtime.environment()})

    start_step = 0
    if checkpoints.latest_step(workdir) is not None:
      abstract = jax.eval_shape(init, init_rng)
      abstract = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
      start_step, state = checkpoints.restore(workdir, abstract, fall_back=True)
      logging.info("resuming %s from step %d", workdir, start_step)
    else:
      state = init(init_rng)
    teacher_variables = jax.device_put(teacher.variables, replicated) if teacher else None

    step_fn = jit_step(train_step, mesh)
    end_step = total_steps if stop_after is None else min(total_steps, stop_after)
    log = rundir.MetricsLog(workdir, start_step)
    last: dict[str, float] = {}
    pending: list[tuple[int, dict]] = []
    step = start_step
    bar = _progress(total_steps, start_step, f"train {config.method.name}", progress)
    # Read and put on the devices by a background thread, ahead of the steps (same order).
    batches = feed.prefetch(
        feed.train_stream(source, global_batch_size=global_batch, seed=config.seed,
                          start_step=step, process_index=jax.process_index(),
                          process_count=jax.process_count()),
        sharding.batch_sharding(mesh))
    try:
      with checkpoints.manager(workdir, config.train.keep_checkpoints) as mngr:
        tic, waited = time.perf_counter(), 0.0
        while step < end_step:
          state, metrics = step_fn(state, teacher_variables, next(batches), step_rng)
          pending.append((step, metrics))
          step += 1
          bar.update(1)
          save = step % config.train.checkpoint_every == 0 or step >= end_step
          # Metrics, with the step's non-finite check, are read before every save, so a
          # non-finite state is never checkpointed.
          if step % config.train.log_every == 0 or save:
            last = _flush(pending, log, bar, tic, batches.wait_seconds - waited)
            pending, tic, waited = [], time.perf_counter(), batches.wait_seconds
          if save:
            checkpoints.save(mngr, step, state)
        mngr.wait_until_finished()
    finally:
      batches.close()
      bar.close()
      log.close()
  return last


def all_labels(source: data.Source) -> np.ndarray:
  """The label of every example of `source`, by index: `[num_examples]` int32."""
  return source.labels().astype(np.int32)


def _flush(pending: list[tuple[int, dict]], log: rundir.MetricsLog, bar, tic: float,
           waited: float = 0.0) -> dict[str, float]:
  """Read the pending steps' metrics from the device, stop on a non-finite state, log the mean
  (and `input_wait`: the share of the wall time since `tic` spent waiting `waited` s for data)."""
  fetched = jax.device_get([m for _, m in pending])
  for (step, _), metrics in zip(pending, fetched):
    code = int(metrics.pop("nonfinite"))
    if code:
      key, quantity = NONFINITE_GROUPS[code - 1]
      value = f"{float(metrics[key])}" if key in metrics else "non-finite (nan or inf)"
      raise NonFiniteError(
          f"{quantity} became {value} at step {step + 1}; no checkpoint holds it. Lower "
          "config.optim.lr (optim.* may change when resuming) or check the data, then run the "
          "same command to resume from the last checkpoint")
  mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  elapsed = max(time.perf_counter() - tic, 1e-9)
  mean["steps_per_s"] = len(pending) / elapsed
  mean["input_wait"] = waited / elapsed
  log.write(pending[-1][0] + 1, mean)
  bar.set_postfix(loss=f"{mean['loss']:.3f}",
                  **{k: f"{mean[k]:.3f}" for k in ("clean_acc", "adv_acc") if k in mean})
  return mean
