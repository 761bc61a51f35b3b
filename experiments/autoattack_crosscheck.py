"""gacd_jax.autoattack against the authors' package (`pyautoattack`) on the same model and inputs.

  pip install pyautoattack==0.2.0
  python -m experiments.autoattack_crosscheck --workdir /tmp/autoattack_crosscheck \
      --out experiments/results/autoattack_crosscheck.md

Trains (or reuses, from `--workdir`) a PGD-AT small_cnn on scikit-learn's digits, exports it to
PyTorch with `gacd_jax.torch_convert.flax_to_torch` and `experiments/pytorch_baseline/models.py`,
checks that both give the same logits, then runs APGD-CE alone, APGD-T alone, the standard version,
FAB-T alone and Square alone in both implementations on the first `--n` test digits, with several
seeds each (`RUNS`) and each implementation's own settings for that attack list. Writes the robust
accuracies (mean and per seed), the examples judged differently and the wall times to `--out`.

The wheel of pyautoattack 0.2.0 ships a CIFAR-10 ResNet-18 (`examples/model_test.pt`, the
pytorch-cifar layout, which `torch_convert` reads); it is not used here: no CIFAR-10 test images
can be had offline on this machine, and one forward-backward pass of it costs ~0.15 s per image in
PyTorch on the 2-core CPU, i.e. ~50 min for APGD-CE alone on 200 images.
"""

import argparse
import pathlib
import sys
import time

import jax
import numpy as np
from pyautoattack import AutoAttack
import torch

from experiments.pytorch_baseline import models as torch_models
from gacd_jax import autoattack
from gacd_jax import checkpoints
from gacd_jax import data
from gacd_jax import demo
from gacd_jax import report
from gacd_jax import runtime
from gacd_jax import torch_convert
from gacd_jax import train

WIDTH = 16

# (label, version, attacks, seeds): attack lists that both packages run with their standard
# settings; more seeds where a run is cheap, since one run's outcome is partly luck.
RUNS = (("APGD-CE", "custom", ("apgd-ce",), 10), ("APGD-T", "custom", ("apgd-t",), 4),
        ("standard", "standard", None, 3), ("FAB-T", "custom", ("fab-t",), 1),
        ("Square", "custom", ("square",), 6))


def train_model(workdir: pathlib.Path, epochs: int):
  """A PGD-AT small_cnn on digits (eps 0.15, 10 steps), trained once and reused."""
  if checkpoints.latest_step(workdir) is None:
    train.train(demo.digits_config("pgd_at", width=WIDTH, epochs=epochs), str(workdir),
                overwrite=True)
  return checkpoints.load_model(workdir)


def torch_model(variables):
  """The same network in PyTorch, NCHW in, logits out (as pyautoattack expects)."""
  net = torch_models.build("small_cnn", 10, width=WIDTH, in_channels=1)
  state = torch_convert.flax_to_torch("small_cnn", variables)
  net.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
  return torch_models.LogitsOnly(net)


def run_official(model, x_nchw, y, *, eps: float, version: str, attacks,
                 seed: int) -> tuple[np.ndarray, float]:
  """pyautoattack's robust flags `[N]` and wall time. A custom list gets the standard version's
  restarts (1 for APGD and FAB; the package's constructor default is 5)."""
  adversary = AutoAttack(model, norm="Linf", eps=eps, version=version,
                         attacks=list(attacks) if attacks else None, seed=seed)
  if version == "custom":
    adversary.apgd.n_restarts = 1
    adversary.fab.n_restarts = 1
  tic = time.perf_counter()
  with torch.no_grad():
    _, y_adv = adversary.run_standard_evaluation(torch.from_numpy(x_nchw),
                                                 torch.from_numpy(y).long(), batch_size=500)
  return y_adv.numpy() == y, time.perf_counter() - tic


def _per_seed(values) -> str:
  return f"**{np.mean(values):.2f}** ({', '.join(f'{v:.2f}' for v in values)})"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="where the model is trained / reused")
  parser.add_argument("--out", default="experiments/results/autoattack_crosscheck.md")
  parser.add_argument("--n", type=int, default=355, help="test digits (the split has 355)")
  parser.add_argument("--eps", type=float, default=demo.DIGITS_EPS)
  parser.add_argument("--epochs", type=int, default=30)
  args = parser.parse_args(argv)
  runtime.configure()
  # Measured 4-10x faster than two threads for this tiny network on the shared 2-core CPU.
  torch.set_num_threads(1)

  module, variables = train_model(pathlib.Path(args.workdir), args.epochs)
  apply_fn = jax.jit(lambda x: module.apply(variables, x, train=False)[0])
  net = torch_model(variables)
  batch = data.build("digits", "test", image_size=8, channels=1).get(np.arange(args.n))
  x, y = batch["image"], batch["label"]
  x_nchw = torch_convert.nhwc_to_nchw(x)
  with torch.no_grad():
    gap = float(np.abs(np.asarray(apply_fn(x)) - net(torch.from_numpy(x_nchw)).numpy()).max())
  print(f"max |logit difference| JAX vs PyTorch: {gap:.2e}", flush=True)

  rows = []
  for label, version, attacks, seeds in RUNS:
    ours, theirs, ours_seconds, theirs_seconds, differ = [], [], [], [], []
    for seed in range(seeds):
      tic = time.perf_counter()
      result = autoattack.evaluate(apply_fn, x, y, eps=args.eps, version=version,
                                   attacks_to_run=attacks, batch_size=128, seed=seed)
      ours_seconds.append(time.perf_counter() - tic)
      robust, seconds = run_official(net, x_nchw, y, eps=args.eps, version=version,
                                     attacks=attacks, seed=seed)
      theirs_seconds.append(seconds)
      ours.append(100 * result.robust_accuracy)
      theirs.append(100 * robust.mean())
      differ.append(np.sum(result.robust != robust))
    rows.append({
        "attacks": label,
        "gacd_jax (%)": _per_seed(ours),
        "pyautoattack (%)": _per_seed(theirs),
        "difference of means (points)": f"{np.mean(ours) - np.mean(theirs):+.2f}",
        "examples judged differently": f"{np.mean(differ):.1f}",
        "gacd_jax s/run": f"{np.mean(ours_seconds):.1f}",
        "pyautoattack s/run": f"{np.mean(theirs_seconds):.1f}",
    })
    print(report.markdown_table(rows[-1:]), flush=True)

  command = " ".join(["python -m experiments.autoattack_crosscheck"] + (argv or sys.argv[1:]))
  pathlib.Path(args.out).write_text(
      "# AutoAttack: gacd_jax against the authors' package\n\n"
      f"Command: `{command}`\n\n"
      f"Model: small_cnn (width {WIDTH}) trained here with PGD-AT on scikit-learn's digits "
      f"({args.epochs} epochs, Linf eps 0.15, 10 steps), exported to PyTorch with "
      "`gacd_jax.torch_convert.flax_to_torch` (largest logit difference between the two "
      f"frameworks on these inputs: {gap:.1e}). Inputs: the first {args.n} test digits (8x8x1, "
      f"clean accuracy {100 * result.clean_accuracy:.2f}%), Linf eps = {args.eps}. "
      "pyautoattack 0.2.0 (the official code) with batch 500 and one PyTorch thread; gacd_jax "
      "with batch 128 on one CPU device. Seeds 0, 1, ... on both sides, each side with its own "
      "random numbers. Wall times per run, 2-core CPU, nothing else running; gacd_jax's "
      "include tracing and (first seed) compilation.\n\n"
      + report.markdown_table(rows) + "\n\n"
      "Robust accuracy in %: the mean over seeds 0, 1, ... (each seed's in brackets); an "
      "example counts as robust if every attack of the row failed on it. The APGD-CE, APGD-T, "
      "FAB-T and Square rows run that attack alone on every clean-correct example with the "
      "standard version's settings (1 restart; APGD-T and FAB-T: the 9 runner-up classes as "
      "targets, 100 iterations each; Square: 5000 queries). 'Examples judged differently': per "
      "seed, the examples robust on one side only, averaged.\n\n"
      "One run decides some examples of this model by luck (its random start or queries): the "
      "same implementation moves by up to ~2 points between seeds. So the implementations are "
      "compared by the mean over seeds; a single seed can differ by more. FAB-T with one restart "
      "draws no random numbers, so it is compared example by example.\n\n"
      "The CIFAR-10 ResNet-18 in the pyautoattack wheel (`examples/model_test.pt`, pytorch-cifar "
      "layout) converts with `torch_convert`, but is not used: no CIFAR-10 images can be had "
      "offline here, and a forward-backward pass costs ~0.15 s per image in PyTorch on this CPU "
      "(~50 min for APGD-CE alone on 200 images).\n")


if __name__ == "__main__":
  main()
