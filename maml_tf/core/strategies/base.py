"""The interface every execution strategy implements, and what it is given.

A strategy runs the tasks of a meta-batch for one :class:`ExecutionPlan`:
:meth:`Strategy.run_tasks` adapts every task (:func:`inner_loop.adapt_params`
through the context's :class:`~maml_tf.core.inner_loop.InnerLoop`) and
scores its query set after each recorded step; :meth:`Strategy.meta_gradients`
differentiates the meta-objective. Strategies see a :class:`Context` (model,
losses, inner loop, batched kernels, objective), never the learner.
"""

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from maml_tf.core import inner_loop as inner_loop_lib
from maml_tf.core import losses
from maml_tf.core import numerics
from maml_tf.core.plan import ExecutionPlan


@dataclasses.dataclass(frozen=True)
class TaskPass:
  """What one pass over the tasks computes.

  Attributes:
    record_steps: query metrics after these step counts (ascending).
    inner_lr: a fixed step size overriding the learner's; ``None``: its own.
    first_order: drop the second-order terms.
  """
  record_steps: Tuple[int, ...]
  inner_lr: Optional[float]
  first_order: bool

  @property
  def scored_before(self) -> bool:
    return self.record_steps[0] == 0


@dataclasses.dataclass(frozen=True)
class Context:
  """Everything a strategy needs from a learner.

  Attributes:
    model: the Keras model (a function only; never written).
    inner: the adaptation (support loss, adapt mask, step sizes).
    loss_fn: ``(y, pred) -> scalar`` of one task.
    task_loss: ``(y [T, N, ...], pred) -> [T]`` of a meta-batch.
    batched: ``conv_impl -> BatchedModel`` (the task-batched kernels).
    objective: ``(losses [T, S], task_pass) -> scalar`` meta-loss.
    chain: the model's closed-form :class:`DenseChain`, or ``None``.
    accuracy: ``(y [T, N], pred) -> [T]`` of a meta-batch (the loss's
      ``ignore_class`` left out).
    loss_scale: ``() -> scalar`` or ``None``: the meta-loss is scaled by it
      before its gradient (which is unscaled again), mixed float16.
  """
  model: keras.Model
  inner: inner_loop_lib.InnerLoop
  loss_fn: Callable
  task_loss: Callable
  batched: Callable
  objective: Callable
  chain: Optional[object] = None
  loss_scale: Optional[Callable] = None
  accuracy: Callable = losses.sparse_accuracy_per_task

  @property
  def adapt_mask(self) -> Tuple[bool, ...]:
    return self.inner.adapt_mask


Outputs = Dict[str, object]


class Strategy:
  """How the tasks of a meta-batch run (one small interface)."""

  def run_tasks(self, ctx: Context, plan: ExecutionPlan, task_pass: TaskPass,
                params, state, lrs, batch, return_fast: bool = False
                ) -> Outputs:
    """Adapts every task and scores its query set.

    Returns:
      ``{"loss": [T, S], "accuracy": [T, S] (plan.accuracy), "state": list
      of [T, ...] per-task states, "fast": [T, ...] list (return_fast)}``.
    """
    raise NotImplementedError

  def meta_gradients(self, ctx: Context, plan: ExecutionPlan,
                     task_pass: TaskPass, params: Sequence[tf.Tensor], state,
                     lrs: Sequence[tf.Tensor], batch):
    """``(grads, out, loss)``: the meta-gradient w.r.t. ``params + lrs``.

    The default differentiates :meth:`run_tasks` with one tape.
    """
    scale = None if ctx.loss_scale is None else ctx.loss_scale()
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(list(params) + list(lrs))
      out = self.run_tasks(ctx, plan, task_pass, params, state, lrs, batch)
      loss = ctx.objective(out["loss"], task_pass)
      if scale is None:
        # Inside the tape: a check outside it would cut the gradient path.
        loss = numerics.check_meta_loss(loss)
        scaled = loss
      else:
        # Loss-scaled steps overflow now and then: the LossScaleOptimizer
        # skips those and lowers its scale.
        scaled = loss * tf.cast(scale, loss.dtype)
    grads = tape.gradient(scaled, list(params) + list(lrs),
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if scale is not None:
      grads = [g / tf.cast(scale, g.dtype) for g in grads]
    return grads, out, loss


class Wrapper(Strategy):
  """A strategy that changes how another one's meta-gradient is computed;
  its task passes are the wrapped strategy's."""

  def __init__(self, tasks: Strategy):
    self.tasks = tasks

  def run_tasks(self, *args, **kwargs):
    return self.tasks.run_tasks(*args, **kwargs)


def unless_differentiated(step, fast, state):
  """Step 0's query score is a metric, never part of the meta-objective.

  Scoring it through ``stop_gradient`` keeps it off the outer tape:
  otherwise the outer backward pass would run through the whole pre-update
  query forward pass with zero gradients.
  """
  if step != 0:
    return fast, state
  return ([tf.stop_gradient(f) for f in fast],
          [tf.stop_gradient(s) for s in state])
