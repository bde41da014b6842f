"""Task-batched execution: every layer one op over all tasks of a meta-batch.

The model runs through its :class:`~maml_tf.core.fast_weights.BatchedModel`
(the plan's ``conv_impl``); adapted weights carry a task axis, the others
stay shared. With ``plan.query_chunk`` (``recompute=True``) the query pass is
checkpointed too and recomputed chunk by chunk in the backward pass.
"""

from typing import Callable, Optional

import tensorflow as tf

from maml_tf.core import inner_loop
from maml_tf.core.strategies import base


def summed_task_loss(ctx):
  """The support loss of the batched inner loop: the sum of task losses.

  Tasks are independent, so the gradient of the sum with respect to task
  ``t``'s weights is that task's own gradient.
  """
  return lambda y, pred: tf.reduce_sum(ctx.task_loss(y, pred))


def plain_inputs(batch):
  """``batch`` with a one-tensor input structure unwrapped to the tensor.

  (``{"a": x}`` for a model built on ``keras.Model({"a": a}, ...)``); the
  inputs of a model with several stay the structure it takes.
  """
  sx, sy, qx, qy = batch
  one = lambda x: tf.nest.flatten(x)[0] if len(tf.nest.flatten(x)) == 1 else x
  return one(sx), sy, one(qx), qy


def num_tasks_of(x):
  """The task count of inputs ``x`` (a tensor or a structure of them):
  static where known, else a scalar tensor."""
  first = tf.nest.flatten(x)[0]
  return first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]


def task_slice(x, a, b):
  """Tasks ``a:b`` of inputs ``x`` (a tensor or a structure of them)."""
  return tf.nest.map_structure(lambda t: t[a:b], x)


class Batched(base.Strategy):
  """All tasks at once through the task-batched fast-weights model."""

  def run_tasks(self, ctx, plan, task_pass, params, state, lrs, batch,
                return_fast=False):
    batched = ctx.batched(plan.conv_impl)
    sx, sy, qx, qy = plain_inputs(batch)
    with_acc = plan.accuracy
    num_tasks = num_tasks_of(sx)
    tile = lambda v: inner_loop.tile_tasks(v, num_tasks)
    # Per task; random layers' seeds offset to each task's stream.
    state = inner_loop.task_states(state, ctx.inner.seed_mask, num_tasks)
    task_losses, accs = {}, {}
    chunk = plan.query_chunk if not task_pass.first_order else None

    def score(step, fast, st):
      if step in task_pass.record_steps:
        fast, st = base.unless_differentiated(step, fast, st)
        st = ctx.inner.query_state(st, step)
        if step != 0 and chunk is not None:
          task_losses[step], accs[step] = recomputed_query(
              batched, ctx.task_loss, fast, st, qx, qy, chunk,
              ctx.accuracy if with_acc else None)
          return
        pred, _ = batched(fast, st, qx, training=True)
        task_losses[step] = ctx.task_loss(qy, pred)
        if with_acc:
          accs[step] = ctx.accuracy(qy, pred)

    score(0, params, state)          # shared weights: plain kernels
    # Adapted weights get a task axis; the others stay shared (cheaper).
    fast = [tile(p) if m else p for p, m in zip(params, ctx.adapt_mask)]
    fast, state = ctx.inner.adapt(
        fast, state, sx, sy, max(task_pass.record_steps), lrs,
        inner_lr=task_pass.inner_lr, first_order=task_pass.first_order,
        on_step=score, loss_fn=summed_task_loss(ctx),
        forward=lambda p, s, x: batched(p, s, x, training=True),
        recompute=plan.recompute and not task_pass.first_order)
    steps = task_pass.record_steps
    out = {"loss": tf.stack([task_losses[s] for s in steps], axis=1),
           "state": state}
    if with_acc:
      out["accuracy"] = tf.stack([accs[s] for s in steps], axis=1)
    if return_fast:
      out["fast"] = [f if m else tile(f)
                     for f, m in zip(fast, ctx.adapt_mask)]
    return out


def recomputed_query(batched, task_loss, fast, state, qx, qy, chunk: int,
                     accuracy: Optional[Callable]):
  """The task-batched query pass with gradient checkpointing, task-chunked.

  ``batched(params, state, x, training)`` runs tasks independently, so the
  query losses of ``chunk`` tasks at a time are the same numbers as all at
  once. The forward pass keeps none of its activations; the backward pass
  recomputes one chunk after another under a tape (serialised by control
  dependencies) and concatenates the per-task gradients (shared weights:
  summed). Peak memory of the query pass falls from all tasks' activations
  to one chunk's. Only first derivatives flow through this pass (the
  meta-gradient's second-order terms live in the inner steps), which is all
  a meta-gradient needs.

  Returns:
    ``(losses [T], accuracies [T] or None)``.
  """
  num_tasks = int(num_tasks_of(qx))
  bounds = [(a, min(a + chunk, num_tasks))
            for a in range(0, num_tasks, chunk)]
  floats = [i for i, s in enumerate(state) if s.dtype.is_floating]
  n = len(fast)
  # Per-task tensors carry a leading task axis of size num_tasks; shared
  # ones (ANIL's frozen body) do not and are passed whole to every chunk.
  per_task = [v.shape.rank is not None and v.shape.rank >= 1
              and v.shape[0] == num_tasks for v in fast]
  per_task += [True] * len(floats)

  def chunk_of(args, a, b):
    """The inputs of tasks ``a:b``: per-task slices, shared tensors whole."""
    return [v[a:b] if pt else v for v, pt in zip(args, per_task)]

  def run(part, a, b):
    # Non-float state (seeds) per task too: the chunk's rows.
    st = [s[a:b] for s in state]
    for i, value in zip(floats, part[n:]):
      st[i] = value
    pred, _ = batched(part[:n], st, task_slice(qx, a, b), training=True)
    return task_loss(qy[a:b], pred), pred

  @tf.custom_gradient
  def checkpointed(*args):
    task_losses, accs, prev = [], [], []
    for a, b in bounds:
      with tf.control_dependencies(prev):
        part = chunk_of([tf.identity(v) for v in args], a, b)
      loss, pred = run(part, a, b)
      task_losses.append(loss)
      if accuracy is not None:
        accs.append(accuracy(qy[a:b], pred))
      prev = [loss]
    loss = tf.concat(task_losses, 0)
    acc = tf.concat(accs, 0) if accs else tf.zeros_like(loss)

    def grad(dloss, dacc, variables=None):
      del dacc                     # accuracy is a metric
      pieces, prev = [], [dloss]
      for a, b in bounds:
        with tf.control_dependencies(prev):
          ids = [tf.identity(v) for v in args]
        # Watch the chunk's slices, not the whole tensors: their gradient
        # is the chunk's piece (no StridedSliceGrad of full size).
        part = [tf.identity(v) for v in chunk_of(ids, a, b)]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
          tape.watch(part)
          loss_c, _ = run(part, a, b)
        g = tape.gradient(loss_c, part, output_gradients=dloss[a:b],
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
        pieces.append(g)
        prev = [t for t in g if t is not None]
      grads = []
      for j, pt in enumerate(per_task):
        parts = [p[j] for p in pieces]
        grads.append(tf.concat(parts, 0) if pt else tf.add_n(parts))
      if variables is None:
        return grads
      return grads, [tf.zeros_like(v) for v in variables]
    return (loss, acc), grad

  loss, acc = checkpointed(*fast, *[state[i] for i in floats])
  return loss, (acc if accuracy is not None else None)
