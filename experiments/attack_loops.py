"""Attack iterations in an XLA loop against the same iterations from the host, or unrolled.

  python -m experiments.attack_loops --model small_cnn --n 256
  python -m experiments.attack_loops --model resnet18 --n 32 --apgd-iters 10

On XLA:CPU a convolution's forward and backward pass inside a `lax` while loop runs slower than
the same computation as a jitted function called from Python; `runtime.host_attack_loops`
decides from this which way the attacks loop. For one model with random weights (labels: its
own predictions, so every example is attacked) this prints, measured interleaved in one process
(the machine may be shared: compare the ratios, not the times):

- `pgd`: K signed-gradient steps as `lax.fori_loop`, from a Python loop over a jitted step, and
  unrolled; milliseconds per step and the compile time of each.
- `eval`: PGD-K as evaluation runs it (`attacks.pgd`, rolled: evaluation's choice) and unrolled:
  compile time, then seconds per batch, and whether the two agree.
- `apgd`: AutoAttack's APGD-CE (`autoattack.evaluate`, `host_loops` off and on): seconds once
  compiled, and whether the two agree.
"""

import argparse
import functools
import os
import time

from gacd_jax import runtime

os.environ.setdefault(runtime.CACHE_ENV, "off")  # compile times are measured: no cache
runtime.configure()  # as the command line does, before anything uses JAX

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from gacd_jax import attacks  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import autoattack  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position
from gacd_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position

SHAPES = {"small_cnn": (28, 28, 1), "resnet18": (32, 32, 3)}


def _timed(fn, *args):
  tic = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - tic


def _compile_seconds(jitted, *args) -> float:
  tic = time.perf_counter()
  jitted.lower(*args).compile()
  return time.perf_counter() - tic


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="small_cnn", choices=sorted(SHAPES))
  parser.add_argument("--width", type=int, default=8, help="small_cnn's width")
  parser.add_argument("--n", type=int, default=256, help="batch size")
  parser.add_argument("--steps", type=int, default=20, help="PGD steps")
  parser.add_argument("--apgd-iters", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--only", default="pgd,eval,apgd")
  args = parser.parse_args()
  only = args.only.split(",")

  options = {"width": args.width} if args.model == "small_cnn" else {}
  module = models.build(args.model, 10, **options)
  x = np.random.default_rng(0).uniform(0, 1, (args.n, *SHAPES[args.model])).astype(np.float32)
  variables = module.init(jax.random.key(0), x[:1], train=False)
  apply_fn = evaluate.logits_fn(module)
  y = np.asarray(jax.jit(apply_fn)(variables, x).argmax(-1), np.int32)
  eps, k = 8 / 255, args.steps
  print(f"{args.model} {options} batch {args.n}, {jax.devices()[0].platform}, "
        f"host_attack_loops={runtime.host_attack_loops(jax.default_backend())}", flush=True)

  if "pgd" in only:
    def step(v, xa):
      objective = attacks.cross_entropy_objective(functools.partial(apply_fn, v), y)
      g = jax.grad(lambda z: objective(z).sum())(xa)
      return attacks.project(xa + eps / 4 * jnp.sign(g), x, eps, "linf")

    step_jit = jax.jit(step)
    rolled, unrolled = (jax.jit(lambda v, x0, u=u: jax.lax.fori_loop(
        0, k, lambda _, xa: step(v, xa), x0, unroll=u)) for u in (1, True))

    def host(v, xa):
      for _ in range(k):
        xa = step_jit(v, xa)
      return xa

    print(f"pgd compile s: step {_compile_seconds(step_jit, variables, x):.1f}, fori_loop "
          f"{_compile_seconds(rolled, variables, x):.1f}, unrolled "
          f"{_compile_seconds(unrolled, variables, x):.1f}", flush=True)
    for f in (host, rolled, unrolled):
      f(variables, x)
    for _ in range(args.repeats):
      ms = [1000 * _timed(f, variables, x) / k for f in (rolled, host, unrolled)]
      print(f"pgd ms/step: fori_loop {ms[0]:.0f}, host loop {ms[1]:.0f}, unrolled {ms[2]:.0f}; "
            f"fori_loop / host {ms[0] / ms[1]:.2f}, fori_loop / unrolled {ms[0] / ms[2]:.2f}",
            flush=True)

  if "eval" in only:
    def pgd(v, xx, unroll):  # as `evaluate.Attack('pgd20')` runs it, rolled or unrolled
      objective = attacks.cross_entropy_objective(functools.partial(apply_fn, v), jnp.asarray(y))
      return attacks.pgd(objective, xx, jax.random.key(0), eps=eps, step_size=eps / 4, steps=k,
                         start="uniform", unroll=unroll)

    runs = {}
    for unroll in (False, True):
      runs[unroll] = jax.jit(functools.partial(pgd, unroll=unroll))
      print(f"eval PGD-{k} unroll={unroll}: compile s "
            f"{_compile_seconds(runs[unroll], variables, x):.1f}", flush=True)
      runs[unroll](variables, x)
    same = np.array_equal(runs[False](variables, x), runs[True](variables, x))
    for _ in range(args.repeats):
      rolled, unrolled = (_timed(runs[u], variables, x) for u in (False, True))
      print(f"eval PGD-{k} s/batch: rolled {rolled:.2f}, unrolled {unrolled:.2f}, ratio "
            f"{rolled / unrolled:.2f}; identical: {same}", flush=True)

  if "apgd" in only:
    kw = dict(params=variables, eps=eps, version="custom", attacks_to_run=["apgd-ce"],
              n_iter=args.apgd_iters, batch_size=args.n, progress=False)
    results = {}
    for host_loops in (False, True):  # compiles
      results[host_loops] = autoattack.evaluate(apply_fn, x, y, host_loops=host_loops, **kw)
      print(f"apgd host_loops={host_loops} first call s (with compile) "
            f"{results[host_loops].seconds['apgd-ce']:.1f}", flush=True)
    same = (np.array_equal(results[False].x_adv, results[True].x_adv)
            and np.array_equal(results[False].robust, results[True].robust))
    for _ in range(args.repeats):
      seconds = [autoattack.evaluate(apply_fn, x, y, host_loops=h, **kw).seconds["apgd-ce"]
                 for h in (False, True)]
      print(f"apgd-ce {args.apgd_iters} iterations s: XLA loop {seconds[0]:.1f}, host loop "
            f"{seconds[1]:.1f}, ratio {seconds[0] / seconds[1]:.2f}; identical: {same}",
            flush=True)


if __name__ == "__main__":
  main()
