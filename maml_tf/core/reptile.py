"""Reptile (Nichol, Achiam & Schulman 2018): first-order meta-learning by
moving the initialisation toward the adapted weights.

For each task, run ``inner_steps`` SGD steps on its support set from theta to
theta_i'; then ``theta <- theta + epsilon * mean_i(theta_i' - theta)``. This is
implemented as a "gradient" ``theta - mean_i theta_i'`` handed to the meta
optimizer: with ``SGD(epsilon)`` (the default) it is exactly Reptile's update;
with Adam it is the common Adam variant. No second derivatives, no query loss
in the update: the query set is only scored (``loss_before/after``).

Reptile overrides only :meth:`maml_tf.MAML.compute_gradients`, so everything
else -- ``evaluate``, ``adapt``, export, task-batched execution, distributed
training -- is :class:`maml_tf.MAML`'s.

Example:
  >>> reptile = Reptile(model, "mse", inner_lr=0.02, inner_steps=5,
  ...                   outer_step_size=0.1)
  >>> reptile.train_step(batch)
"""

from typing import Optional

import keras
import tensorflow as tf

from maml_tf.core import numerics
from maml_tf.core import strategies
from maml_tf.core.learner import MAML, StepResult


class Reptile(MAML):
  """Reptile on any built Keras 3 model.

  Arguments:
    model: a built Keras 3 model.
    loss: a Keras loss or ``(y_true, y_pred) -> scalar``.
    inner_lr: SGD step size of the inner loop.
    inner_steps: inner SGD steps per task and meta-iteration (>= 1).
    outer_step_size: epsilon; used by the default meta optimizer
      ``SGD(outer_step_size)``.
    meta_optimizer: optional Keras optimizer receiving ``theta - mean theta'``
      as the gradient.
    **kwargs: ``accuracy``, ``vectorize``, ``conv_impl``, ``adapt`` as for
      :class:`maml_tf.MAML`.
  """

  def __init__(self, model: keras.Model, loss, inner_lr: float = 0.01,
               inner_steps: int = 5, outer_step_size: float = 0.1,
               meta_optimizer: Optional[keras.optimizers.Optimizer] = None,
               **kwargs):
    for name in ("first_order", "learn_inner_lr", "multi_step_loss_iterations",
                 "first_order_until"):
      if kwargs.get(name):
        raise ValueError(f"Reptile does not take {name}")
    # Reptile's step takes no meta-gradient: no closed form (nor, with it,
    # automatic XLA) to pick; its step runs every task at once.
    kwargs.setdefault("closed_form", False)
    kwargs.setdefault("task_chunk", None)
    super().__init__(model, loss, inner_lr=inner_lr, inner_steps=inner_steps,
                     first_order=True,
                     meta_optimizer=meta_optimizer or keras.optimizers.SGD(
                         outer_step_size), **kwargs)
    self.outer_step_size = float(outer_step_size)

  def compute_gradients(self, batch, plan, pre_update_metrics: bool = True,
                        first_task=0) -> StepResult:
    """``theta - mean_i theta_i'`` as the gradient (traceable; no writes)."""
    params, state, lrs = self.meta_values()
    task_pass = self.training_pass(plan, pre_update_metrics)
    out = strategies.select(plan).run_tasks(
        self.context, plan, task_pass, params,
        self.task_state(state, first_task), lrs, batch, return_fast=True)
    pseudo_grads = [p - tf.reduce_mean(f, axis=0)
                    for p, f in zip(params, out["fast"])]
    loss = numerics.check_meta_loss(tf.reduce_mean(out["loss"][:, -1]),
                                    "the query loss after adaptation")
    return self.step_result(pseudo_grads, out, loss, state, plan, task_pass,
                            params)

  def meta_loss(self, batch):
    raise NotImplementedError(
        "Reptile has no differentiable meta-loss; use train_step")
