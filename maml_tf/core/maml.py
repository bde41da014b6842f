"""Compatibility names: the learner moved to :mod:`maml_tf.core.learner`.

The pure inner loop is :mod:`maml_tf.core.inner_loop`, losses and metrics
:mod:`maml_tf.core.losses`, the execution plan :mod:`maml_tf.core.plan`.
"""

from maml_tf.core.cloning import clone_with_weights, refresh_batchnorm_statistics
from maml_tf.core.inner_loop import adapt_params, inner_update
from maml_tf.core.learner import EXECUTIONS, INNER_LR_MODES, MAML, StepResult
from maml_tf.core.losses import (multi_step_loss_weights, sparse_accuracy,
                                 sparse_accuracy_per_task)
from maml_tf.core.plan import ExecutionPlan, query_chunk_size

__all__ = ["MAML", "StepResult", "ExecutionPlan", "adapt_params",
           "inner_update", "clone_with_weights",
           "refresh_batchnorm_statistics", "multi_step_loss_weights",
           "sparse_accuracy", "sparse_accuracy_per_task", "query_chunk_size",
           "EXECUTIONS", "INNER_LR_MODES"]
