"""AutoAttack wall time: gacd_jax against the authors' package on the same model, inputs, threads.

  pip install pyautoattack==0.2.0
  python -m experiments.autoattack_speed --out experiments/results/autoattack_speed.md

The model is the CIFAR-10 ResNet-18 that the pyautoattack wheel ships (`examples/model_test.pt`,
the pytorch-cifar layout), imported with `torch_convert.torch_to_flax` (the same weights on both
sides; the largest logit difference is reported). The inputs are `--n` uniform random 32x32
images labelled by the model itself, so every one is correctly classified and is attacked (no
CIFAR-10 images can be had offline here). At eps 8/255 the model (not robustly trained) loses
every image; at 0.4/255 about half survive APGD-CE, the case where work on the examples left
decides the time. Each row runs gacd_jax through the Python API as a user
would (`runtime.configure()` first), then pyautoattack, one after the other on the same threads.
gacd_jax's wall time includes compilation; a second call of the same row, which reuses the
compiled attacks, gives the time without it, and the difference is reported as compile time.
"""

import argparse
import pathlib
import time

from gacd_jax import runtime

runtime.configure()  # as a Python user is told to, before anything uses JAX

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pyautoattack  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.pytorch_baseline import models as torch_models  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import autoattack  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import torch_convert  # pylint: disable=g-import-not-at-top,wrong-import-position

WEIGHTS = pathlib.Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
# (label, version, attacks, examples, eps): the rows; standard on a reduced set (Square's 5000
# queries on a ResNet-18 take hours on a CPU where images survive).
ROWS = (("APGD-CE", "custom", ("apgd-ce",), None, 8 / 255),
        ("fast", "fast", None, None, 8 / 255),
        ("standard", "standard", None, 8, 8 / 255),
        ("APGD-CE-0.4", "custom", ("apgd-ce",), None, 0.4 / 255),
        ("fast-0.4", "fast", None, 16, 0.4 / 255))


def load() -> tuple:
  """`(torch model, flax apply_fn, flax variables)` of the wheel's ResNet-18."""
  state = torch_convert.read_torch_checkpoint(WEIGHTS)
  net = torch_models.build("resnet18", 10)
  net.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)

  variables = torch_convert.torch_to_flax("resnet18", state, 10)
  module = models.build("resnet18", 10, store_conv_inputs=runtime.store_conv_inputs(
      jax.default_backend()))
  return torch_models.LogitsOnly(net), lambda v, x: module.apply(v, x, train=False)[0], variables


def official(net, x: np.ndarray, y: np.ndarray, version: str, attacks,
             eps: float) -> tuple[float, float]:
  """pyautoattack's robust accuracy and wall time (a custom list gets the standard restarts;
  'fast', which the package does not name, is its two attacks as a custom list)."""
  if version == "fast":
    version, attacks = "custom", autoattack.VERSION_ATTACKS["fast"]
  adversary = pyautoattack.AutoAttack(net, norm="Linf", eps=eps, version=version,
                                      attacks=list(attacks) if attacks else None, seed=0)
  if version == "custom":
    adversary.apgd.n_restarts = 1
  tic = time.perf_counter()
  with torch.no_grad():
    _, y_adv = adversary.run_standard_evaluation(
        torch.from_numpy(torch_convert.nhwc_to_nchw(x)), torch.from_numpy(y).long(),
        batch_size=len(x))
  return float(np.mean(y_adv.numpy() == y)), time.perf_counter() - tic


def ours(apply_fn, variables, x, y, version, attacks, eps) -> tuple[float, float]:
  tic = time.perf_counter()
  result = autoattack.evaluate(apply_fn, x, y, params=variables, eps=eps, version=version,
                               attacks_to_run=attacks, progress=False)
  return result.robust_accuracy, time.perf_counter() - tic


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=32, help="images (the 'standard' row takes fewer)")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--rows", default=",".join(r[0] for r in ROWS),
                      help="comma-separated row labels")
  parser.add_argument("--out", default="experiments/results/autoattack_speed.md")
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)

  net, apply_fn, variables = load()
  x = np.random.default_rng(0).uniform(0, 1, (args.n, 32, 32, 3)).astype(np.float32)
  logits = np.asarray(jax.jit(apply_fn)(variables, x))
  y = logits.argmax(1).astype(np.int64)
  with torch.no_grad():
    gap = float(np.abs(net(torch.from_numpy(torch_convert.nhwc_to_nchw(x))).numpy()
                       - logits).max())
  print(f"max |logit difference| JAX vs PyTorch: {gap:.1e}", flush=True)

  table = []
  for label, version, attacks, examples, eps in ROWS:
    if label not in args.rows.split(","):
      continue
    xs, ys = x[:examples], y[:examples]
    ours_acc, ours_s = ours(apply_fn, variables, xs, ys, version, attacks, eps)
    _, ours_again = ours(apply_fn, variables, xs, ys, version, attacks, eps)
    theirs_acc, theirs_s = official(net, xs, ys, version, attacks, eps)
    table.append({"run": label, "eps": f"{255 * eps:g}/255", "images": str(len(xs)),
                  "gacd_jax s (incl. compile)": f"{ours_s:.0f}",
                  "of which compile": f"{max(ours_s - ours_again, 0):.0f}",
                  "pyautoattack s": f"{theirs_s:.0f}",
                  "speed-up": f"{theirs_s / ours_s:.2f}x",
                  "robust %, gacd_jax / pyautoattack":
                      f"{100 * ours_acc:.1f} / {100 * theirs_acc:.1f}"})
    print(table[-1], flush=True)
    write(args, gap, table)  # after every row: a stopped run keeps what it measured
  print(pathlib.Path(args.out).read_text())


def write(args, gap: float, table: list[dict]) -> None:
  text = (f"# AutoAttack speed: gacd_jax against pyautoattack {pyautoattack.__version__}\n\n"
          f"Command: `python -m experiments.autoattack_speed --n {args.n} --threads "
          f"{args.threads} --rows {args.rows}`\n\nThe CIFAR-10 ResNet-18 of the pyautoattack "
          f"wheel on both sides (largest logit difference {gap:.1e}); {args.n} uniform random "
          f"images labelled by the model; Linf; {args.threads} threads for PyTorch, "
          "the same CPUs for XLA; gacd_jax through the Python API after "
          "`runtime.configure()`, on one device, default batch 256 (bucketed); pyautoattack with "
          "one batch of all images. Wall time of one run each, gacd_jax's including compilation "
          "('of which compile': the first call minus a second one that reuses the compiled "
          "attacks; 0 where an earlier row compiled them). "
          f"JAX {jax.__version__}, PyTorch {torch.__version__}.\n\n"
          + report.markdown_table(table) + "\n")
  pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
  main()
