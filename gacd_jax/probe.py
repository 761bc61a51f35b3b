"""Cross-task transfer: a linear probe on a run's frozen features, attacked end to end.

The run's backbone (everything up to the penultimate features) is frozen in eval mode; a softmax
regression on its features is trained on the train split of another dataset (e.g. a digits
student probed on 'synthetic', a CIFAR-10 student on STL-10 or CIFAR-100). The probe and the
backbone together are then one model, attacked through the backbone with the standard attacks, so
the robust accuracy measures how robust the transferred features are on the new task, not how
robust the probe is in feature space.
"""

import dataclasses
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from gacd_jax import analysis
from gacd_jax import checkpoints
from gacd_jax import config as config_lib
from gacd_jax import data
from gacd_jax import errors
from gacd_jax import evaluate
from gacd_jax import evaluator
from gacd_jax import losses
from gacd_jax import report


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """How the probe is trained: Adam with decoupled weight decay, on standardised features."""
  steps: int = 500
  learning_rate: float = 0.01
  weight_decay: float = 1e-4
  batch_size: int = 1024  # minibatch; the whole split when it is smaller
  feature_batch_size: int = 256  # examples per backbone call when extracting features

  def check(self) -> None:
    for name in ("steps", "batch_size", "feature_batch_size"):
      if getattr(self, name) <= 0:
        raise errors.ConfigError(f"probe {name} must be positive, got {getattr(self, name)}")
    if self.learning_rate <= 0 or self.weight_decay < 0:
      raise errors.ConfigError(
          f"the probe's learning rate must be positive and its weight decay non-negative, got "
          f"{self.learning_rate} and {self.weight_decay}")


def features_and_labels(module: Any, variables: Any, source: data.Source,
                        batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The backbone's penultimate features (eval mode) of every example of `source`.

  Returns:
    (float32 [N, D], int32 [N]).
  """
  out = evaluator.map_split(_Features(module), variables, source, batch_size=batch_size)[0]
  return out["features"], out["label"]


@dataclasses.dataclass(frozen=True)
class _Features:
  """The penultimate features of a batch, and its labels."""
  module: Any

  def __call__(self, variables, x, y, rng):
    return {"features": self.module.apply(variables, x, train=False)[1], "label": y}


def probe_logits(probe_params: dict[str, jax.Array], features: jax.Array) -> jax.Array:
  """Logits [B, C] of the probe on features [B, D]: standardise, then affine."""
  standardised = (features - probe_params["mean"]) / probe_params["scale"]
  return standardised @ probe_params["kernel"] + probe_params["bias"]


def end_to_end(module: Any) -> evaluate.ApplyFn:
  """`(variables, x) -> logits` of the probe on the backbone, for
  `variables = {'backbone': run variables, 'probe': probe params}` and x [B, H, W, C] in [0, 1];
  differentiable in x through the backbone."""
  return _EndToEnd(module)


@dataclasses.dataclass(frozen=True)
class _EndToEnd:
  """`end_to_end`, hashable, so the probes on equal backbones share their compilations."""
  module: Any

  def __call__(self, variables, x):
    _, features = self.module.apply(variables["backbone"], x, train=False)
    return probe_logits(variables["probe"], features)


def train_probe(features: np.ndarray, labels: np.ndarray, num_classes: int,
                settings: ProbeSettings, seed: int = 0) -> tuple[dict[str, jax.Array], float]:
  """Softmax regression on frozen features.

  Args:
    features: [N, D] training features.
    labels: [N] int labels in 0 .. num_classes - 1.
    num_classes: the probe's output width.
    settings: steps, learning rate, weight decay, minibatch size.
    seed: the minibatch sampling key.

  Returns:
    (probe params {'mean' [D], 'scale' [D], 'kernel' [D, C], 'bias' [C]}, training accuracy in
    [0, 1]).
  """
  settings.check()
  features = jnp.asarray(features, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  n, dim = features.shape
  std = features.std(axis=0)
  # Standardising makes one learning rate fit any backbone; the floor keeps features that barely
  # vary on the training data from being magnified (an attack could exploit them).
  frozen = {"mean": features.mean(axis=0), "scale": jnp.maximum(std, 1e-3 * std.max() + 1e-12)}
  # The problem is convex: a zero start is as good as any, and deterministic.
  trainable = {"kernel": jnp.zeros((dim, num_classes)), "bias": jnp.zeros((num_classes,))}
  tx = optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay)
  batch = min(settings.batch_size, n)

  def loss_fn(params, frozen, x, y):
    return losses.cross_entropy(probe_logits({**frozen, **params}, x), y).mean()

  # The features are arguments, not constants captured by the jit: they can be large.
  @jax.jit
  def fit(params, frozen, features, labels, rng):
    def step(carry, step_rng):
      params, opt_state = carry
      if batch == n:
        x, y = features, labels
      else:
        index = jax.random.randint(step_rng, (batch,), 0, n)
        x, y = features[index], labels[index]
      grads = jax.grad(loss_fn)(params, frozen, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)),
                                  jax.random.split(rng, settings.steps))
    return params

  params = {**frozen, **fit(trainable, frozen, features, labels, jax.random.key(seed))}
  accuracy = float((probe_logits(params, features).argmax(-1) == labels).mean())
  return params, accuracy


def run_probe(workdir: str, config: ConfigDict, out_dir: str,
              settings: ProbeSettings = ProbeSettings(),
              attacks: Sequence[str] = tuple(evaluate.ATTACK_LABELS),
              progress: bool = True) -> dict[str, Any]:
  """Probe the frozen features of the run in `workdir` on `config.data` and attack end to end.

  The probe trains on the train split of `config.data` and is evaluated on its test split under
  `attacks` (names of `evaluate.ATTACK_LABELS`) with `config.eval` (eps, steps, max_examples).
  Writes `probe.json` and `probe.md` into `out_dir`; a progress bar per attack unless not
  `progress`.

  Returns:
    What `probe.json` holds: the run, both datasets, the settings, `train_accuracy` and
    `accuracy` ({attack: accuracy in [0, 1]}).
  """
  config_lib.validate(config)
  settings.check()
  unknown = [a for a in attacks if a not in evaluate.ATTACK_LABELS]
  if unknown or not attacks:
    raise errors.ConfigError(f"unknown attacks {unknown}; use some of "
                             f"{', '.join(evaluate.ATTACK_LABELS)}")
  checkpoints.check_writable(out_dir, "--out")
  module, variables = checkpoints.load_model(workdir)
  train_source = evaluate.test_source(config, "train")
  test_source = evaluate.test_source(config)
  evaluate.check_channels(workdir, train_source)

  features, labels = features_and_labels(module, variables, train_source,
                                         settings.feature_batch_size)
  probe_params, train_accuracy = train_probe(features, labels, train_source.num_classes, settings,
                                             seed=config.seed)
  eval_settings = evaluate.EvalSettings.from_config(config.eval)
  name = pathlib.Path(workdir).name
  accuracy, seconds = evaluate.evaluate_model(
      end_to_end(module), {"backbone": variables, "probe": probe_params}, test_source,
      eval_settings, names=tuple(attacks), desc=f"probe {name}" if progress else None)

  run_config = checkpoints.read_config(workdir)
  result = {
      "workdir": str(workdir), "model": run_config.model.name,
      "trained_on": run_config.data.name, "probed_on": config.data.name,
      "image_shape": list(test_source.image_shape), "num_classes": test_source.num_classes,
      "eps": eval_settings.eps, "settings": dataclasses.asdict(settings),
      "train_accuracy": train_accuracy, "accuracy": accuracy}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  checkpoints.write_json(out / "probe.json", result)
  rows = [{"attack": evaluate.ATTACK_LABELS[k], "accuracy (%)": f"{100 * v:.2f}",
           "time (s)": f"{seconds[k]:.1f}"} for k, v in accuracy.items()]
  (out / "probe.md").write_text(
      f"# Linear probe on the frozen features of {workdir}\n\n"
      f"A {run_config.model.name} trained on {run_config.data.name}; a softmax regression on its "
      f"penultimate features trained on the {config.data.name} train split "
      f"({train_source.num_examples} examples, {settings.steps} Adam steps, weight decay "
      f"{settings.weight_decay:g}; training accuracy {100 * train_accuracy:.1f}%), then the probe "
      f"and the backbone attacked end to end on the test split (Linf eps = "
      f"{eval_settings.eps:.4f}). Chance: {100 / test_source.num_classes:.1f}%.\n\n"
      + report.markdown_table(rows) + "\n")
  return result
