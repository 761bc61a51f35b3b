"""Profile one compiled step with `jax.profiler` and summarise where the time goes.

  python -m experiments.profile_step --only train_step --out /tmp/profile       # project flags
  XLA_FLAGS= python -m experiments.profile_step --only train_step --out /tmp/p0  # jaxlib's own

Takes the benchmark's work items and arguments (`experiments/benchmark.py`; `--jax-only` is
implied), runs each once to warm up, then once under `jax.profiler.trace` (the trace, viewable in
Perfetto or XProf, stays in `--out`), and prints the XLA operations' time by kind (convolutions,
layout transposes, other fusions, YNNPACK/oneDNN calls, ...) and the longest single operations.

Caveat: on the CPU backend not every operation emits an event: with jaxlib's defaults the
YNNPACK calls do, but XLA's own (Eigen) convolutions mostly do not, so their time shows up as
'not attributed' (the traced wall time minus the named operations).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import time

import jax

from experiments import benchmark
from gacd_jax import report
from gacd_jax import runtime

# Kinds of XLA CPU operations, by the name of their trace event (HLO instruction names).
KINDS = (
    ("waiting for the thread pool", re.compile(r"ThreadPool::Await")),
    ("convolution", re.compile(r"^(conv_general_dilated|convolution)")),
    ("layout transpose (+ fused elementwise)", re.compile(r"^transpose")),
    ("YNNPACK / oneDNN call", re.compile(r"^(ynn|xnn|onednn)")),
    ("matmul", re.compile(r"^(dot|gemm)")),
    ("reduction fusion", re.compile(r"reduce")),
    ("other fusion (elementwise)", re.compile(r"fusion")),
    ("copy / slice / other", re.compile(r".")),
)


def kind_of(name: str) -> str:
  return next(kind for kind, pattern in KINDS if pattern.search(name))


def summarise(trace_dir: pathlib.Path, wall: float, untraced: float, top: int = 8) -> str:
  """Markdown: XLA operation time by kind, and the `top` longest operations."""
  path = next(trace_dir.glob("**/*.trace.json.gz"))
  events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
  per_op: collections.Counter = collections.Counter()
  for event in events:
    name = event.get("name", "")
    if event.get("ph") != "X" or name.startswith("$") or name.startswith("ThunkExecutor"):
      continue
    per_op[name] += event["dur"] / 1e6
  per_kind: collections.Counter = collections.Counter()
  for name, seconds in per_op.items():
    per_kind[kind_of(name)] += seconds
  per_kind["not attributed"] = max(wall - sum(per_kind.values()), 0.0)
  rows = [{"kind": kind, "seconds": f"{s:.2f}", "% of traced step": f"{100 * s / wall:.0f}"}
          for kind, s in per_kind.most_common() if s >= 0.005]
  longest = [{"operation": name, "seconds": f"{s:.3f}", "kind": kind_of(name)}
             for name, s in per_op.most_common(top)]
  return (f"step wall time {untraced:.2f} s untraced, {wall:.2f} s traced\n\n"
          + report.markdown_table(rows) + "\n\n"
          + report.markdown_table(longest))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="directory for the traces")
  own, rest = parser.parse_known_args(argv)
  args = benchmark.parse_args(rest + ["--jax-only"])
  runtime.set_xla_flags()
  benchmark.pin_threads(args.threads)
  print(f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`; threads: {args.threads}")
  bench = benchmark.Bench(argparse.Namespace(**dict(vars(args), batch=args.batch[0],
                                                    negatives=args.negatives[0])))
  for name in args.only.split(","):
    work = getattr(bench, name)()
    jax.block_until_ready(work.run_jax())
    tic = time.perf_counter()
    jax.block_until_ready(work.run_jax())
    untraced = time.perf_counter() - tic
    trace_dir = pathlib.Path(own.out) / name
    tic = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
      jax.block_until_ready(work.run_jax())
    wall = time.perf_counter() - tic
    print(f"\n### {name}, batch {args.batch[0]} (trace: {trace_dir})\n")
    print(summarise(trace_dir, wall, untraced), flush=True)


if __name__ == "__main__":
  sys.exit(main())
