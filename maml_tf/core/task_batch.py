"""The meta-batch container shared by every task family and learner."""

from typing import NamedTuple

import numpy as np
import tensorflow as tf


class TaskBatch(NamedTuple):
  """A meta-batch of tasks, each with a support (train) and a query (test) set.

  Every field has a leading task axis ``[T, ...]``: ``support_x[i]`` holds the
  K support inputs of task ``i``, ``query_y[i]`` the labels of its query set.

  Inputs may be nested: for a model with several inputs, ``support_x`` and
  ``query_x`` are a tuple, list or dict of tensors (the structure the model
  takes), each with the task and example axes; support and query share the
  structure.

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
    return int(first_leaf(self.support_x).shape[0])

  def validate(self) -> "TaskBatch":
    """Checks that the four fields agree in shape; raises ``ValueError`` naming the field."""
    return validate_task_batch(self)


def _shape(x):
  return tuple(getattr(x, "shape", ()))


def first_leaf(x):
  """The first tensor of a (possibly nested) input."""
  return tf.nest.flatten(x)[0]


def is_nested(x) -> bool:
  """Is ``x`` a structure of several tensors (a multi-input model's input)?"""
  return tf.nest.is_nested(x)


def _as_tensor(t, dtype):
  if not isinstance(t, tf.Tensor):
    t = tf.convert_to_tensor(t)
  return tf.cast(t, dtype) if t.dtype.is_floating and t.dtype != dtype else t


def as_tensors(x, dtype):
  """``x`` (one input or a structure of them) as tensors, floats as ``dtype``."""
  if not is_nested(x):
    return _as_tensor(x, dtype)
  return tf.nest.map_structure(lambda t: _as_tensor(t, dtype), x)


def prepare_batch(batch, dtype) -> TaskBatch:
  """``batch`` validated, as tensors, float fields cast to ``dtype``."""
  batch = validate_task_batch(batch)
  return TaskBatch(*(as_tensors(field, dtype) for field in batch))


def validate_task_batch(batch: TaskBatch) -> TaskBatch:
  """Raises ValueError with a message naming the disagreeing fields."""
  if not isinstance(batch, TaskBatch):
    if isinstance(batch, (tuple, list)) and len(batch) == 4:
      batch = TaskBatch(*batch)
    else:
      raise TypeError(f"expected a maml_tf.TaskBatch, got {type(batch).__name__}")

  names = ("support_x", "support_y", "query_x", "query_y")
  for name in names:
    _check_not_numbers_in_lists(name, getattr(batch, name))
  for name in ("support_x", "query_x"):
    _check_leaves(name, getattr(batch, name))
  for name in ("support_y", "query_y"):
    if is_nested(getattr(batch, name)):
      raise ValueError(
          f"TaskBatch.{name} must be one tensor (models with several outputs "
          "are not supported; several inputs are)")
  try:
    tf.nest.assert_same_structure(batch.support_x, batch.query_x)
  except (ValueError, TypeError) as e:
    raise ValueError("support_x and query_x must have the same structure "
                     f"(the model's inputs): {e}") from None
  if is_nested(batch.support_x):
    for path, s, q in zip(_paths(batch.support_x),
                          tf.nest.flatten(batch.support_x),
                          tf.nest.flatten(batch.query_x)):
      if _shape(s)[2:] != _shape(q)[2:]:
        raise ValueError(
            f"support and query inputs {path} disagree in shape: support_x "
            f"{_shape(s)} vs query_x {_shape(q)} (everything after the first "
            "two axes must match)")
  sx, sy, qx, qy = (_shape(first_leaf(f)) for f in batch)
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
  if sx[2:] != qx[2:] and not is_nested(batch.support_x):
    raise ValueError(
        f"support and query inputs disagree in shape: support_x {sx} vs "
        f"query_x {qx} (everything after the first two axes must match)")
  if sy[2:] != qy[2:]:
    raise ValueError(
        f"support and query labels disagree in shape: support_y {sy} vs "
        f"query_y {qy} (everything after the first two axes must match)")
  return batch


def _paths(x):
  """Names of the leaves of ``x`` for messages: ``[0]``, ``['ids']``."""
  if isinstance(x, dict):
    return [f"[{k!r}]" for k in sorted(x)]
  return [f"[{i}]" for i in range(len(tf.nest.flatten(x)))]


def _check_not_numbers_in_lists(name, x):
  """Lists, tuples and dicts stand for several inputs: Python numbers
  inside them (an array written as lists) are refused, naming the fix."""
  if isinstance(x, (list, tuple, dict)) and any(
      isinstance(leaf, (int, float, bool, np.generic))
      for leaf in tf.nest.flatten(x)):
    raise ValueError(
        f"TaskBatch.{name} is a Python {type(x).__name__} holding numbers; "
        "give each input as one array or tensor (np.asarray of its nested "
        "lists): a list, tuple or dict in a TaskBatch holds a model's "
        "several inputs")


def _check_leaves(name, x):
  """Every input of a nested ``x`` has the same task and example axes."""
  leaves = tf.nest.flatten(x)
  if not leaves:
    raise ValueError(f"TaskBatch.{name} is empty")
  if len(leaves) == 1:
    return
  heads = {path: _shape(t)[:2] for path, t in zip(_paths(x), leaves)}
  for path, head in heads.items():
    if len(head) < 2:
      raise ValueError(f"TaskBatch.{name}{path} must have a task axis and an "
                       f"example axis [T, N, ...]; got shape {head}")
  if len(set(heads.values())) > 1:
    raise ValueError(f"the inputs of TaskBatch.{name} disagree on the task "
                     f"and example axes [T, N]: {heads}")
