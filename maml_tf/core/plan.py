"""The execution plan: how one meta-batch runs, every "auto" resolved here.

:func:`resolve_plan` is the only place that turns a learner's requests
(``vectorize="auto"``, ``task_chunk="auto"``, ``jit_compile=None``, ...), the
facts of its model and the device into an :class:`ExecutionPlan`;
:meth:`maml_tf.MAML.plan` returns the plan a batch will run with, and
every compiled step is keyed by its plan. The rules:

* execution: ``"batched"`` (task-batched fast-weights kernels) when the
  model compiles to them and ``vectorize`` allows it, else
  ``"vectorized_map"``, else ``"map_fn"``; off the batched path, models
  with random layers (per-task seeds), convolutions (per-task filters) or
  recurrent layers (loops) get ``"map_fn"``; a model that
  ``tf.vectorized_map`` cannot trace falls back to ``"map_fn"`` (recorded,
  with the reason, so later plans of the learner say so). Under "auto", a
  model that cannot run task-batched says why in a :class:`PlanWarning`
  when the learner is built, and its plans carry the reason.
* conv_impl (batched path with convolutions): the learner's ``conv_impl``;
  ``"auto"`` picks ``"grouped"`` with a GPU, else ``"map"`` (one
  convolution per task), except that small tasks on CPU (one task's
  support + query inputs under 2**15 values) get ``"patches"`` (im2col).
  support_conv_impl (the inner loops of ``split_gradients``): ``"patches"``
  on CPU where one task's support set holds under 2**13 values (Omniglot
  5-way 1-shot's 5 images, not 20-way 1-shot's 20), else ``conv_impl``.
* task_chunk: an explicit value is capped at the meta-batch and lowered to
  the largest divisor of it; ``"auto"`` picks 1 for convolutional models on
  the batched path without a GPU when a task is not small, else all tasks
  at once (``None``).
* split_gradients: with task chunks on the batched path, the inner loops of
  all tasks run at once and only the query passes run chunk by chunk;
  not with ``recompute`` (which chunks the whole meta-gradient, holding one
  chunk's inner loop), a multi-step loss or the closed form.
* chunks_in_flight: two chunks run at once when two or more CPUs are usable.
* query_chunk: with ``recompute`` on the batched path, tasks per
  checkpointed query chunk (:func:`query_chunk_size` of the tasks of one
  task chunk, or of the meta-batch).
* closed_form: the written-out meta-gradient of Dense/MSE chains when the
  learner found one and the batch has float labels and no accuracy to
  report.
* xla: ``train_step`` and ``train_steps`` compile with XLA when
  ``jit_compile`` is True, or is None and the closed form runs; never under
  ``tf.distribute``.
* fused_update: the fused Adam outer step where the meta-optimizer allows
  it (:mod:`maml_tf.core.fused_adam`), never under ``tf.distribute``.
"""

import dataclasses
import math
import os
from typing import Callable, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from maml_tf.core import fast_weights

EXECUTIONS = ("batched", "vectorized_map", "map_fn")


class PlanWarning(UserWarning):
  """A learner runs a slower path than it could, or a setting is risky."""
SMALL_TASK_VALUES = 2 ** 15
SMALL_SUPPORT_VALUES = 2 ** 13


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
  """How one meta-batch is run (see the module docstring for the rules).

  Attributes:
    execution: ``"batched"``, ``"vectorized_map"`` or ``"map_fn"``.
    conv_impl: the batched path's convolution kernel, ``None`` without
      convolutions or off the batched path.
    support_conv_impl: the kernel of the inner loops when they run apart
      from the query passes (``split_gradients``).
    task_chunk: tasks per chunk of the meta-gradient (``None``: all at once).
    split_gradients: chunks on the query side only.
    chunks_in_flight: task chunks computed at once.
    recompute: gradient checkpointing of the inner loop (second order).
    query_chunk: tasks per recomputed query chunk (``None``: all at once).
    closed_form: the closed-form meta-gradient (Dense/MSE chains).
    xla: ``train_step`` and ``train_steps`` compile with XLA.
    fused_update: the fused Adam outer step.
    first_order: this step's derivative order.
    accuracy: the step reports accuracy (integer labels of a model that
      scores classes, or forced).
    num_tasks: the meta-batch size the plan was made for.
    reasons: ``(field, why)`` pairs for the choices "auto" made.
  """
  execution: str
  conv_impl: Optional[str]
  support_conv_impl: Optional[str]
  task_chunk: Optional[int]
  split_gradients: bool
  chunks_in_flight: int
  recompute: bool
  query_chunk: Optional[int]
  closed_form: bool
  xla: bool
  fused_update: bool
  first_order: bool
  accuracy: bool
  num_tasks: Optional[int]
  reasons: Tuple[Tuple[str, str], ...] = ()

  def replace(self, **changes) -> "ExecutionPlan":
    """A copy with ``changes`` (e.g. ``plan.replace(task_chunk=None)``)."""
    return dataclasses.replace(self, **changes)

  def for_task_passes(self) -> "ExecutionPlan":
    """The fields a gradient-free task pass uses (evaluation, the meta-loss).

    No task chunks, closed form, XLA or outer-step fields, and no batch
    size, so that one compiled evaluation serves every meta-batch size.
    """
    return self.replace(task_chunk=None, split_gradients=False,
                        support_conv_impl=self.conv_impl,
                        chunks_in_flight=1, closed_form=False, xla=False,
                        fused_update=False, num_tasks=None, reasons=())

  def describe(self) -> str:
    """One line for logs: the fields that vary between plans."""
    parts = [self.execution]
    if self.conv_impl:
      parts.append(f"conv={self.conv_impl}")
    if self.task_chunk:
      parts.append(f"chunks of {self.task_chunk}"
                   + (" (query side)" if self.split_gradients else ""))
    for flag in ("recompute", "closed_form", "xla", "first_order"):
      if getattr(self, flag):
        parts.append(flag)
    return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Options:
  """What a learner asks for (its constructor arguments, "auto" allowed)."""
  conv_impl: str = "auto"
  task_chunk: Union[str, int, None] = "auto"
  jit_compile: Optional[bool] = None
  recompute: bool = False
  multi_step: bool = False
  accuracy: Optional[bool] = None


@dataclasses.dataclass(frozen=True)
class ModelFacts:
  """What the model allows, found once when the learner is built.

  Attributes:
    execution: the model-level execution (see :func:`resolve_execution`).
    has_conv: the model has convolution layers.
    closed_form: a closed-form meta-gradient exists for model and loss.
    fused_update: the meta-optimizer can take the fused Adam step.
    not_batched: why the model cannot run task-batched (``None``: it can,
      or was not asked to).
    not_vectorizable: why ``tf.vectorized_map`` cannot run the model
      (``None``: it can).
    scores_classes: integer labels can be scored by argmax (more than one
      output unit, a loss that is not one of Keras' regression or binary
      losses: :func:`maml_tf.core.losses.scores_classes`).
  """
  execution: str
  has_conv: bool = False
  closed_form: bool = False
  fused_update: bool = False
  not_batched: Optional[str] = None
  not_vectorizable: Optional[str] = None
  scores_classes: bool = True


@dataclasses.dataclass(frozen=True)
class Device:
  """Where the step runs."""
  gpu: bool = False
  cpus: int = 1
  distributed: bool = False

  @classmethod
  def local(cls, distributed: bool = False) -> "Device":
    """This process: a visible GPU, the CPUs it may use."""
    return cls(bool(tf.config.list_physical_devices("GPU")), usable_cpus(),
               distributed)


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """The shape facts of a meta-batch that decide a plan."""
  num_tasks: Optional[int]
  support: Optional[int]
  query: Optional[int]
  example_values: int
  integer_labels: bool
  index_shaped_labels: bool = True    # [T, N] or [T, N, 1]

  @classmethod
  def of(cls, batch) -> "BatchShape":
    """From a :class:`maml_tf.TaskBatch` of tensors or arrays."""
    inputs = tf.nest.flatten(batch.support_x)
    sx, qx = inputs[0], tf.nest.flatten(batch.query_x)[0]
    sy = batch.support_y
    dtype = getattr(sy, "dtype", None)
    if isinstance(dtype, tf.dtypes.DType):
      integer = dtype.is_integer
    else:
      integer = dtype is not None and bool(np.issubdtype(dtype, np.integer))
    values = sum(math.prod(d or 1 for d in x.shape[2:]) for x in inputs)
    label_shape = tuple(sy.shape)
    index_shaped = len(label_shape) == 2 or (len(label_shape) == 3
                                             and label_shape[2] == 1)
    return cls(sx.shape[0], sx.shape[1], qx.shape[1], values, integer,
               index_shaped)

  @property
  def small_support(self) -> bool:
    """One task's support inputs hold fewer than 2**13 values."""
    return (self.support or 0) * self.example_values < SMALL_SUPPORT_VALUES

  @property
  def small(self) -> bool:
    """One task's support + query inputs hold fewer than 2**15 values."""
    return ((self.support or 0) + (self.query or 0)) * self.example_values < (
        SMALL_TASK_VALUES)


def usable_cpus() -> int:
  """CPUs this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:      # not Linux
    return os.cpu_count() or 1


def check_task_chunk(task_chunk):
  """``task_chunk`` if it is None, ``"auto"`` or an integer >= 1."""
  if task_chunk is None or (isinstance(task_chunk, str)
                            and task_chunk == "auto"):
    return task_chunk
  if (isinstance(task_chunk, bool) or
      not isinstance(task_chunk, (int, np.integer)) or task_chunk < 1):
    raise ValueError("task_chunk must be None, 'auto' or an integer >= 1, "
                     f"got {task_chunk!r}")
  return int(task_chunk)


def resolve_execution(vectorize, batched_error: Optional[str],
                      not_vectorizable: Optional[str] = None) -> str:
  """The model-level execution from ``vectorize`` and what the model allows.

  ``"auto"``: ``"batched"`` where possible, else ``"map_fn"`` for a model
  that ``tf.vectorized_map`` cannot vectorise (random layers: per-task
  seeds; convolutions: per-task filters; recurrent layers: their loops),
  else ``"vectorized_map"``.

  Arguments:
    vectorize: ``"auto"``, ``True``, ``False`` or one of :data:`EXECUTIONS`.
    batched_error: why the model cannot run task-batched (``None``: it can).
    not_vectorizable: why ``tf.vectorized_map`` cannot run the model
      (``None``: it can).

  Raises:
    ValueError: a bad ``vectorize``, or ``"batched"`` for a model that
      cannot run so.
  """
  if vectorize not in ("auto", True, False) + EXECUTIONS:
    raise ValueError(f"vectorize must be 'auto', True, False or one of "
                     f"{EXECUTIONS}, got {vectorize!r}")
  mode = {True: "vectorized_map", False: "map_fn"}.get(vectorize, vectorize)
  if mode in ("auto", "batched"):
    if batched_error is None:
      return "batched"
    if mode == "batched":
      raise ValueError(f"vectorize='batched' is not possible: {batched_error}")
    return "map_fn" if not_vectorizable else "vectorized_map"
  return mode


def closed_form_blocker(learned_step_sizes: bool, all_adapted: bool,
                        multi_step: bool, recompute: bool) -> Optional[str]:
  """The learner option that rules out the closed form, or ``None``."""
  return next((why for why, applies in (
      ("learned inner step sizes", learned_step_sizes),
      ("only some weights adapted", not all_adapted),
      ("a multi-step loss", multi_step),
      ("recompute=True", recompute)) if applies), None)


def resolve_closed_form(closed_form, blocker: Optional[str],
                        analyse: Callable[[], Optional[object]]):
  """The model's closed-form chain, or ``None`` (autodiff).

  Arguments:
    closed_form: ``"auto"`` (whenever possible), ``True`` (required) or
      ``False`` (never).
    blocker: a learner option that rules it out (``None``: none does).
    analyse: ``() -> DenseChain or None`` for the model and loss.

  Raises:
    ValueError: a bad ``closed_form``, or ``True`` where it is impossible
      (the message says why).
  """
  if closed_form not in ("auto", True, False):
    raise ValueError(f"closed_form must be 'auto', True or False, got "
                     f"{closed_form!r}")
  if closed_form is False:
    return None
  chain = None if blocker else analyse()
  if chain is None and closed_form is True:
    raise ValueError(
        "closed_form=True is not possible: " + (blocker or (
            "it needs a keras.Sequential of Dense layers with ReLU or "
            "linear activations and Keras' mean squared error loss")))
  return chain


def query_chunk_size(num_tasks: int, support_per_task: int,
                     query_per_task: int) -> int:
  """Tasks per chunk of a checkpointed query pass (``recompute=True``).

  As many tasks as keep the chunk's query examples within the support
  examples of the whole meta-batch, so the recomputed query pass holds no
  more activations than one recomputed inner step. ``num_tasks`` (no
  chunking) when all query sets already fit.
  """
  budget = num_tasks * support_per_task
  return int(min(num_tasks, max(1, budget // max(1, query_per_task))))


def _divisor_at_most(chunk: int, num_tasks: int) -> int:
  chunk = min(chunk, num_tasks)
  while num_tasks % chunk:
    chunk -= 1
  return chunk


def resolve_plan(options: Options, facts: ModelFacts, shape: BatchShape,
                 device: Device, first_order: bool) -> ExecutionPlan:
  """The :class:`ExecutionPlan` for one batch (the module docstring's rules).

  Arguments:
    options: the learner's requests.
    facts: what its model allows.
    shape: the batch.
    device: where it runs.
    first_order: this step's derivative order.
  """
  reasons = []
  batched = facts.execution == "batched"
  if facts.not_batched:
    reasons.append(("execution", "not task-batched: " + facts.not_batched))
  if facts.not_batched and facts.not_vectorizable and (
      facts.execution == "map_fn"):
    reasons.append(("execution", facts.not_vectorizable))
  cpu_conv_auto = facts.has_conv and not device.gpu and batched
  conv_impl = support_conv_impl = None
  if batched and facts.has_conv:
    conv_impl = fast_weights.resolve_conv_impl(options.conv_impl, device.gpu)
    support_conv_impl = conv_impl
    im2col = options.conv_impl == "auto" and cpu_conv_auto
    if im2col and shape.small:
      conv_impl = "patches"
      reasons.append(("conv_impl", "im2col for small tasks on CPU"))
    if im2col and shape.small_support:
      support_conv_impl = "patches"
  num_tasks = shape.num_tasks
  chunk = options.task_chunk
  if chunk == "auto":
    chunk = 1 if cpu_conv_auto and not shape.small else None
    if chunk:
      reasons.append(("task_chunk", "large convolutional tasks on CPU run "
                      "one after another"))
  if chunk is not None and num_tasks is not None:
    asked = int(chunk)
    chunk = _divisor_at_most(asked, num_tasks)
    if chunk != asked:
      reasons.append(("task_chunk", f"{asked} lowered to {chunk}, the largest "
                      f"divisor of the {num_tasks} tasks not above it"))
    chunk = None if chunk == num_tasks else chunk
  else:
    chunk = None
  recompute = options.recompute and not first_order
  accuracy = (shape.integer_labels and shape.index_shaped_labels
              and facts.scores_classes
              if options.accuracy is None else bool(options.accuracy))
  closed_form = facts.closed_form and not accuracy and not shape.integer_labels
  if closed_form:
    reasons.append(("closed_form", "a chain of Dense layers under mean "
                    "squared error with every weight adapted"))
  split = bool(chunk and batched and not recompute and not options.multi_step
               and not closed_form)
  query_chunk = None
  if recompute and batched and num_tasks is not None:
    tasks = chunk or num_tasks          # the tasks of one query pass
    query_chunk = query_chunk_size(tasks, shape.support or 0,
                                   shape.query or 0)
    query_chunk = None if query_chunk >= tasks else query_chunk
  if options.jit_compile is None:
    xla = closed_form
    if xla:
      reasons.append(("xla", "the closed-form step compiles with XLA"))
  else:
    xla = bool(options.jit_compile)
  if device.distributed and xla:
    xla = False
    reasons.append(("xla", "not under tf.distribute"))
  return ExecutionPlan(
      execution=facts.execution, conv_impl=conv_impl,
      support_conv_impl=support_conv_impl, task_chunk=chunk,
      split_gradients=split,
      chunks_in_flight=2 if chunk and device.cpus >= 2 else 1,
      recompute=recompute, query_chunk=query_chunk, closed_form=closed_form,
      xla=xla, fused_update=facts.fused_update and not device.distributed,
      first_order=bool(first_order), accuracy=accuracy, num_tasks=num_tasks,
      reasons=tuple(reasons))
