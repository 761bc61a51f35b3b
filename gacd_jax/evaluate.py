"""Robustness evaluation: accuracy on the test (or validation) split under the standard attacks.

The model is in eval mode and deterministic; attacks with a random start use a fixed key, so two
evaluations of the same run agree. Every attack is one jit over the mesh (the test batch split on
`data`); the last batch is padded and masked.
"""

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from gacd_jax import attacks
from gacd_jax import autoattack
from gacd_jax import checkpoints
from gacd_jax import config as config_lib
from gacd_jax import data
from gacd_jax import errors
from gacd_jax import report
from gacd_jax import runtime
from gacd_jax import sharding

ApplyFn = Callable[[Any, jax.Array], jax.Array]  # (variables, x) -> logits
AttackFn = Callable[[Callable[[jax.Array], jax.Array], jax.Array, jax.Array, jax.Array, Any],
                    jax.Array]  # (logits_fn, x, y, rng, eps) -> x_adv

ATTACK_LABELS = {"clean": "clean", "fgsm": "FGSM", "pgd20": "PGD-20", "cw": "CW-inf"}
RESULT_LABELS = {**ATTACK_LABELS, "autoattack": "AutoAttack"}  # the keys of `evaluate_run`'s result


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  eps: float = 8 / 255
  pgd_steps: int = 20
  pgd_step_size: float = 2 / 255
  cw_steps: int = 30
  cw_step_size: float = 2 / 255
  batch_size: int = 256
  max_examples: int = 0

  @classmethod
  def from_config(cls, eval_config: ConfigDict) -> "EvalSettings":
    return cls(**{f.name: eval_config[f.name] for f in dataclasses.fields(cls)})


def attack_fn(name: str, settings: EvalSettings) -> AttackFn:
  """The named attack as `(logits_fn, x, y, rng, eps) -> x_adv`. Step sizes scale with eps
  relative to `settings.eps`, so an eps sweep keeps the step/eps ratio."""
  def scaled(step_size, eps):
    return step_size * eps / settings.eps if settings.eps else step_size

  if name == "clean":
    return lambda f, x, y, rng, eps: x
  if name == "fgsm":
    return lambda f, x, y, rng, eps: attacks.fgsm(attacks.cross_entropy_objective(f, y), x,
                                                  eps=eps)
  if name == "pgd20":
    return lambda f, x, y, rng, eps: attacks.pgd(
        attacks.cross_entropy_objective(f, y), x, rng, eps=eps,
        step_size=scaled(settings.pgd_step_size, eps), steps=settings.pgd_steps,
        start="uniform", unroll=False)
  if name == "cw":
    return lambda f, x, y, rng, eps: attacks.pgd(
        attacks.margin_objective(f, y), x, rng, eps=eps,
        step_size=scaled(settings.cw_step_size, eps), steps=settings.cw_steps,
        start="uniform", unroll=False)
  raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACK_LABELS)}")


def robust_accuracy(apply_fn: ApplyFn, variables: Any, source: data.Source, attack: AttackFn,
                    *, eps: float | list[float], batch_size: int, mesh=None,
                    max_examples: int = 0, seed: int = 0, desc: str = "") -> list[float]:
  """Accuracy of `apply_fn` on `source` under `attack`, for each eps (one pass over the data).

  Returns one accuracy in [0, 1] per eps.
  """
  eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
  for e in eps_list:
    attacks.check_eps(float(e))
  mesh = mesh or sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh, "eval.batch_size")
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)

  @jax.jit
  def correct(variables, x, y, mask, rng, eps):
    logits_fn = lambda xx: apply_fn(variables, xx)
    x_adv = attack(logits_fn, x, y, rng, eps)
    hits = (logits_fn(x_adv).argmax(-1) == y) & mask
    return hits.sum(), mask.sum()

  variables = jax.device_put(variables, replicated)
  rng = jax.random.key(seed)
  totals = [0] * len(eps_list)
  count = 0
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  batches = data.eval_batches(source, global_batch_size=batch_size,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  n_batches = -(-source.num_examples // batch_size)
  if max_examples:
    n_batches = min(n_batches, -(-max_examples // batch_size))
  for i, batch in enumerate(tqdm(batches, total=n_batches, desc=desc or "eval", leave=False,
                                 disable=jax.process_index() != 0)):
    if i == n_batches:
      break
    if max_examples:  # cut the last batch to exactly max_examples
      batch["mask"] = batch["mask"] & (batch["index"] < max_examples)
    g = data.to_global(batch, batch_sharding)
    batch_rng = jax.random.fold_in(rng, i)
    for j, e in enumerate(eps_list):
      hits, real = correct(variables, g["image"], g["label"], g["mask"], batch_rng,
                           jnp.float32(e))
      totals[j] += hits
    count += real  # over all hosts' slices of the batch
  count = int(count)
  return [float(t) / max(count, 1) for t in totals]


def evaluate_model(apply_fn: ApplyFn, variables: Any, source: data.Source,
                   settings: EvalSettings, *, names=tuple(ATTACK_LABELS), mesh=None,
                   desc: str = "") -> tuple[dict[str, float], dict[str, float]]:
  """Accuracy under each named attack at `settings.eps`: `(accuracies, seconds per attack)`."""
  results, seconds = {}, {}
  for name in names:
    tic = time.perf_counter()
    results[name] = robust_accuracy(
        apply_fn, variables, source, attack_fn(name, settings), eps=settings.eps,
        batch_size=settings.batch_size, mesh=mesh, max_examples=settings.max_examples,
        desc=f"{desc} {ATTACK_LABELS[name]}".strip())[0]
    seconds[name] = time.perf_counter() - tic
  return results, seconds


def eps_curve(apply_fn: ApplyFn, variables: Any, source: data.Source, settings: EvalSettings,
              eps_values, *, mesh=None, desc: str = "") -> list[float]:
  """PGD accuracy at each eps (step size scaled with eps)."""
  return robust_accuracy(apply_fn, variables, source, attack_fn("pgd20", settings),
                         eps=list(eps_values), batch_size=settings.batch_size, mesh=mesh,
                         max_examples=settings.max_examples, desc=f"{desc} eps sweep".strip())


def logits_fn(module) -> ApplyFn:
  return lambda variables, x: module.apply(variables, x, train=False)[0]


def check_channels(workdir: str, source: data.Source) -> None:
  """A model runs on any image size (global pooling) but not on another channel count."""
  channels = checkpoints.read_run_info(workdir)["image_shape"][-1]
  if channels != source.image_shape[-1]:
    raise errors.ConfigError(
        f"the model in {workdir} takes {channels}-channel images but {source.name} has "
        f"{source.image_shape[-1]}; set config.data.channels={channels}")


def check_classes(workdir: str, source: data.Source) -> None:
  """Accuracy is only meaningful on the labels the model predicts: the same number of classes."""
  num_classes = checkpoints.read_run_info(workdir)["num_classes"]
  if num_classes != source.num_classes:
    raise errors.ConfigError(
        f"the model in {workdir} predicts {num_classes} classes but {source.name} "
        f"{source.split} has {source.num_classes}; evaluate on the data the model was trained "
        "on (its config.json), e.g. with the same config.data.classes")


def test_source(config: ConfigDict, split: str = "") -> data.Source:
  """The split of `config.data` that evaluation reads: `split`, else `config.eval.split`."""
  return data.from_config(config.data, split or config.eval.split, seed=config.seed)


AUTOATTACK_LABELS = {"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T",
                     "fab": "FAB", "fab-t": "FAB-T", "square": "Square"}


def test_arrays(source: data.Source, max_examples: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The first `max_examples` (0: all) images and labels of `source` as host arrays."""
  batch = source.get(np.arange(_n_examples(source, max_examples)))
  return batch["image"], batch["label"]


def run_autoattack(apply_fn: ApplyFn, variables: Any, source: data.Source, config: ConfigDict,
                   *, progress: bool = True) -> autoattack.Evaluation:
  """AutoAttack (version `config.eval.suite`) on the test examples `config.eval` selects."""
  if jax.process_count() > 1:
    raise errors.ConfigError(
        "AutoAttack in `evaluate` runs in one process; evaluate without --distributed (one "
        "host's devices), or call gacd_jax.autoattack.evaluate on each host's share")
  x, y = test_arrays(source, config.eval.max_examples)
  return autoattack.evaluate(
      apply_fn, x, y, params=variables, eps=config.eval.eps, norm="linf",
      version=config.eval.suite, batch_size=config.eval.batch_size, seed=config.seed,
      n_iter=config.eval.autoattack_n_iter, n_queries=config.eval.autoattack_n_queries,
      progress=progress)


def evaluate_run(config: ConfigDict, workdir: str, *, curve: bool = False,
                 progress: bool = True) -> dict[str, Any]:
  """Evaluate the run in `workdir` on the split `config.eval.split` of `config.data`.

  Runs clean, FGSM, PGD-20 and CW-inf, then AutoAttack if `config.eval.suite` names a version
  ('fast', 'standard', 'plus'). Writes into the workdir `eval.json` (accuracies in [0, 1] and
  seconds per attack, and AutoAttack's accuracy after each of its attacks) and `report.md` (the
  table, with the time per attack); on the validation split `eval-validation.json` and
  `report-validation.md`, so the two never overwrite each other. Returns the accuracies by attack
  name ('autoattack' for the ensemble; with `curve`, also the PGD accuracy per eps of
  `config.eval.eps_curve` under 'eps_curve').
  """
  config_lib.validate(config)
  module, variables = checkpoints.load_model(
      workdir, store_conv_inputs=runtime.store_conv_inputs(jax.default_backend()))
  source = test_source(config)
  check_channels(workdir, source)
  check_classes(workdir, source)
  if jax.process_index() == 0:  # before the attacks run, not when their results are written
    checkpoints.check_writable(workdir, "--workdir")
  settings = EvalSettings.from_config(config.eval)
  workdir = pathlib.Path(workdir)
  name = workdir.name
  accuracy, seconds = evaluate_model(logits_fn(module), variables, source, settings, desc=name)
  rows = [{"attack": ATTACK_LABELS[k], "accuracy (%)": f"{100 * v:.2f}",
           "time (s)": f"{seconds[k]:.1f}"} for k, v in accuracy.items()]
  summary: dict[str, Any] = {"suite": config.eval.suite, "eps": settings.eps,
                             "examples": _n_examples(source, settings.max_examples)}
  if config.eval.suite != "basic":
    result = run_autoattack(logits_fn(module), variables, source, config, progress=progress)
    accuracy["autoattack"] = result.robust_accuracy
    seconds["autoattack"] = sum(result.seconds.values())
    summary["autoattack"] = {"version": result.version, "clean": result.clean_accuracy,
                             "accuracy_after": result.accuracy_after, "seconds": result.seconds}
    rows.append({"attack": f"AutoAttack ({result.version})",
                 "accuracy (%)": f"{100 * result.robust_accuracy:.2f}",
                 "time (s)": f"{seconds['autoattack']:.1f}"})
    rows += [{"attack": f"- after {AUTOATTACK_LABELS[k]}", "accuracy (%)": f"{100 * v:.2f}",
              "time (s)": f"{result.seconds[k]:.1f}"} for k, v in result.accuracy_after.items()]
  summary["split"] = config.eval.split
  checkpoints.write_json(workdir / results_file(config.eval.split),
                         {"accuracy": accuracy, "seconds": seconds, **summary})
  report_name = "report.md" if config.eval.split == "test" else f"report-{config.eval.split}.md"
  (workdir / report_name).write_text(
      f"# Evaluation of {workdir}\n\n{config.data.name} {config.eval.split} split "
      f"({summary['examples']} examples), eps = {settings.eps:.4f} (Linf), {config.model.name}, "
      f"model in eval mode\n\n" + report.markdown_table(rows) + "\n")
  out: dict[str, Any] = dict(accuracy)
  if curve:
    out["eps_curve"] = eps_curve(logits_fn(module), variables, source, settings,
                                 config.eval.eps_curve, desc=name)
  return out


def _n_examples(source: data.Source, max_examples: int) -> int:
  return min(max_examples, source.num_examples) if max_examples else source.num_examples


def results_file(split: str) -> str:
  """The file `evaluate_run` writes its results of `split` to, inside the workdir."""
  return "eval.json" if split == "test" else f"eval-{split}.json"


def read_results(workdir: str, split: str = "test") -> Optional[dict]:
  """The accuracies `evaluate_run` wrote into `workdir` for `split`, or None if it has not run."""
  path = pathlib.Path(workdir) / results_file(split)
  return json.loads(path.read_text())["accuracy"] if path.exists() else None
