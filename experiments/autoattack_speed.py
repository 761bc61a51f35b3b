"""AutoAttack wall time: gacd_jax against the authors' package on the same model, inputs, threads.

  pip install pyautoattack==0.2.0
  python -m experiments.autoattack_speed --out experiments/results/autoattack_speed.md
  python -m experiments.benchmark --only autoattack      # the same, as a benchmark work item

Two models, the same weights on both sides (the largest logit difference is reported):
- resnet18: the CIFAR-10 ResNet-18 that the pyautoattack wheel ships (`examples/model_test.pt`,
  the pytorch-cifar layout), imported with `torch_convert.torch_to_flax`. The inputs are `--n`
  uniform random 32x32 images labelled by the model itself, so every one is attacked (no CIFAR-10
  images can be had offline here). At eps 8/255 the model (not robustly trained) loses every
  image; at 0.4/255 most survive APGD-CE, the case where the work on the examples left decides.
- digits: the PGD-AT small_cnn of `experiments/autoattack_crosscheck.py` (trained once into
  `--workdir`, reused after), on the 355 test digits at its eps.

Protocol, per row: gacd_jax's first call as a user makes it (through the Python API after
`runtime.configure()`'s XLA flags, with a model function it has not compiled yet and, unless
`--cache DIR`, no persistent compilation cache, so the call compiles everything it needs), then
`--repeats` rounds of pyautoattack and gacd_jax interleaved. 'compile' is the first call minus
the median of gacd_jax's later calls (which reuse the compiled attacks); the speed-up 'incl.
compile' divides pyautoattack's median by gacd_jax's first call, 'steady' by its median.

A second table times the attacks' unit of work alone: one input-gradient step of the model (the
cross-entropy's gradient with respect to a batch of images, what every APGD iteration computes),
jitted in JAX with the parameters as an argument, `torch.autograd.grad` in PyTorch, interleaved.
Where most examples survive, APGD's time is ~101 such steps on both sides, so this ratio bounds
what any AutoAttack implementation can gain on these CPUs.
"""

import argparse
import pathlib
import time
from typing import Callable, NamedTuple, Optional

from gacd_jax import runtime

# `runtime.configure()` without the persistent compilation cache (`--cache` turns it on): a
# user's first run, which compiles everything.
runtime.set_xla_flags()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pyautoattack  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import autoattack_crosscheck  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.pytorch_baseline import models as torch_models  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import autoattack  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import demo  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import torch_convert  # pylint: disable=g-import-not-at-top,wrong-import-position

WEIGHTS = pathlib.Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"


class Row(NamedTuple):
  label: str
  model: str                       # 'resnet18' or 'digits'
  version: str
  attacks: Optional[tuple[str, ...]]
  examples: Optional[int]          # the first this many inputs (None: all)
  eps: float


# Standard on the ResNet-18 on a reduced set: Square's 5000 queries take hours on a CPU where
# images survive.
ROWS = (Row("APGD-CE", "resnet18", "custom", ("apgd-ce",), None, 8 / 255),
        Row("fast", "resnet18", "fast", None, None, 8 / 255),
        Row("standard", "resnet18", "standard", None, 8, 8 / 255),
        Row("APGD-CE-0.4", "resnet18", "custom", ("apgd-ce",), None, 0.4 / 255),
        Row("fast-0.4", "resnet18", "fast", None, 16, 0.4 / 255),
        Row("digits-APGD-CE", "digits", "custom", ("apgd-ce",), None, demo.DIGITS_EPS),
        Row("digits-fast", "digits", "fast", None, None, demo.DIGITS_EPS),
        Row("digits-standard", "digits", "standard", None, None, demo.DIGITS_EPS))


class Model(NamedTuple):
  net: torch.nn.Module             # logits, NCHW in
  build_apply: Callable            # () -> a new `(variables, x) -> logits` (not yet compiled)
  variables: dict
  x: np.ndarray                    # NHWC
  y: np.ndarray


def apply_builder(module) -> Callable:
  """`() -> (variables, x) -> logits` of `module` in eval mode, a new function at every call."""
  return lambda: lambda v, x: module.apply(v, x, train=False)[0]


def resnet18(n: int) -> Model:
  """The wheel's ResNet-18 and `n` random images labelled by it."""
  state = torch_convert.read_torch_checkpoint(WEIGHTS)
  net = torch_models.build("resnet18", 10)
  net.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
  variables = torch_convert.torch_to_flax("resnet18", state, 10)
  module = models.build("resnet18", 10, store_conv_inputs=runtime.store_conv_inputs(
      jax.default_backend()))
  build_apply = apply_builder(module)
  x = np.random.default_rng(0).uniform(0, 1, (n, 32, 32, 3)).astype(np.float32)
  y = np.asarray(jax.jit(build_apply())(variables, x)).argmax(1).astype(np.int64)
  return Model(torch_models.LogitsOnly(net), build_apply, variables, x, y)


def digits(workdir: str, epochs: int) -> Model:
  """The cross-check's PGD-AT small_cnn and the digits test split."""
  module, variables = autoattack_crosscheck.train_model(pathlib.Path(workdir), epochs)
  batch = data.build("digits", "test", image_size=8, channels=1).get(np.arange(355))
  build_apply = apply_builder(module)
  return Model(autoattack_crosscheck.torch_model(variables), build_apply, variables,
               batch["image"], batch["label"].astype(np.int64))


def logit_gap(model: Model) -> float:
  logits = np.asarray(jax.jit(model.build_apply())(model.variables, model.x))
  with torch.no_grad():
    theirs = model.net(torch.from_numpy(torch_convert.nhwc_to_nchw(model.x))).numpy()
  return float(np.abs(theirs - logits).max())


def official(net, x: np.ndarray, y: np.ndarray, row: Row) -> tuple[float, float]:
  """pyautoattack's robust accuracy and wall time (a custom list gets the standard restarts;
  'fast', which the package does not name, is its two attacks as a custom list)."""
  version, attacks = row.version, row.attacks
  if version == "fast":
    version, attacks = "custom", autoattack.VERSION_ATTACKS["fast"]
  adversary = pyautoattack.AutoAttack(net, norm="Linf", eps=row.eps, version=version,
                                      attacks=list(attacks) if attacks else None, seed=0)
  if version == "custom":
    adversary.apgd.n_restarts = 1
    adversary.fab.n_restarts = 1
  tic = time.perf_counter()
  with torch.no_grad():
    _, y_adv = adversary.run_standard_evaluation(
        torch.from_numpy(torch_convert.nhwc_to_nchw(x)), torch.from_numpy(y).long(),
        batch_size=len(x))
  return float(np.mean(y_adv.numpy() == y)), time.perf_counter() - tic


def ours(apply_fn, variables, x, y, row: Row) -> tuple[float, float]:
  tic = time.perf_counter()
  result = autoattack.evaluate(apply_fn, x, y, params=variables, eps=row.eps,
                               version=row.version, attacks_to_run=row.attacks, progress=False)
  return result.robust_accuracy, time.perf_counter() - tic


def time_row(model: Model, row: Row, repeats: int) -> dict[str, str]:
  """One row of the attack table: gacd_jax's first call, then `repeats` interleaved rounds."""
  x, y = model.x[:row.examples], model.y[:row.examples]
  apply_fn = model.build_apply()  # a new function: this row compiles everything it needs
  ours_acc, first = ours(apply_fn, model.variables, x, y, row)
  ours_s, theirs_s = [], []
  for _ in range(repeats):
    theirs_acc, seconds = official(model.net, x, y, row)
    theirs_s.append(seconds)
    ours_s.append(ours(apply_fn, model.variables, x, y, row)[1])
  ours_med, theirs_med = float(np.median(ours_s)), float(np.median(theirs_s))
  return {"run": row.label, "model": row.model,
          "eps": f"{255 * row.eps:g}/255" if row.model == "resnet18" else f"{row.eps:g}",
          "images": str(len(x)),
          "gacd_jax first call s": f"{first:.1f}",
          "of which compile": f"{max(first - ours_med, 0):.1f}",
          "gacd_jax later s": _spread(ours_s), "pyautoattack s": _spread(theirs_s),
          "speed-up incl. compile": f"{theirs_med / first:.2f}x",
          "speed-up steady": f"{theirs_med / ours_med:.2f}x",
          "robust %, gacd_jax / pyautoattack": f"{100 * ours_acc:.1f} / {100 * theirs_acc:.1f}"}


def _spread(seconds: list[float]) -> str:
  """The median, and the range when there are several."""
  if len(seconds) == 1:
    return f"{seconds[0]:.1f}"
  return f"{np.median(seconds):.1f} ({min(seconds):.1f}-{max(seconds):.1f})"


def time_gradient_step(model: Model, label: str, batch: int, repeats: int,
                       steps: int = 5) -> dict[str, str]:
  """ms per input-gradient step of `batch` images, median of `repeats` interleaved rounds."""
  x = np.resize(model.x, (batch, *model.x.shape[1:]))
  y = np.resize(model.y, batch)
  apply_fn = model.build_apply()

  def total(v, images):
    return losses.cross_entropy(apply_fn(v, images), y).sum()
  jax_grad = jax.jit(jax.grad(total, argnums=1))
  x_torch = torch.from_numpy(torch_convert.nhwc_to_nchw(x))
  y_torch = torch.from_numpy(y)

  def torch_grad():
    images = x_torch.clone().requires_grad_()
    with torch.enable_grad():
      loss = torch.nn.functional.cross_entropy(model.net(images), y_torch, reduction="sum")
      return torch.autograd.grad(loss, [images])[0]

  def per_step(fn) -> float:
    tic = time.perf_counter()
    for _ in range(steps):
      fn()
    return 1000 * (time.perf_counter() - tic) / steps

  run_jax = lambda: jax.block_until_ready(jax_grad(model.variables, x))
  # Compile and warm up; both sides compute the same gradient.
  ours_grad = np.asarray(run_jax())
  gap = float(np.abs(ours_grad - torch_convert.nchw_to_nhwc(torch_grad().numpy())).max()
              / np.abs(ours_grad).max())
  jax_ms, torch_ms = [], []
  for _ in range(repeats):
    jax_ms.append(per_step(run_jax))
    torch_ms.append(per_step(torch_grad))
  return {"model": label, "batch": str(batch), "gacd_jax ms/step": _spread(jax_ms),
          "PyTorch ms/step": _spread(torch_ms),
          "ratio": f"{np.median(torch_ms) / np.median(jax_ms):.2f}x",
          "gradient difference (max, relative)": f"{gap:.1e}"}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=32, help="random images for the ResNet-18")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=2,
                      help="interleaved rounds per row after gacd_jax's first call")
  parser.add_argument("--rows", default=",".join(r.label for r in ROWS),
                      help="comma-separated row labels")
  parser.add_argument("--workdir", default="/tmp/gacd_jax_autoattack_speed_digits",
                      help="where the digits model is trained once and reused")
  parser.add_argument("--epochs", type=int, default=30, help="the digits model's training")
  parser.add_argument("--cache", default="",
                      help="JAX's persistent compilation cache directory (default off); run "
                           "the same command twice to see the second start")
  parser.add_argument("--out", default="experiments/results/autoattack_speed.md")
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  runtime.enable_compilation_cache(args.cache or None)
  wanted = args.rows.split(",")
  unknown = sorted(set(wanted) - {r.label for r in ROWS})
  if unknown:
    parser.error(f"unknown rows {unknown}; use some of {[r.label for r in ROWS]}")
  rows = [r for r in ROWS if r.label in wanted]

  loaded: dict[str, Model] = {}
  gaps, steps, table = {}, [], []
  for name in dict.fromkeys(r.model for r in rows):
    loaded[name] = resnet18(args.n) if name == "resnet18" else digits(args.workdir, args.epochs)
    gaps[name] = logit_gap(loaded[name])
    print(f"{name}: max |logit difference| JAX vs PyTorch {gaps[name]:.1e}", flush=True)
    steps.append(time_gradient_step(loaded[name], name, min(args.n, 32) if name == "resnet18"
                                    else 256, max(args.repeats, 3)))
    print(steps[-1], flush=True)
  for row in rows:
    table.append(time_row(loaded[row.model], row, args.repeats))
    print(table[-1], flush=True)
    write(args, gaps, steps, table)  # after every row: a stopped run keeps what it measured
  print(pathlib.Path(args.out).read_text())


def write(args, gaps: dict[str, float], steps: list[dict], table: list[dict]) -> None:
  gap_text = ", ".join(f"{name} {gap:.1e}" for name, gap in gaps.items())
  text = (f"# AutoAttack speed: gacd_jax against pyautoattack {pyautoattack.__version__}\n\n"
          f"Command: `python -m experiments.autoattack_speed --n {args.n} --threads "
          f"{args.threads} --repeats {args.repeats} --rows {args.rows}"
          + (f" --cache {args.cache}" if args.cache else "") + "`\n\n"
          "Models (`experiments/autoattack_speed.py`): resnet18, the CIFAR-10 ResNet-18 of the "
          f"pyautoattack wheel, on {args.n} uniform random images labelled by the model; digits, "
          "the cross-check's PGD-AT small_cnn on the 355 test digits. Largest logit difference "
          f"between the frameworks: {gap_text}. Linf; {args.threads} threads for PyTorch, the "
          "same CPUs for XLA; gacd_jax through the Python API after `runtime.configure()`'s XLA "
          f"flags (persistent compilation cache: {args.cache or 'off'}), one device, default "
          "batch 256 (bucketed); pyautoattack with one batch of all images. Per row: gacd_jax's "
          "first call (it "
          f"compiles everything it needs), then {args.repeats} rounds of pyautoattack and "
          "gacd_jax interleaved (median, range in brackets). 'of which compile': the first call "
          "minus the median of the later ones. "
          f"JAX {jax.__version__}, PyTorch {torch.__version__}.\n\n"
          + report.markdown_table(table) + "\n\n"
          "One input-gradient step (the cross-entropy's gradient with respect to the images, "
          "what every APGD iteration computes), jitted JAX against `torch.autograd.grad`, "
          "interleaved; where most examples survive, an APGD run is ~101 of these on both sides:"
          "\n\n" + report.markdown_table(steps) + "\n")
  pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
