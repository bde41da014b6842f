"""The closed-form meta-gradient of Dense/MSE chains (:mod:`dense_chain`).

Used when the plan says ``closed_form`` (the learner found a
:class:`~maml_tf.core.dense_chain.DenseChain`, the inner step size is fixed,
no accuracy is reported). Task passes without a gradient (evaluation, the
meta-loss) run on the wrapped strategy.
"""

import tensorflow as tf

from maml_tf.core import dense_chain
from maml_tf.core import numerics
from maml_tf.core.strategies import base


class ClosedForm(base.Wrapper):
  """Written-out backward pass and Hessian-vector products."""

  def meta_gradients(self, ctx, plan, task_pass, params, state, lrs, batch):
    if lrs or task_pass.inner_lr is not None:
      return self.tasks.meta_gradients(ctx, plan, task_pass, params, state,
                                       lrs, batch)
    grads, task_losses = dense_chain.meta_gradients(
        ctx.chain, params, batch, ctx.inner.step_sizes.inner_lr,
        max(task_pass.record_steps), task_pass.first_order,
        task_pass.record_steps, xla=plan.xla)
    loss = numerics.check_meta_loss(tf.reduce_mean(task_losses[:, -1]))
    return grads, {"loss": task_losses, "state": []}, loss
