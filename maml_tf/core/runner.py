"""Compiled steps: the ``tf.function`` cache, runtime fallbacks, step loops.

A :class:`Runner` belongs to one learner. It compiles a step function per
``(key, plan)``, checks the traced graph for missing second derivatives, and
records the two runtime fallbacks as facts that later plans apply
(:meth:`Runner.resolved`), never by changing the learner:

* ``execution``: a model that ``tf.vectorized_map`` cannot trace runs with
  ``tf.map_fn`` (same numbers, slower), with a warning naming the cause;
* ``xla``: when XLA cannot compile an automatically chosen XLA loop, the
  loop runs in the graph executor, with a warning.

:meth:`Runner.call_step` runs a compiled step (``train_step``'s and
``train_steps``' alike): after the first call, eager calls with arguments of
a known signature run the traced function directly
(:func:`maml_tf.core.keras_compat.direct_caller`), skipping
``tf.function``'s per-call Python; under a gradient tape or inside another
graph the ``tf.function`` itself runs. A caller that names a ``ready_key``
also gets the step as a ready callable for that signature
(:meth:`Runner.ready_step`): the next call with eager tensors of the same
shapes and dtypes runs it without preparing, planning or looking up
anything else.

:func:`steps_loop` builds the body of ``train_steps``: many meta-steps in one
``tf.while_loop`` whose metrics are averaged; under XLA it stops at the first
step whose loss or meta-gradient is not finite, before that step's update.
"""

import math
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

from maml_tf.core import keras_compat
from maml_tf.core import numerics
from maml_tf.core.plan import ExecutionPlan
from maml_tf.core.plan import PlanWarning

_TRACE_ERRORS = (ValueError, NotImplementedError, TypeError,
                 tf.errors.OpError)

# Gradient ops that TF registers as not differentiable although they are:
# second-order terms through them would silently vanish.
SECOND_ORDER_DROPPED = frozenset({
    "ResizeBilinearGrad", "SparseAddGrad", "FakeQuantWithMinMaxArgsGradient",
    "FakeQuantWithMinMaxVarsGradient",
    "FakeQuantWithMinMaxVarsPerChannelGradient"})


class StepOutput(NamedTuple):
  """What one compiled meta-step returns.

  Attributes:
    metrics: ``{name: scalar tensor}``.
    finite: under XLA, ``[1 + #meta-variables]`` bools (the loss, then each
      meta-gradient, finite); ``None`` in the graph executor, where
      ``check_numerics`` raises instead.
  """
  metrics: Dict[str, tf.Tensor]
  finite: Optional[tf.Tensor] = None


def root_cause(error: Exception) -> str:
  """The line of ``error``'s message that says what went wrong: the last,
  before the argument dump Keras appends to errors raised in a call."""
  lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
  for i, line in enumerate(lines):
    if line.startswith("Arguments received by"):
      lines = lines[:i]
      break
  return lines[-1][:300] if lines else type(error).__name__


class Runner:
  """The compiled functions of one learner (see the module docstring).

  Arguments:
    model_name: named in warnings and errors.
  """

  def __init__(self, model_name: str):
    self.model_name = model_name
    self.fallbacks: Dict[str, Tuple[object, str]] = {}
    self._cache: Dict[tuple, object] = {}
    self._direct: Dict[tuple, object] = {}
    self._ready: Dict[tuple, Callable[[list, bool], dict]] = {}
    self._ran = set()

  @property
  def compiled(self) -> Dict[tuple, object]:
    """The compiled functions so far, by ``key + (plan,)``."""
    return dict(self._cache)

  def resolved(self, plan: ExecutionPlan) -> ExecutionPlan:
    """``plan`` with the recorded fallbacks applied."""
    if "execution" in self.fallbacks and plan.execution == "vectorized_map":
      value, why = self.fallbacks["execution"]
      plan = plan.replace(execution=value,
                          reasons=plan.reasons + (("execution", why),))
    if "xla" in self.fallbacks and plan.xla:
      value, why = self.fallbacks["xla"]
      plan = plan.replace(xla=value, reasons=plan.reasons + (("xla", why),))
    return plan

  def function(self, key: tuple, make: Callable[[ExecutionPlan], Callable],
               plan: ExecutionPlan, example, second_order: bool,
               reduce_retracing: bool = False, jit_compile: bool = False):
    """The ``tf.function`` of ``make(plan)``, traced for ``example``.

    Falls back to ``map_fn`` (recorded) when ``vectorized_map`` cannot
    trace the model.
    """
    plan = self.resolved(plan)
    full = key + (plan,)
    fn = self._cache.get(full)
    if fn is not None:
      return fn
    fn = tf.function(make(plan), reduce_retracing=reduce_retracing,
                     jit_compile=jit_compile)
    try:
      with keras_compat.name_scopes_restored_on_error():
        self.trace(fn, example, second_order)
    except _TRACE_ERRORS as e:
      if plan.execution != "vectorized_map":
        raise
      why = f"{type(e).__name__}: {root_cause(e)}"
      self.fallbacks["execution"] = ("map_fn", why)
      try:
        mapped = self.function(key, make, plan, example, second_order,
                               reduce_retracing, jit_compile)
      except BaseException:
        # Task by task fails too: the batch's (or the model's) error, not
        # pfor's; nothing is recorded.
        del self.fallbacks["execution"]
        raise
      warnings.warn(
          f"maml_tf: could not vectorise model {self.model_name!r} over "
          f"tasks ({why}); using tf.map_fn, which gives the same numbers "
          "more slowly.", PlanWarning)
      return mapped
    self._cache[full] = fn
    return fn

  def trace(self, fn, example, second_order: bool = False):
    """Traces ``fn``; a missing second derivative becomes a clear error.

    Two cases: TF raises because a gradient op has no gradient registered
    (e.g. ``ResizeNearestNeighborGrad``), or, worse, TF declares a gradient
    op not differentiable and silently drops the second-order terms through
    it (``ResizeBilinearGrad``). The second is found by scanning the graph.
    """
    try:
      concrete = (fn.get_concrete_function() if example is None else
                  fn.get_concrete_function(example))
    except Exception as e:  # pylint: disable=broad-except
      text = str(e)
      if not (isinstance(e, LookupError) or "No gradient defined" in text
              or "gradient registry has no entry" in text):
        raise
      raise NotImplementedError(
          f"maml_tf: model {self.model_name!r} uses an operation that "
          f"TensorFlow cannot differentiate twice ({root_cause(e)}). "
          "Second-order MAML needs the gradient of every gradient op; use "
          "first_order=True, or replace the layer (e.g. UpSampling2D with "
          "interpolation='nearest' by Conv2DTranspose).") from e
    if second_order:
      graph_def = concrete.graph.as_graph_def()
      types = {n.op for n in graph_def.node}
      types.update(n.op for f in graph_def.library.function
                   for n in f.node_def)
      dropped = sorted(types & SECOND_ORDER_DROPPED)
      if dropped:
        raise NotImplementedError(
            f"maml_tf: model {self.model_name!r} uses {', '.join(dropped)}, "
            "which TensorFlow declares not differentiable, so the "
            "second-order terms through it would silently be zero. Use "
            "first_order=True, or replace the layer (e.g. "
            "UpSampling2D(interpolation='bilinear') by "
            "interpolation='nearest' or Conv2DTranspose).")

  def call_step(self, key: tuple, make: Callable[[ExecutionPlan], Callable],
                plan: ExecutionPlan, args: tuple, second_order: bool,
                xla_auto: bool, variables: Sequence,
                ready_key: Optional[tuple] = None, floats: bool = False):
    """Runs the compiled ``make(plan)(*args)``; returns its metrics
    (tensors, or Python floats where ``floats``).

    ``make(plan)`` returns a traceable function of ``args`` (tensors, or
    structures of them) returning ``(metrics, finite flags or None)`` (a
    :class:`StepOutput`). Compiled with XLA when ``plan.xla``; raises
    ``FloatingPointError`` naming the first non-finite value (the flags of
    an XLA step, the graph's own checks otherwise). An automatically chosen
    XLA step that XLA cannot compile is recorded as a fallback and run
    without XLA. ``variables`` (or a function returning them) name the
    meta-gradients in that error. Eager calls after the first with
    arguments of known shapes run the traced function directly
    (:func:`keras_compat.direct_caller`). With ``ready_key``, once the
    direct call serves these arguments, :meth:`ready_step` returns the step
    for ``ready_key`` and flat arguments of this signature.
    """
    fn = self.function(key, lambda p: _tensors_only(make(p)), plan,
                       args[0] if args else None, second_order,
                       jit_compile=self.resolved(plan).xla)
    plan = self.resolved(plan)        # after a map_fn fallback
    full = key + (plan,)
    try:
      with numerics.floating_point_errors():
        out = self._call(full, fn, args)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
            tf.errors.InternalError) as e:
      if not (xla_auto and plan.xla and full not in self._ran
              and "XLA" in str(e)):
        raise
      warnings.warn(f"maml_tf: XLA could not compile {key[0]} "
                    f"({root_cause(e)}); running it without XLA.")
      self.fallbacks["xla"] = (False, root_cause(e))
      self._cache.pop(full, None)
      return self.call_step(key, make, plan, args, second_order, xla_auto,
                            variables, ready_key, floats)
    self._ran.add(full)
    if ready_key is not None:
      self._make_ready(ready_key, full, args, variables)
    if len(out) == 2 and not tf.executing_eagerly():
      return out[0]     # inside a caller's graph: nothing can be read
    return _checked(out, variables, floats)

  def ready_step(self, ready_key: tuple, flat: list
                 ) -> Optional[Callable[[list, bool], dict]]:
    """The step registered by :meth:`call_step` for ``ready_key`` and the
    signature of ``flat`` (eager tensors), else ``None``.

    The returned ``step(flat, floats) -> metrics`` runs the traced function
    directly, returns what :meth:`call_step` returns, raises
    ``FloatingPointError`` as it does, and is valid only where
    :func:`keras_compat.can_call_directly`.
    """
    sig = keras_compat.eager_signature(flat)
    return None if sig is None else self._ready.get((ready_key, sig))

  def _make_ready(self, ready_key: tuple, full: tuple, args: tuple,
                  variables) -> None:
    sig = keras_compat.eager_signature(      # None unless eager tensors
        tf.nest.flatten(args, expand_composites=True))
    direct = sig is not None and self._direct.get((full,) + sig)
    if not direct:
      return

    def step(flat, floats):          # the hot path: no context manager
      try:
        out = direct(flat)
      except tf.errors.InvalidArgumentError as e:
        numerics.raise_floating_point_error(e)
        raise
      return _checked(out, variables, floats)
    self._ready[(ready_key, sig)] = step

  def call_steps(self, key: tuple, make_loop: Callable[[ExecutionPlan],
                                                       Callable],
                 plan: ExecutionPlan, second_order: bool, xla_auto: bool,
                 variables: Sequence):
    """:meth:`call_step` of a function of no arguments (a step loop)."""
    return self.call_step(key, make_loop, plan, (), second_order, xla_auto,
                          variables)

  def _call(self, full: tuple, fn, args: tuple):
    """``fn(*args)``; directly where :func:`keras_compat.direct_caller`
    serves (eager, no tape, a signature seen before)."""
    if not keras_compat.can_call_directly():
      return fn(*args)
    flat = tf.nest.flatten(args, expand_composites=True)
    sig = keras_compat.eager_signature(flat)   # None unless eager tensors
    if sig is None:
      return fn(*args)
    sig = (full,) + sig
    direct = self._direct.get(sig)
    if direct is None:
      out = fn(*args)                    # traces (once) and registers fn
      self._direct[sig] = (
          keras_compat.direct_caller(fn.get_concrete_function(*args))
          or False)
      return out
    if direct is False:
      return fn(*args)
    return direct(flat)


def _checked(out: tuple, variables, floats: bool = False) -> dict:
  """The metrics of a step's outputs (as Python floats where ``floats``);
  raises ``FloatingPointError`` where an XLA step's finite flags
  (``out[1]``) say it skipped its update.

  Read as floats, metrics that are all finite mean the flags are all true
  (:func:`_tensors_only` makes a skipped step's metrics NaN), so the flags
  are read only where a metric is not finite. Eager outputs only (inside
  a caller's graph :meth:`Runner.call_step` returns the metrics, NaN where
  the step was skipped).
  """
  if floats:
    metrics = {k: float(v) for k, v in out[0].items()}
    if len(out) == 1 or all(map(math.isfinite, metrics.values())):
      return metrics
  else:
    metrics = out[0]
  if len(out) == 2:
    flags = out[1].numpy()
    if not flags.all():
      numerics.raise_for_flags(
          flags, variables() if callable(variables) else variables)
  return metrics


def _tensors_only(step: Callable) -> Callable:
  """``step`` returning ``(metrics,)`` or ``(metrics, finite)``: no None
  among the outputs of a compiled function. With finite flags, the
  floating metrics are NaN where a flag is false
  (:func:`numerics.nan_where_skipped`), so that :func:`_checked` may read
  the floats alone."""
  def run(*args):
    metrics, finite = step(*args)
    if finite is None:
      return (metrics,)
    return numerics.nan_where_skipped(metrics, finite), finite
  return run


def check_num_steps(num_steps) -> int:
  """``num_steps`` as an int, if it is an integer >= 1."""
  if isinstance(num_steps, bool) or int(num_steps) < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
  return int(num_steps)


def steps_loop(step: Callable[[], StepOutput], num_steps: int,
               names: Sequence[str], dtype, num_flags: int, xla: bool):
  """``() -> (mean metrics, finite flags or None)`` of ``num_steps`` steps.

  Arguments:
    step: samples a batch and takes one meta-step (traceable).
    num_steps: steps per call.
    names: the metric names ``step`` returns.
    dtype: dtype of the metric sums.
    num_flags: length of a step's finite flags.
    xla: stop at the first non-finite step (XLA ignores check_numerics).
  """
  def loop():
    zeros = {k: tf.zeros([], dtype) for k in names}
    flags = tf.ones([num_flags], tf.bool)

    def body(i, sums, flags):
      out = step()
      if xla:
        flags = out.finite
      return i + 1, {k: sums[k] + tf.cast(out.metrics[k], dtype)
                     for k in sums}, flags
    if xla:      # stop at the first non-finite step
      cond = lambda i, _, flags: tf.logical_and(i < num_steps,
                                                tf.reduce_all(flags))
    else:        # check_numerics raises instead
      cond = lambda i, _, flags: i < num_steps
    _, sums, flags = tf.while_loop(
        cond, body, (tf.constant(0), zeros, flags), parallel_iterations=1)
    return ({k: v / num_steps for k, v in sums.items()},
            flags if xla else None)
  return loop
