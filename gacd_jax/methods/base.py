"""The method interface: what a distillation or adversarial-training method supplies to the step.

A method is three pure pieces, bundled in a `Method`:
  (a) `objective(ctx)`: the per-example function its training attack maximises (or no attack);
  (b) `loss(ctx, x_adv) -> (scalar, metrics, new_state)`: the training loss;
  (c) `init(rng, info) -> (params, state)`: its own trainable parameters (e.g. projection heads,
      trained with the student) and the state it carries between steps (e.g. memory banks). Both
      live in the train state and are checkpointed with it.

The step builds a `Context` for each piece. `ctx.student(x)` runs the student; during the attack it
uses the BatchNorm mode the method asks for (running statistics, or batch statistics without
updating them), and in the loss it runs in train mode and its BatchNorm updates are kept, in call
order, as PyTorch's would be (`ctx.student(x, update_stats=False)` keeps none: the methods'
clean forward does so when `config.method.clean_bn_update` is False). `ctx.teacher(x)` runs the
frozen teacher in eval mode with its variables behind `stop_gradient` (gradients reach its
input, so an attack may go through the teacher, as AdaAD's does); `ctx.teacher_clean` is its
output on the clean batch, computed once per step.
"""

import dataclasses
from typing import Any, Callable, Literal, Optional

import jax
import numpy as np
from ml_collections import ConfigDict

PyTree = Any
Outputs = tuple[jax.Array, jax.Array]  # (logits [B, C], features [B, D])
Forward = Callable[[jax.Array], Outputs]
BNMode = Literal["eval", "train"]


@dataclasses.dataclass(frozen=True)
class Context:
  """Everything a method's objective or loss may read. Arrays and functions only; no hidden state.

  Attributes:
    student: `x [B, H, W, C] in [0, 1] -> (logits, features)` of the student being trained.
    teacher: the same for the frozen teacher (eval mode, variables behind stop_gradient), or None.
    teacher_clean: `teacher(batch['image'])`, computed once per step, or None.
    batch: 'image' (the augmented clean inputs), 'label' `[B]` int32, 'index' `[B]` int32
      (dataset positions, for memory banks).
    params: the method's own trainable parameters (from `init`), `{}` if none.
    state: the method's carried state (from `init` or the previous step), `{}` if none.
    rng: a key private to this piece in this step.
    step: the global step (int32 scalar), for schedules inside a loss.
  """
  student: Forward
  teacher: Optional[Forward]
  teacher_clean: Optional[Outputs]
  batch: dict[str, jax.Array]
  params: PyTree
  state: PyTree
  rng: jax.Array
  step: jax.Array


@dataclasses.dataclass(frozen=True)
class InitInfo:
  """What `Method.init` may size its parameters and state by.

  `train_labels` `[num_examples]` int32 holds the label of every training example by dataset index
  (e.g. to draw contrastive negatives from other classes).
  """
  num_examples: int
  train_labels: np.ndarray
  steps_per_epoch: int
  num_classes: int
  student_feature_dim: int
  teacher_feature_dim: Optional[int]
  teacher_num_classes: Optional[int]


LossFn = Callable[[Context, Optional[jax.Array]], tuple[jax.Array, dict[str, jax.Array], PyTree]]
ObjectiveFn = Callable[[Context], Callable[[jax.Array], jax.Array]]
InitFn = Callable[[jax.Array, InitInfo], tuple[PyTree, PyTree]]


def no_init(rng: jax.Array, info: InitInfo) -> tuple[PyTree, PyTree]:
  del rng, info
  return {}, {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method.

  Attributes:
    loss: `(ctx, x_adv) -> (loss, metrics, new_state)`. `x_adv` is None for methods without an
      attack. `metrics` holds scalars; the optional entries 'logits_clean' and 'logits_adv'
      (`[B, C]`) are turned into accuracies by the step.
    objective: `ctx -> (x_adv -> [B])` maximised by the training attack; None for no attack.
    attack_start: the random start of the method's public code ('uniform', 'gaussian', 'none').
    attack_bn: BatchNorm during the attack: 'eval' (running statistics) or 'train' (batch
      statistics, not updated).
    uses_teacher: whether the step must load and run a teacher.
    init: `(rng, InitInfo) -> (params, state)`.
  """
  name: str
  loss: LossFn
  objective: Optional[ObjectiveFn] = None
  attack_start: str = "uniform"
  attack_bn: BNMode = "eval"
  uses_teacher: bool = False
  init: InitFn = no_init


MethodFactory = Callable[[ConfigDict], Method]


def student_on_clean(ctx: Context, update_stats: bool) -> Outputs:
  """`ctx.student` on the clean batch, keeping its BatchNorm update or not
  (`config.method.clean_bn_update`); the keyword is passed only when False, so a plain forward
  function (a test's, a user's) serves every method at the default."""
  if update_stats:
    return ctx.student(ctx.batch["image"])
  return ctx.student(ctx.batch["image"], update_stats=False)
