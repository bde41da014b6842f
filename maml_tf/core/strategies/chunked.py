"""Task chunks: the meta-gradient of a meta-batch computed chunk by chunk.

The meta-objective is a mean over tasks, so the mean of per-chunk
meta-gradients (equal chunks) is the meta-gradient of the whole batch: the
same numbers with one chunk's activations alive. Two forms:

* :class:`Chunked`: the whole meta-gradient (inner loops and query passes)
  of one chunk after another inside a ``tf.map_fn``, over any strategy.
* :class:`SplitGradients` (batched path): the inner loops of all tasks at
  once (small support sets, a few large ops), the query passes chunk by
  chunk, and one outer backward pass through all inner loops.
"""

import tensorflow as tf

from maml_tf.core import inner_loop
from maml_tf.core import numerics
from maml_tf.core.strategies import base
from maml_tf.core.strategies import batched as batched_lib
from maml_tf.core.task_batch import TaskBatch


class Chunked(base.Wrapper):
  """``plan.task_chunk`` tasks at a time through ``tasks``'s meta-gradient."""

  def meta_gradients(self, ctx, plan, task_pass, params, state, lrs, batch):
    chunk = plan.task_chunk
    num_chunks = batch.num_tasks // chunk
    chunks = tf.nest.map_structure(
        lambda t: inner_loop.split_tasks(t, num_chunks, chunk), tuple(batch))
    dtype = params[0].dtype
    with_acc = plan.accuracy

    def body(args):
      index, c = args
      # Identities make the captured weights local to the loop body, where
      # the tape can watch them. Seeds move on to the chunk's first task.
      chunk_state = inner_loop.offset_task_seeds(
          state, ctx.inner.seed_mask, index * chunk)
      grads, out, loss = self.tasks.meta_gradients(
          ctx, plan, task_pass, [tf.identity(p) for p in params], chunk_state,
          [tf.identity(l) for l in lrs], TaskBatch(*c))
      out.pop("fast", None)
      out["loss"] = tf.cast(out["loss"], dtype)
      if with_acc:
        out["accuracy"] = tf.cast(out["accuracy"], tf.float32)
      return grads, out, tf.cast(loss, dtype)

    steps = len(task_pass.record_steps)
    out_spec = {"loss": tf.TensorSpec([chunk, steps], dtype),
                "state": [tf.TensorSpec([chunk] + s.shape.as_list(), s.dtype)
                          for s in state]}
    if with_acc:
      out_spec["accuracy"] = tf.TensorSpec([chunk, steps], tf.float32)
    spec = ([tf.TensorSpec(p.shape, p.dtype) for p in list(params) + list(lrs)],
            out_spec, tf.TensorSpec([], dtype))
    grads, out, chunk_losses = tf.map_fn(
        body, (tf.range(num_chunks, dtype=tf.int64), chunks),
        fn_output_signature=spec,
        parallel_iterations=plan.chunks_in_flight)
    out = tf.nest.map_structure(inner_loop.merge_chunks, out)
    return ([tf.reduce_mean(g, axis=0) for g in grads], out,
            tf.reduce_mean(chunk_losses))


class SplitGradients(batched_lib.Batched):
  """Task chunks on the query side only; the inner loops all at once.

  Each query chunk gives ``v_t = dL/dtheta'_t`` for its tasks; the outer
  backward pass then carries all ``v_t`` through the inner loops at once:
  ``grads = tape.gradient(theta', theta, output_gradients=v)``. The same
  meta-gradient as one pass over all tasks (tested).
  """

  def meta_gradients(self, ctx, plan, task_pass, params, state, lrs, batch):
    sx, sy, qx, qy = batched_lib.plain_inputs(batch)
    num_tasks = int(batched_lib.num_tasks_of(sx))
    chunk = plan.task_chunk
    model = ctx.batched(plan.conv_impl)
    support_model = ctx.batched(plan.support_conv_impl)
    with_acc = plan.accuracy
    params, lrs = list(params), list(lrs)
    tile = lambda v: inner_loop.tile_tasks(v, num_tasks)
    mask = list(ctx.adapt_mask)
    # Per task; random layers' seeds offset to each task's stream.
    state = inner_loop.task_states(state, ctx.inner.seed_mask, num_tasks)
    last = max(task_pass.record_steps)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(params + lrs)
      fast = [tile(p) if m else p for p, m in zip(params, mask)]
      fast, new_state = ctx.inner.adapt(
          fast, state, sx, sy,
          max(task_pass.record_steps), lrs, inner_lr=task_pass.inner_lr,
          first_order=task_pass.first_order,
          loss_fn=batched_lib.summed_task_loss(ctx),
          forward=lambda p, s, x: support_model(p, s, x, training=True))
    adapted = [f for f, m in zip(fast, mask) if m]
    shared = [f for f, m in zip(fast, mask) if not m]
    num_chunks = num_tasks // chunk
    split = lambda t: inner_loop.split_tasks(t, num_chunks, chunk)
    dtype = params[0].dtype

    def merge(per_task_values, shared_values):
      it_a, it_s = iter(per_task_values), iter(shared_values)
      return [next(it_a) if m else next(it_s) for m in mask]

    def body(c):
      fast_c, state_c, start_c, qx_c, qy_c = c
      fast_c = list(fast_c)
      local_shared = [tf.identity(v) for v in shared]
      with tf.GradientTape(watch_accessed_variables=False) as qtape:
        qtape.watch(fast_c + local_shared)
        pred, _ = model(merge(fast_c, local_shared),
                        ctx.inner.query_state(list(state_c), last), qx_c,
                        training=True)
        task_losses = ctx.task_loss(qy_c, pred)
        total = tf.reduce_sum(task_losses) / num_tasks
      grads = qtape.gradient(total, fast_c + local_shared,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
      rows = [task_losses]
      accs = [ctx.accuracy(qy_c, pred)] if with_acc else []
      if task_pass.scored_before:   # a metric at theta: shared weights, state
        pred0, _ = model([tf.identity(p) for p in params],
                         ctx.inner.query_state(list(start_c), 0), qx_c,
                         training=True)
        rows.insert(0, ctx.task_loss(qy_c, pred0))
        if with_acc:
          accs.insert(0, ctx.accuracy(qy_c, pred0))
      out = {"loss": tf.cast(tf.stack(rows, axis=1), dtype)}
      if with_acc:
        out["accuracy"] = tf.cast(tf.stack(accs, axis=1), tf.float32)
      return grads[:len(fast_c)], grads[len(fast_c):], out

    steps = len(task_pass.record_steps)
    out_spec = {"loss": tf.TensorSpec([chunk, steps], dtype)}
    if with_acc:
      out_spec["accuracy"] = tf.TensorSpec([chunk, steps], tf.float32)
    spec = ([tf.TensorSpec([chunk] + f.shape[1:].as_list(), f.dtype)
             for f in adapted],
            [tf.TensorSpec(f.shape, f.dtype) for f in shared], out_spec)
    v_adapted, v_shared, out = tf.map_fn(
        body, ([split(f) for f in adapted], [split(v) for v in new_state],
               [split(v) for v in state], tf.nest.map_structure(split, qx),
               split(qy)),
        fn_output_signature=spec, parallel_iterations=plan.chunks_in_flight)
    out = tf.nest.map_structure(inner_loop.merge_chunks, out)
    out["state"] = new_state
    loss = numerics.check_meta_loss(tf.reduce_mean(out["loss"][:, -1]))
    v = merge([inner_loop.merge_chunks(g) for g in v_adapted],
              [tf.reduce_sum(g, axis=0) for g in v_shared])
    grads = tape.gradient(fast, params + lrs, output_gradients=v,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return grads, out, loss
