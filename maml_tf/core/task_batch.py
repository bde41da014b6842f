"""The meta-batch container shared by every task family and learner."""

from typing import NamedTuple

import tensorflow as tf


class TaskBatch(NamedTuple):
  """A meta-batch of tasks, each with a support (train) and a query (test) set.

  Every field has a leading task axis ``[T, ...]``: ``support_x[i]`` holds the
  K support inputs of task ``i``, ``query_y[i]`` the labels of its query set.

  Arguments:
    support_x: ``[T, K, *input_shape]`` inputs the inner loop adapts on.
    support_y: ``[T, K, *label_shape]`` their labels.
    query_x: ``[T, Q, *input_shape]`` inputs the adapted model is scored on.
    query_y: ``[T, Q, *label_shape]`` their labels.

  Example:
    >>> import numpy as np
    >>> b = TaskBatch(np.zeros((4, 5, 1)), np.zeros((4, 5, 1)),
    ...               np.zeros((4, 10, 1)), np.zeros((4, 10, 1)))
    >>> b.num_tasks
    4
  """

  support_x: tf.Tensor
  support_y: tf.Tensor
  query_x: tf.Tensor
  query_y: tf.Tensor

  @property
  def num_tasks(self) -> int:
    return int(self.support_x.shape[0])

  def validate(self) -> "TaskBatch":
    """Checks that the four fields agree in shape; raises ``ValueError`` naming the field."""
    return validate_task_batch(self)


def _shape(x):
  return tuple(getattr(x, "shape", ()))


def prepare_batch(batch, dtype) -> TaskBatch:
  """``batch`` validated, as tensors, float fields cast to ``dtype``."""
  batch = validate_task_batch(batch)
  sx, qx = (tf.convert_to_tensor(t) for t in (batch.support_x, batch.query_x))
  if sx.dtype.is_floating and sx.dtype != dtype:
    sx, qx = tf.cast(sx, dtype), tf.cast(qx, dtype)
  sy, qy = (tf.convert_to_tensor(t) for t in (batch.support_y, batch.query_y))
  if sy.dtype.is_floating and sy.dtype != dtype:
    sy, qy = tf.cast(sy, dtype), tf.cast(qy, dtype)
  return TaskBatch(sx, sy, qx, qy)


def validate_task_batch(batch: TaskBatch) -> TaskBatch:
  """Raises ValueError with a message naming the disagreeing fields."""
  if not isinstance(batch, TaskBatch):
    if isinstance(batch, (tuple, list)) and len(batch) == 4:
      batch = TaskBatch(*batch)
    else:
      raise TypeError(f"expected a maml_tf.TaskBatch, got {type(batch).__name__}")

  sx, sy, qx, qy = (_shape(f) for f in batch)
  names = ("support_x", "support_y", "query_x", "query_y")
  for name, s in zip(names, (sx, sy, qx, qy)):
    if len(s) < 2:
      raise ValueError(
          f"TaskBatch.{name} must have a task axis and an example axis "
          f"[T, N, ...]; got shape {s}")
  for name, s in (("support_x", sx), ("query_x", qx)):
    if s[1] == 0:
      raise ValueError(
          f"TaskBatch.{name} has no examples per task (shape {s}): the "
          + ("inner loop adapts on at least one support example (shot, "
             "k_shot >= 1)" if name == "support_x" else
             "meta-objective scores at least one query example (query, "
             "k_query >= 1)"))
  tasks = {n: s[0] for n, s in zip(names, (sx, sy, qx, qy))}
  if len({t for t in tasks.values() if t is not None}) > 1:
    raise ValueError(f"TaskBatch fields disagree on the number of tasks: {tasks}")
  if sx[1] != sy[1] and None not in (sx[1], sy[1]):
    raise ValueError(
        f"support_x has {sx[1]} examples per task but support_y has {sy[1]} "
        f"(shapes {sx} vs {sy})")
  if qx[1] != qy[1] and None not in (qx[1], qy[1]):
    raise ValueError(
        f"query_x has {qx[1]} examples per task but query_y has {qy[1]} "
        f"(shapes {qx} vs {qy})")
  if sx[2:] != qx[2:]:
    raise ValueError(
        f"support and query inputs disagree in shape: support_x {sx} vs "
        f"query_x {qx} (everything after the first two axes must match)")
  if sy[2:] != qy[2:]:
    raise ValueError(
        f"support and query labels disagree in shape: support_y {sy} vs "
        f"query_y {qy} (everything after the first two axes must match)")
  return batch
