"""Time the same training work in gacd_jax (JAX, one jit) and in the eager PyTorch baseline.

  python -m experiments.benchmark --batch 16 --repeats 3             # quick
  python -m experiments.benchmark --only gacd_step                   # batch 128, ResNet-18 pair
  python -m experiments.benchmark --only gacd_step --precision bf16  # bf16 both sides
  python -m experiments.benchmark --only rslad_step --teacher wrn34_10 --batch 32
  python -m experiments.benchmark --only gacd_step --jax-only --batch 32,64,128,256  # scaling
  XLA_FLAGS= python -m experiments.benchmark ...                     # jaxlib's own XLA CPU flags

(from the checkout's root, which holds the `experiments` package).

Work items (`--only`, comma-separated), on synthetic CIFAR-shaped data:
  gacd_step   the full GACD step: negatives for the attack and the loss, teacher forward, PGD-10
              on the contrastive loss, student forward / backward, SGD, memory-bank update
              (gacd_jax: `train.make_step` + `train.jit_step`; PyTorch: `steps.gacd_step` after
              two `crd.NegativeSampler` draws)
  ard_step    the full ARD step (PGD-10 in BatchNorm train mode, teacher forward, KL update)
  rslad_step  the full RSLAD step (teacher forward, PGD-10 on the KL from a Gaussian start in
              BatchNorm eval mode, student update on the adversarial and the clean batch;
              PyTorch: `steps.rslad_step` as zibojia/RSLAD writes it)
  train_step  a natural step (CE on clean inputs)
  pgd10       PGD-10 on the student's CE, BatchNorm on running statistics
  forward     the student's eval-mode forward
  input_pipeline  not a step: images/s delivered to the device from each stored data format and
              the train loop's share of time waiting for data (`experiments/input_pipeline.py`;
              `--input-examples` images, `--batch` a step; its own table)
  autoattack  not a step, and only when named: AutoAttack's wall time against pyautoattack on
              the same ResNet-18 and digits model, interleaved, compile time apart, and one
              input-gradient step on both sides (`experiments/autoattack_speed.py`, which writes
              `experiments/results/autoattack_speed.md`; its own table)
Both sides use the same weights (converted with torch_convert) and do the same math; the JAX step's
augmentation is off (the PyTorch side would augment in its data loader).

Protocol: each work item is compiled (JAX, timed) and warmed up on both sides, then run
`--repeats` times interleaved (JAX, PyTorch, JAX, ...); the table reports median images/s.
`--batch` and `--negatives` take lists (a scaling table: one row per value); `--jax-only` skips
PyTorch. 'JAX memory' is XLA's buffer assignment for the compiled program (arguments, outputs
and temporaries, donated state counted once): the step's peak footprint on the device.

Precision: `--precision bf16` builds the JAX models with bf16 activations (float32 parameters,
optimizer state and loss, as `config.precision=bf16`) and runs PyTorch under
`torch.autocast('cpu', torch.bfloat16)`; the header reports each side's logit drift from its
own fp32 forward on the batch.

Compilation cache: `--cache DIR` turns on JAX's persistent cache there (what the command line
does by default); run the same command twice to see the second start.

Threads: `--threads N` restricts the process to N CPUs with `sched_setaffinity` (re-executing
itself so the mask is in place before any library starts a thread pool): XLA's CPU client sizes
its intra-op pool from the affinity mask (jaxlib 0.10 has no flag for the count; the only one,
`--xla_cpu_multi_thread_eigen=false`, makes Eigen calls single-threaded) and PyTorch gets
`torch.set_num_threads(N)`. When other processes keep the CPUs busy, a multi-threaded run waits
for its descheduled threads at every barrier (PyTorch's OpenMP loops most of all), so compare with
`--threads 1` too; the header prints the load average. XLA flags: the project's
(`gacd_jax.runtime`) unless `XLA_FLAGS` is set; the header prints the ones in force.

FLOPs: XLA's cost analysis of each compiled JAX program, used for both sides (same math). XLA
counts only the multiply-adds that touch real input, not the convolutions' zero padding:
0.97 GFLOP for a 32x32 ResNet-18 forward, where `torch.utils.flop_counter`'s dense formula gives
1.11.
Peak: cores x clock x fp32 FLOPs per cycle per core from /proc/cpuinfo (see `nominal_peak`),
and a measured ceiling: the best large single-precision matmul in each framework (above the
nominal peak when the cores boost past the clock /proc/cpuinfo reports).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

from experiments import input_pipeline
from experiments.pytorch_baseline import attacks as torch_attacks
from experiments.pytorch_baseline import crd as torch_crd
from experiments.pytorch_baseline import models as torch_models
from experiments.pytorch_baseline import steps as torch_steps
from gacd_jax import attacks
from gacd_jax import config as config_lib
from gacd_jax import data
from gacd_jax import methods
from gacd_jax import models
from gacd_jax import report
from gacd_jax import runtime
from gacd_jax import sharding
from gacd_jax import torch_convert
from gacd_jax import train
from gacd_jax.methods import gacd as gacd_lib
from gacd_jax.methods import InitInfo

WORKS = ("gacd_step", "ard_step", "rslad_step", "train_step", "pgd10", "forward",
         "input_pipeline", "autoattack")
# Not run unless named: tens of minutes, and it needs pyautoattack.
NOT_BY_DEFAULT = ("autoattack",)


# ---------------------------------------------------------------------------------------------
# The machine.


def pin_threads(threads: int) -> None:
  """Restrict the process to its first `threads` CPUs, re-executing it if the mask changes."""
  cpus = sorted(os.sched_getaffinity(0))
  if threads > len(cpus):
    raise SystemExit(f"--threads {threads}: only {len(cpus)} CPUs are available ({cpus})")
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])
    os.execv(sys.executable, sys.orig_argv)


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo."""
  info = {}
  with open("/proc/cpuinfo") as f:
    for line in f:
      if not line.strip():
        break
      key, _, value = line.partition(":")
      info[key.strip()] = value.strip()
  return info


def nominal_peak(cores: int) -> tuple[float, str]:
  """fp32 peak in FLOP/s and how it was derived: cores x clock x FLOPs per cycle per core.

  FLOPs per cycle = FMA pipes x fp32 lanes per pipe x 2 (an FMA is two FLOPs): Zen 4 (AMD family
  25 with AVX-512) runs 512-bit FMAs on two 256-bit pipes, 2 x 8 x 2 = 32; Zen 5 and Intel server
  cores with AVX-512 have two 512-bit FMA pipes, 2 x 16 x 2 = 64; AVX2 + FMA cores 2 x 8 x 2 = 32.
  The clock is /proc/cpuinfo's 'cpu MHz' (under a hypervisor the nominal clock, not boost).
  """
  info = _cpuinfo()
  flags = set(info.get("flags", "").split())
  ghz = float(info.get("cpu MHz", "0")) / 1000
  family = int(info.get("cpu family", "0"))
  amd = info.get("vendor_id") == "AuthenticAMD"
  if "avx512f" in flags and not (amd and family < 26):
    per_cycle, why = 64, "2 FMA pipes x 16 fp32 lanes (AVX-512) x 2"
  elif "avx512f" in flags:
    per_cycle, why = 32, "2 FMA pipes x 8 fp32 lanes (AVX-512 on 256-bit pipes, Zen 4) x 2"
  elif "fma" in flags:
    per_cycle, why = 32, "2 FMA pipes x 8 fp32 lanes (AVX2) x 2"
  else:
    per_cycle, why = 8, "no FMA: 2 x 4 fp32 lanes (SSE)"
  peak = cores * ghz * 1e9 * per_cycle
  return peak, (f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({why}) = "
                f"{peak / 1e9:.0f} GFLOP/s [{info.get('model name', '?')}]")


def _load() -> str:
  return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def matmul_ceiling(size: int = 2048, repeats: int = 10) -> dict[str, float]:
  """Best-of-`repeats` GFLOP/s of an fp32 `size`^3 matmul in each framework."""
  flops = 2 * size**3
  a = np.random.default_rng(0).standard_normal((size, size), np.float32)
  matmul_jax = jax.jit(lambda x: x @ x)
  a_jax = jnp.asarray(a)
  a_torch = torch.from_numpy(a)
  results = {}
  for name, run in (("jax", lambda: matmul_jax(a_jax).block_until_ready()),
                    ("pytorch", lambda: a_torch @ a_torch)):
    run()
    times = []
    for _ in range(repeats):
      tic = time.perf_counter()
      run()
      times.append(time.perf_counter() - tic)
    results[name] = flops / min(times) / 1e9
  return results


# ---------------------------------------------------------------------------------------------
# The work.


@dataclasses.dataclass
class Compiled:
  """A compiled JAX program and what XLA says of it."""
  executable: Any
  seconds: float  # lower + compile
  flops: float  # XLA's count for one call
  memory: float  # bytes: XLA's buffer assignment (arguments + outputs + temporaries - aliased)


@dataclasses.dataclass
class Work:
  """One item of work, runnable in both frameworks (PyTorch's side None with --jax-only).
  `run_jax` returns something to block on."""
  name: str
  run_jax: Callable[[], Any]
  run_torch: Optional[Callable[[], Any]]
  compiled: Compiled


def _compile(fn, *args) -> Compiled:
  tic = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - tic
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  memory = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes) if mem is not None else float("nan")
  return Compiled(compiled, seconds, float(cost.get("flops", 0.0)), float(memory))


class Bench:
  """Both frameworks' models, weights and a synthetic batch, shared by the work items."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    size, batch, classes = args.image_size, args.batch, args.num_classes
    self.image_shape = (size, size, 3)
    rng = np.random.default_rng(0)
    self.train_labels = rng.integers(0, classes, args.num_examples).astype(np.int32)
    index = rng.choice(args.num_examples, batch, replace=False).astype(np.int32)
    images = rng.uniform(0, 1, (batch, *self.image_shape)).astype(np.float32)
    self.mesh = sharding.make_mesh()
    self.config = config_lib.default()
    self.batch = data.to_global(
        {"image": images, "label": self.train_labels[index], "index": index},
        sharding.batch_sharding(self.mesh))
    self.x_t = torch.from_numpy(torch_convert.nhwc_to_nchw(images))
    self.y_t = torch.from_numpy(self.train_labels[index]).long()
    self.index_t = torch.from_numpy(index).long()

    self.dtype = config_lib.PRECISIONS[args.precision]
    self.student, self.student_t, self.student_vars = self._model(args.student, seed=1)
    self.teacher, self.teacher_t, self.teacher_vars = self._model(args.teacher, seed=2)
    self.teacher_t.eval()
    self.config.precision = args.precision
    self.config.attack.steps = args.attack_steps
    self.config.method.gacd.num_negatives = args.negatives
    # The PyTorch GACD step writes METHODS.md section 3's GACD (guided attack, CE + 0.8 CRD NCE).
    self.config.method.gacd.update(gacd_lib.RECONSTRUCTION)
    self.torch_attack = torch_steps.AttackSettings(
        self.config.attack.eps, self.config.attack.step_size, args.attack_steps)

  def _model(self, name: str, seed: int):
    """(Flax module, PyTorch module with the same weights, Flax variables)."""
    module = models.build(name, self.args.num_classes, dtype=self.dtype)
    variables = module.init(jax.random.key(seed), jnp.zeros((1, *self.image_shape)), train=False)
    torch_model = torch_models.build(name, self.args.num_classes)
    torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                                 torch_convert.flax_to_torch(name, variables).items()})
    return module, torch_model, variables

  def _info(self) -> InitInfo:
    return InitInfo(
        num_examples=self.args.num_examples, train_labels=self.train_labels,
        steps_per_epoch=self.args.num_examples // self.args.batch,
        num_classes=self.args.num_classes,
        student_feature_dim=models.feature_dim(self.student, self.image_shape),
        teacher_feature_dim=models.feature_dim(self.teacher, self.image_shape),
        teacher_num_classes=self.args.num_classes)

  def logit_drift(self) -> tuple[float, float]:
    """(JAX, PyTorch): max |logits - fp32 logits| / max |fp32 logits| of the student's eval
    forward on the batch, in `--precision` against float32."""
    fp32 = self.student.clone(dtype=jnp.float32)
    x = self.batch["image"]
    ref = np.asarray(fp32.apply(self.student_vars, x, train=False)[0], np.float64)
    low = np.asarray(self.student.apply(self.student_vars, x, train=False)[0], np.float64)
    self.student_t.eval()
    with torch.no_grad():
      ref_t = self.student_t(self.x_t)[0].double().numpy()
      with self.autocast():
        low_t = self.student_t(self.x_t)[0].double().numpy()
    return (float(np.abs(low - ref).max() / np.abs(ref).max()),
            float(np.abs(low_t - ref_t).max() / np.abs(ref_t).max()))

  def autocast(self):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.args.precision == "bf16")

  def _jax_step(self, method_name: str) -> tuple[Callable[[], Any], Compiled, Any]:
    """A jitted `train.make_step` of the method, state threaded through calls; also returns the
    initial method params and state (for the PyTorch side)."""
    cfg = self.config
    cfg.method.name = method_name
    method = methods.build(cfg.method)
    tx = train.make_optimizer(cfg.optim, steps_per_epoch=1, total_steps=1)
    step = train.make_step(self.student, method, tx,
                           train.AttackSettings.resolve(cfg.attack, method),
                           self.teacher if method.uses_teacher else None,
                           crop_padding=0, flip=False)
    state = train.init_state(jax.random.key(0), self.student, method, tx, self.image_shape,
                             self._info())
    # Copies: the step donates its state, and the other work items still read these.
    state["params"]["student"] = jax.tree.map(jnp.copy, self.student_vars["params"])
    state["batch_stats"] = jax.tree.map(jnp.copy, self.student_vars["batch_stats"])
    state["opt_state"] = tx.init(state["params"])
    method_params, method_state = jax.device_get(
        (state["params"]["method"], state["method_state"]))
    teacher_vars = self.teacher_vars if method.uses_teacher else None
    rng = jax.random.key(0)
    compiled = _compile(train.jit_step(step, self.mesh), state, teacher_vars, self.batch, rng)
    holder = {"state": state}

    def run():
      holder["state"], metrics = compiled.executable(holder["state"], teacher_vars, self.batch,
                                                     rng)
      return metrics

    return run, compiled, (method_params, method_state)

  def _torch_optimizer(self, *extra: torch.nn.Module) -> torch.optim.SGD:
    params = [p for m in (self.student_t, *extra) for p in m.parameters()]
    optim = self.config.optim
    return torch_steps.sgd(params, lr=optim.lr, momentum=optim.momentum,
                           weight_decay=optim.weight_decay)

  def gacd_step(self) -> Work:
    run_jax, compiled, (method_params, method_state) = self._jax_step("gacd")
    c = self.config.method.gacd
    contrast = torch_crd.ContrastiveDistillation(
        models.feature_dim(self.student, self.image_shape),
        models.feature_dim(self.teacher, self.image_shape), self.args.num_examples, c.feat_dim,
        c.temperature, c.momentum)
    contrast.load_gacd_jax(method_params, method_state)
    optimizer = self._torch_optimizer(contrast)
    sampler = torch_crd.NegativeSampler(self.train_labels, c.num_negatives)

    def run_torch():
      attack_index = sampler(self.index_t, self.y_t)
      loss_index = sampler(self.index_t, self.y_t)
      return torch_steps.gacd_step(self.student_t, self.teacher_t, contrast, optimizer, self.x_t,
                                   self.y_t, self.index_t, attack_index, loss_index,
                                   self.torch_attack)

    return self._work("gacd_step", run_jax, run_torch, compiled)

  def ard_step(self) -> Work:
    run_jax, compiled, _ = self._jax_step("ard")
    c = self.config.method
    optimizer = self._torch_optimizer()
    run_torch = lambda: torch_steps.ard_step(
        self.student_t, self.teacher_t, optimizer, self.x_t, self.y_t, self.torch_attack,
        alpha=c.ard.alpha, temperature=c.ard.temperature, kl_reduction=c.kl_reduction)
    return self._work("ard_step", run_jax, run_torch, compiled)

  def rslad_step(self) -> Work:
    run_jax, compiled, _ = self._jax_step("rslad")
    c = self.config.method.rslad
    optimizer = self._torch_optimizer()
    attack = dataclasses.replace(self.torch_attack, start="gaussian")
    run_torch = lambda: torch_steps.rslad_step(
        self.student_t, self.teacher_t, optimizer, self.x_t, attack, adv_weight=c.adv_weight,
        clean_weight=c.clean_weight)
    return self._work("rslad_step", run_jax, run_torch, compiled)

  def train_step(self) -> Work:
    run_jax, compiled, _ = self._jax_step("natural")
    optimizer = self._torch_optimizer()
    run_torch = lambda: torch_steps.natural_step(self.student_t, optimizer, self.x_t, self.y_t)
    return self._work("train_step", run_jax, run_torch, compiled)

  def pgd10(self) -> Work:
    a = self.config.attack

    def pgd(variables, images, labels, rng):
      apply = lambda x: self.student.apply(variables, x, train=False)[0]
      return attacks.pgd(attacks.cross_entropy_objective(apply, labels), images, rng, eps=a.eps,
                         step_size=a.step_size, steps=a.steps, start="uniform", unroll=a.unroll)

    args = (self.student_vars, self.batch["image"], self.batch["label"], jax.random.key(0))
    compiled = _compile(jax.jit(pgd), *args)

    def run_torch():
      self.student_t.eval()
      return torch_attacks.pgd(torch_attacks.cross_entropy_objective(self.student_t, self.y_t),
                               self.x_t, eps=a.eps, step_size=a.step_size, steps=a.steps)

    return self._work("pgd10", lambda: compiled.executable(*args), run_torch, compiled)

  def forward(self) -> Work:
    forward = jax.jit(lambda variables, x: self.student.apply(variables, x, train=False))
    compiled = _compile(forward, self.student_vars, self.batch["image"])

    def run_torch():
      self.student_t.eval()
      with torch.no_grad():
        return self.student_t(self.x_t)

    run_jax = lambda: compiled.executable(self.student_vars, self.batch["image"])
    return self._work("forward", run_jax, run_torch, compiled)

  def _work(self, name: str, run_jax, run_torch, compiled: Compiled) -> Work:
    """The work item, PyTorch's side under autocast for bf16 (or none with --jax-only)."""
    def run_torch_cast():
      with self.autocast():
        return run_torch()
    return Work(name, run_jax, None if self.args.jax_only else run_torch_cast, compiled)


def measure(work: Work, warmup: int, repeats: int) -> dict[str, float]:
  """Median seconds per call of each side (PyTorch's unless --jax-only), interleaved after
  warm-up."""
  sides = {"jax": lambda: jax.block_until_ready(work.run_jax())}
  if work.run_torch is not None:
    sides["torch"] = work.run_torch
  for _ in range(warmup):
    for run in sides.values():
      run()
  times = {side: [] for side in sides}
  for _ in range(repeats):
    for side, run in sides.items():
      tic = time.perf_counter()
      run()
      times[side].append(time.perf_counter() - tic)
  return {side: statistics.median(t) for side, t in times.items()}


# ---------------------------------------------------------------------------------------------
# Main.


def _int_list(text: str) -> list[int]:
  return [int(v) for v in text.split(",")]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--student", default="resnet18", choices=models.names())
  parser.add_argument("--teacher", default="resnet18", choices=models.names())
  parser.add_argument("--batch", type=_int_list, default=[128], help="one or more, e.g. 32,64")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--num-classes", type=int, default=10)
  parser.add_argument("--num-examples", type=int, default=50000,
                      help="N, the memory banks' rows (CIFAR's training set); must exceed K")
  parser.add_argument("--negatives", type=_int_list, default=[16384],
                      help="K, GACD's NCE negatives (one or more)")
  parser.add_argument("--attack-steps", type=int, default=10)
  parser.add_argument("--precision", default="fp32", choices=sorted(config_lib.PRECISIONS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPUs for both frameworks (default: all this process may use)")
  parser.add_argument("--only", default=",".join(w for w in WORKS if w not in NOT_BY_DEFAULT),
                      help=f"comma-separated work items among {', '.join(WORKS)} (default all "
                           f"but {', '.join(NOT_BY_DEFAULT)})")
  parser.add_argument("--jax-only", action="store_true", help="skip the PyTorch side")
  parser.add_argument("--cache", default="", help="JAX's persistent compilation cache directory")
  parser.add_argument("--input-examples", type=int, default=10000,
                      help="input_pipeline: CIFAR-sized training images written per format")
  args = parser.parse_args(argv)
  unknown = sorted(set(args.only.split(",")) - set(WORKS))
  if unknown:
    parser.error(f"--only: unknown work {', '.join(unknown)}; choose from {', '.join(WORKS)}")
  if args.num_examples <= max(args.negatives):
    parser.error(f"--num-examples ({args.num_examples}) must exceed --negatives "
                 f"({max(args.negatives)}): negatives come from the other classes' examples")
  return args


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(argv)
  runtime.set_xla_flags()
  pin_threads(args.threads)
  torch.set_num_threads(args.threads)
  runtime.enable_compilation_cache(args.cache or None)
  works = args.only.split(",")
  if "autoattack" in works:
    works.remove("autoattack")
    from experiments import autoattack_speed  # pylint: disable=g-import-not-at-top
    autoattack_speed.main(["--threads", str(args.threads), "--cache", args.cache])
    if not works:
      return
  if "input_pipeline" in works:
    works.remove("input_pipeline")
    print_input_pipeline(args, argv)
    if not works:
      return

  peak, derivation = nominal_peak(args.threads)
  ceiling = matmul_ceiling()
  print(f"# JAX vs PyTorch: {args.student} student, {args.teacher} teacher, "
        f"{args.image_size}x{args.image_size}, {args.precision}, N={args.num_examples}\n")
  print(f"- command: `python -m experiments.benchmark {' '.join(argv or sys.argv[1:])}`")
  print(f"- jax {jax.__version__}, torch {torch.__version__}, python {platform.python_version()}")
  print(f"- threads: {args.threads} (CPUs {sorted(os.sched_getaffinity(0))}; "
        f"torch.get_num_threads() = {torch.get_num_threads()}; XLA sizes its pool from the "
        f"affinity mask)")
  print(f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`; compilation cache: "
        f"{args.cache or 'off'}")
  print(f"- nominal fp32 peak: {derivation}")
  print(f"- measured fp32 matmul (2048^3): JAX {ceiling['jax']:.0f} GFLOP/s, "
        f"PyTorch {ceiling['pytorch']:.0f} GFLOP/s")
  print(f"- median of {args.repeats} interleaved runs after {args.warmup} warm-up(s); load "
        f"average before: {_load()}", flush=True)

  rows = []
  for batch in args.batch:
    for negatives in args.negatives:
      bench = Bench(argparse.Namespace(**dict(vars(args), batch=batch, negatives=negatives)))
      if args.precision != "fp32" and not rows:
        drift_jax, drift_torch = bench.logit_drift()
        print(f"- logit drift of {args.precision} from fp32 (student, eval forward, max |diff| / "
              f"max |logit|): JAX {drift_jax:.2e}, PyTorch autocast {drift_torch:.2e}",
              flush=True)
      for name in works:
        if name != "gacd_step" and negatives != args.negatives[0]:
          continue  # only GACD has negatives
        work = getattr(bench, name)()
        timing = measure(work, args.warmup, args.repeats)
        row = {"work": name, "batch": batch}
        if name == "gacd_step":
          row["K"] = negatives
        row["JAX img/s"] = f"{batch / timing['jax']:.1f}"
        if "torch" in timing:
          row["PyTorch img/s"] = f"{batch / timing['torch']:.1f}"
          row["JAX/PyTorch"] = f"{timing['torch'] / timing['jax']:.2f}"
        compiled = work.compiled
        row["JAX compile s"] = f"{compiled.seconds:.1f}"
        row["JAX memory MB"] = f"{compiled.memory / 2**20:.0f}"
        row["GFLOP/img"] = f"{compiled.flops / batch / 1e9:.2f}"
        for side, label in (("jax", "JAX"), ("torch", "PyTorch")):
          if side in timing:
            rate = compiled.flops / timing[side]
            row[f"{label} GFLOP/s (% peak)"] = f"{rate / 1e9:.0f} ({100 * rate / peak:.0f}%)"
        rows.append(row)
        print(f"{name} batch {batch} K {negatives}: done", file=sys.stderr, flush=True)
  print(f"- load average after: {_load()} (other processes on these CPUs slow both sides)\n")
  keys = list(dict.fromkeys(k for row in rows for k in row))
  print(report.markdown_table([{k: row.get(k, "") for k in keys} for row in rows]))


def print_input_pipeline(args: argparse.Namespace, argv: Optional[list[str]]) -> None:
  """The `input_pipeline` row: its header and table (see `experiments/input_pipeline.py`)."""
  print(f"# Input pipeline: CIFAR-10-sized images from each stored format\n")
  print(f"- command: `python -m experiments.benchmark {' '.join(argv or sys.argv[1:])}`")
  print(f"- jax {jax.__version__}, python {platform.python_version()}, "
        f"{len(os.sched_getaffinity(0))} CPUs, {args.input_examples} training images a format, "
        f"batch {args.batch[0]}; load average before: {_load()}", flush=True)
  rows = input_pipeline.run(args.input_examples, args.batch[0])
  print(f"- load average after: {_load()}\n")
  print(report.markdown_table(rows), flush=True)


if __name__ == "__main__":
  main()
