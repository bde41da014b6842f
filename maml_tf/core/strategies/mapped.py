"""Mapped execution: one task's function over the task axis.

``plan.execution == "vectorized_map"`` runs it under ``tf.vectorized_map``
(one vectorised graph), ``"map_fn"`` under ``tf.map_fn`` (one task after
another). Any model that ``model.stateless_call`` can run works here; both
give the same numbers.
"""

import tensorflow as tf

from maml_tf.core import functional
from maml_tf.core import losses
from maml_tf.core.strategies import base


class Mapped(base.Strategy):
  """Per-task function mapped over the meta-batch."""

  def run_tasks(self, ctx, plan, task_pass, params, state, lrs, batch,
                return_fast=False):
    with_acc = plan.accuracy

    def run(task):
      sx, sy, qx, qy = task
      task_losses, accs = {}, {}

      def score(step, fast, st):
        if step in task_pass.record_steps:
          fast, st = base.unless_differentiated(step, fast, st)
          pred, _ = functional.functional_call(ctx.model, fast, st, qx, True)
          task_losses[step] = ctx.loss_fn(qy, pred)
          if with_acc:
            accs[step] = losses.sparse_accuracy(qy, pred)

      score(0, params, state)
      fast, final_state = ctx.inner.adapt(
          params, state, sx, sy, max(task_pass.record_steps), lrs,
          inner_lr=task_pass.inner_lr, first_order=task_pass.first_order,
          on_step=score, recompute=plan.recompute and not task_pass.first_order)
      out = {"loss": tf.stack([task_losses[s] for s in task_pass.record_steps]),
             "state": final_state}
      if with_acc:
        out["accuracy"] = tf.stack([accs[s] for s in task_pass.record_steps])
      if return_fast:
        out["fast"] = fast
      return out

    elems = tuple(batch)
    if plan.execution == "vectorized_map":
      return tf.vectorized_map(run, elems, fallback_to_while_loop=False)
    spec = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype),
        run(tuple(t[0] for t in elems)))  # traced once to learn the output spec
    return tf.map_fn(run, elems, fn_output_signature=spec)
