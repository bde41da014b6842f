"""Mapped execution: one task's function over the task axis.

``plan.execution == "vectorized_map"`` runs it under ``tf.vectorized_map``
(one vectorised graph), ``"map_fn"`` under ``tf.map_fn`` (one task after
another). Any model that ``model.stateless_call`` can run works here; both
give the same numbers. Random layers draw per task
(:mod:`maml_tf.core.inner_loop`), which ``tf.vectorized_map`` cannot
vectorise: such models run under ``tf.map_fn``.
"""

import tensorflow as tf

from maml_tf.core import functional
from maml_tf.core import inner_loop
from maml_tf.core.strategies import base


class Mapped(base.Strategy):
  """Per-task function mapped over the meta-batch."""

  def run_tasks(self, ctx, plan, task_pass, params, state, lrs, batch,
                return_fast=False):
    with_acc = plan.accuracy
    seed_mask = ctx.inner.seed_mask

    def run(task):
      index, (sx, sy, qx, qy) = task
      task_losses, accs = {}, {}
      task_state = inner_loop.offset_task_seeds(state, seed_mask, index)

      def score(step, fast, st):
        if step in task_pass.record_steps:
          fast, st = base.unless_differentiated(step, fast, st)
          pred, _ = functional.functional_call(
              ctx.model, fast, ctx.inner.query_state(st, step), qx, True)
          task_losses[step] = ctx.loss_fn(qy, pred)
          if with_acc:
            accs[step] = ctx.accuracy(qy[None], pred[None])[0]

      score(0, params, task_state)
      fast, final_state = ctx.inner.adapt(
          params, task_state, sx, sy, max(task_pass.record_steps), lrs,
          inner_lr=task_pass.inner_lr, first_order=task_pass.first_order,
          on_step=score, recompute=plan.recompute and not task_pass.first_order)
      out = {"loss": tf.stack([task_losses[s] for s in task_pass.record_steps]),
             "state": final_state}
      if with_acc:
        out["accuracy"] = tf.stack([accs[s] for s in task_pass.record_steps])
      if return_fast:
        out["fast"] = fast
      return out

    num_tasks = tf.shape(tf.nest.flatten(batch.support_x)[0])[0]
    elems = (tf.range(tf.cast(num_tasks, tf.int64)), tuple(batch))
    if plan.execution == "vectorized_map":
      return tf.vectorized_map(run, elems, fallback_to_while_loop=False)
    spec = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype),
        run(tf.nest.map_structure(lambda t: t[0], elems)))  # traced once to learn the output spec
    return tf.map_fn(run, elems, fn_output_signature=spec)
