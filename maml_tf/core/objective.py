"""The meta-objective of a training step, its metrics and the state it writes.

An :class:`Objective` is fixed by a learner's options: which inner-step
counts a training pass scores (the last, every step with MAML++'s multi-step
loss, and step 0 when pre-update metrics are asked for), how the query
losses make the meta-loss, which metrics a step reports, and how the tasks'
non-trainable state is written back (BatchNorm statistics: the task mean;
RNG seeds: advanced; frozen weights: kept).
"""

import dataclasses
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import tensorflow as tf

from maml_tf.core import inner_loop
from maml_tf.core import losses
from maml_tf.core.strategies import TaskPass


class StepResult(NamedTuple):
  """What :meth:`maml_tf.MAML.compute_gradients` returns (traced tensors).

  Attributes:
    grads: one per meta-variable (:attr:`maml_tf.MAML.meta_variables`).
    loss: the meta-objective.
    metrics: ``{name: scalar}`` (:meth:`Objective.metric_names`).
    new_state: one per non-trainable variable: the value to write.
  """
  grads: list
  loss: tf.Tensor
  metrics: Dict[str, tf.Tensor]
  new_state: list


@dataclasses.dataclass(frozen=True)
class Objective:
  """The training objective of a learner.

  Attributes:
    inner_steps: inner steps during meta-training.
    multi_step_iterations: MAML++ multi-step loss annealing (0: off).
    state_kinds: per non-trainable variable, ``"mean"``, ``"seed"``, ``"first"``
      or ``"keep"`` (:func:`maml_tf.core.functional.state_kinds`).
    penalties: ``(index, regularizer)`` of the trainable variables with a
      weight regularizer (:func:`weight_penalties`): the meta-objective
      adds ``regularizer(theta[index])``, as Keras' ``fit`` adds them to the
      loss; the inner steps adapt on the support loss alone.
  """
  inner_steps: int
  multi_step_iterations: int
  state_kinds: Tuple[str, ...]
  penalties: Tuple[Tuple[int, Callable], ...] = ()

  def training_pass(self, first_order: bool,
                    pre_update_metrics: bool = True) -> TaskPass:
    """Steps scored while training: the objective's, and 0 if asked."""
    before = bool(pre_update_metrics)
    if self.multi_step_iterations:
      steps = tuple(range(0 if before else 1, self.inner_steps + 1))
    else:
      steps = (0, self.inner_steps) if before else (self.inner_steps,)
    return TaskPass(steps, None, first_order)

  def meta_loss(self, task_losses, task_pass: TaskPass,
                iteration: Optional[tf.Tensor] = None):
    """The meta-loss of ``[T, S]`` query losses (``iteration``: MAML++)."""
    weights = None
    if self.multi_step_iterations:
      weights = losses.multi_step_loss_weights(
          iteration, self.inner_steps, self.multi_step_iterations)
    return losses.meta_objective(task_losses, task_pass.scored_before, weights)

  def metric_names(self, accuracy: bool,
                   pre_update_metrics: bool) -> Tuple[str, ...]:
    """The keys of a meta-step's metrics."""
    before = bool(pre_update_metrics)
    names = ["loss_after"] + (["loss_before"] if before else [])
    if self.multi_step_iterations:
      names.append("meta_loss")
    if accuracy:
      names += ["accuracy_after"] + (["accuracy_before"] if before else [])
    return tuple(names)

  def penalty(self, params):
    """The weight regularizers' penalty on ``params`` (theta; 0 without
    regularizers)."""
    terms = [tf.cast(regularizer(params[i]), params[i].dtype)
             for i, regularizer in self.penalties]
    return tf.add_n(terms) if terms else 0.0

  def penalized(self, grads, loss, params):
    """``(grads, loss)`` with the weight regularizers' penalty on
    ``params`` (theta) and its gradient added."""
    if not self.penalties:
      return grads, loss
    grads = list(grads)
    indices = [i for i, _ in self.penalties]
    thetas = [params[i] for i in indices]
    with tf.GradientTape() as tape:
      tape.watch(thetas)
      penalty = self.penalty(params)
    extra = tape.gradient(penalty, thetas)
    for i, g in zip(indices, extra):
      if g is None:               # a penalty that does not depend on it
        continue
      grads[i] = g if grads[i] is None else (
          tf.convert_to_tensor(grads[i]) + tf.cast(g, grads[i].dtype))
    return grads, loss + tf.cast(penalty, loss.dtype)

  def result(self, grads, out, loss, state, accuracy: bool,
             task_pass: TaskPass, params=None) -> StepResult:
    """The :class:`StepResult` of a task pass's outputs ``out`` (with the
    weight penalties on ``params``, theta, added)."""
    if params is not None:
      grads, loss = self.penalized(grads, loss, params)
    value = {
        "loss_after": lambda: tf.reduce_mean(out["loss"][:, -1]),
        "loss_before": lambda: tf.reduce_mean(out["loss"][:, 0]),
        "meta_loss": lambda: loss,
        "accuracy_after": lambda: tf.reduce_mean(out["accuracy"][:, -1]),
        "accuracy_before": lambda: tf.reduce_mean(out["accuracy"][:, 0])}
    metrics = {name: value[name]() for name in
               self.metric_names(accuracy, task_pass.scored_before)}
    new_state = []
    for kind, old, per_task in zip(self.state_kinds, state, out["state"]):
      new_state.append(tf.reduce_mean(per_task, axis=0) if kind == "mean"
                       else inner_loop.next_seed(old) if kind == "seed"
                       else per_task[0] if kind == "first" else old)
    return StepResult(list(grads), loss, metrics, new_state)


def weight_penalties(model) -> Tuple[Tuple[int, Callable], ...]:
  """``(index, regularizer)`` of ``model``'s trainable variables that carry
  a weight regularizer (``kernel_regularizer``, ``bias_regularizer``, ...;
  ``index`` into ``model.trainable_variables``)."""
  return tuple((i, v.regularizer) for i, v in
               enumerate(model.trainable_variables)
               if getattr(v, "regularizer", None) is not None)

