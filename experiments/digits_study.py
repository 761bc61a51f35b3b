"""Every method on digits with the same budget: clean / FGSM / PGD-20 / CW-inf accuracy.

  python experiments/digits_study.py --workdir runs/digits_study \
      --out experiments/results/digits_methods.md

Trains one PGD-AT teacher (small_cnn, width 32) and then a width-8 small_cnn student with every
registered method for the same number of epochs and the same training attack (eps 0.15, 10
steps), evaluates each on the digits test split, and writes a markdown table. Runs already
complete in the workdir are reused.
"""

import argparse
import pathlib
import sys
import time

from gacd_jax import demo
from gacd_jax import evaluate
from gacd_jax import methods
from gacd_jax import report
from gacd_jax import runtime
from gacd_jax import train


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default="experiments/results/digits_methods.md")
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--methods", default=",".join(methods.names()),
                      help="comma-separated method names (default: all registered)")
  args = parser.parse_args(argv)
  runtime.configure()

  root = pathlib.Path(args.workdir)
  teacher_dir = root / "teacher_pgd_at"
  teacher_cfg = demo.digits_config("pgd_at", width=32, epochs=args.epochs)
  teacher_cfg.seed = args.seed
  rows = []
  runs = [("teacher (pgd_at, width 32)", teacher_cfg, teacher_dir)]
  for name in args.methods.split(","):
    cfg = demo.digits_config(name, width=8, epochs=args.epochs, teacher_workdir=str(teacher_dir),
                             teacher_model="small_cnn")
    cfg.seed = args.seed
    runs.append((name, cfg, root / f"student_{name}"))
  for label, cfg, workdir in runs:
    tic = time.perf_counter()
    train.train(cfg, str(workdir), overwrite=True)
    minutes = (time.perf_counter() - tic) / 60
    results = evaluate.evaluate_run(cfg, str(workdir))
    rows.append({"method": label,
                 **{evaluate.RESULT_LABELS[k]: f"{100 * v:.1f}" for k, v in results.items()},
                 "train (min)": f"{minutes:.1f}"})
    print(report.markdown_table(rows[-1:]), flush=True)

  command = "python " + " ".join(["experiments/digits_study.py"] + (argv or sys.argv[1:]))
  pathlib.Path(args.out).write_text(
      "# Every method on digits, same budget\n\n"
      f"Command: `{command}`\n\n"
      f"Students: small_cnn width 8, {args.epochs} epochs, batch 64, SGD 0.05 cosine, training "
      f"attack Linf eps {demo.DIGITS_EPS} in 10 steps (each method's own start, BatchNorm mode and "
      "objective). Distillation methods learn from the PGD-AT teacher in the first row. "
      f"Accuracy (%) on the 355 test digits at eps {demo.DIGITS_EPS}; PGD-20 and CW-inf "
      "(30 steps) with a random start. One seed; train time includes compilation, on a 2-core "
      "CPU shared with other work.\n\n" + report.markdown_table(rows) + "\n")


if __name__ == "__main__":
  main()
