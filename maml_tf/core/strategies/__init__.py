"""Execution strategies: how the tasks of a meta-batch run.

:func:`select` picks the strategy of an
:class:`~maml_tf.core.plan.ExecutionPlan`:

==========================  ==============================================
plan                        strategy
==========================  ==============================================
execution "batched"         :class:`Batched` (task-batched kernels)
execution "vectorized_map"  :class:`Mapped` under ``tf.vectorized_map``
  or "map_fn"                 or ``tf.map_fn``
closed_form                 :class:`ClosedForm` around the above
task_chunk                  :class:`Chunked` around the above
split_gradients             :class:`SplitGradients` (batched inner loops,
                            query passes chunk by chunk)
==========================  ==============================================

All give the same numbers (tested in float64 against the mapped path).
"""

from maml_tf.core.strategies.base import Context, Strategy, TaskPass
from maml_tf.core.strategies.batched import Batched
from maml_tf.core.strategies.chunked import Chunked, SplitGradients
from maml_tf.core.strategies.closed_form import ClosedForm
from maml_tf.core.strategies.mapped import Mapped

_BATCHED, _MAPPED, _SPLIT = Batched(), Mapped(), SplitGradients()


def select(plan) -> Strategy:
  """The strategy that runs ``plan``."""
  if plan.split_gradients:
    return _SPLIT
  tasks = _BATCHED if plan.execution == "batched" else _MAPPED
  if plan.closed_form:
    tasks = ClosedForm(tasks)
  if plan.task_chunk:
    tasks = Chunked(tasks)
  return tasks
