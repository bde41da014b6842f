"""MAML: the pure adaptation function and the stateful meta-learner.

The pure pieces (:func:`inner_update`, :func:`adapt_params`) take weights as
lists of tensors and return new ones; :class:`MAML` wraps them around a Keras
model, an outer optimizer and compiled ``tf.function`` steps.

Algorithm (Finn, Abbeel & Levine 2017, Algorithm 1), for each task ``i``::

    theta_i' = theta - alpha * grad_theta L_support_i(theta)     (inner_steps times)
    theta   <- theta - beta * grad_theta mean_i L_query_i(theta_i')

The outer gradient differentiates *through* the inner gradient (second order)
unless ``first_order=True``, which treats the inner gradients as constants.

BatchNorm and other non-trainable state: the inner and outer loops call the
model with ``training=True`` as in the paper's code, so normalisation uses the
statistics of the batch at hand (support batch while adapting, query batch
when scoring: transductive, as the paper). The non-trainable variables are
passed through the inner loop explicitly; ``train_step`` writes the tasks'
mean BatchNorm moving statistics back after each meta-step, and nothing else.
``MAML.adapt`` returns a model whose moving statistics are those of the
support set under the adapted weights, so the adapted model also predicts in
inference mode (``training=False``), e.g. once exported.
"""

import dataclasses
import math
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from maml_tf.core import fast_weights
from maml_tf.core import functional
from maml_tf.core.task_batch import TaskBatch, validate_task_batch

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
EXECUTIONS = ("batched", "vectorized_map", "map_fn")


def inner_update(params: Sequence[tf.Tensor], grads: Sequence[tf.Tensor],
                 inner_lr) -> list:
  """One plain gradient step ``theta - alpha * g`` (pure).

  Arguments:
    params: current fast weights.
    grads: their gradients, same structure.
    inner_lr: a scalar step size, or one per parameter (Meta-SGD style).
  """
  if isinstance(inner_lr, (list, tuple)):
    return [p - lr * g for p, g, lr in zip(params, grads, inner_lr)]
  return [p - inner_lr * g for p, g in zip(params, grads)]


def adapt_params(model: keras.Model, loss_fn: LossFn, params, state, x, y,
                 inner_lr, steps: int, first_order: bool = False,
                 on_step: Optional[Callable[[int, list, list], None]] = None):
  """Runs ``steps`` inner gradient steps from ``params`` on ``(x, y)`` (pure).

  Arguments:
    model: the Keras model, used only as a function (never written).
    loss_fn: ``(y_true, y_pred) -> scalar``.
    params: starting weights, ordered as ``model.trainable_variables``.
    state: non-trainable state, ordered as ``model.non_trainable_variables``.
    x, y: the support set of one task.
    inner_lr: step size (scalar or one per parameter).
    steps: number of gradient steps, >= 0.
    first_order: drop the second-order terms (``stop_gradient`` on the
      inner gradients).
    on_step: optional ``f(step, fast_params, state)`` called after each step
      (used by evaluation to score the query set along the way).

  Returns:
    ``(fast_params, state)``.

  Example:
    >>> params, state = functional.read_weights(model)
    >>> fast, state = adapt_params(model, mse, params, state, x, y, 0.01, 1)
  """
  fast = list(params)
  for step in range(steps):
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(fast)
      pred, state = functional.functional_call(model, fast, state, x, True)
      loss = loss_fn(y, pred)
    grads = tape.gradient(loss, fast,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if first_order:
      grads = [tf.stop_gradient(g) for g in grads]
    fast = inner_update(fast, grads, inner_lr)
    if on_step is not None:
      on_step(step + 1, fast, state)
  return fast, state


def sparse_accuracy(y_true, y_pred):
  """Fraction of argmax predictions equal to integer labels."""
  pred = tf.argmax(y_pred, axis=-1, output_type=tf.int64)
  return tf.reduce_mean(tf.cast(tf.equal(pred, tf.cast(y_true, tf.int64)),
                                tf.float32))


def _as_loss_fn(loss) -> LossFn:
  if isinstance(loss, str):
    loss = keras.losses.get(loss)
  if not callable(loss):
    raise TypeError(f"loss must be a Keras loss or a callable "
                    f"(y_true, y_pred) -> scalar; got {loss!r}")

  def loss_fn(y_true, y_pred):
    value = loss(y_true, y_pred)
    if value.shape.rank:
      value = tf.reduce_mean(value)
    return value
  return loss_fn


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What one compiled task pass computes."""
  record_steps: Tuple[int, ...]   # query metrics after these step counts
  inner_lr: float
  first_order: bool


class MAML:
  """Model-Agnostic Meta-Learning for any built Keras 3 model.

  Arguments:
    model: a built Keras 3 model (Sequential, functional or subclassed). Its
      trainable variables are the meta-parameters theta.
    loss: a Keras loss (object or name) or a callable
      ``(y_true, y_pred) -> scalar``.
    inner_lr: the inner step size alpha.
    inner_steps: inner gradient steps during meta-training (>= 1).
    first_order: drop the second-order terms of the meta-gradient (FOMAML).
    meta_optimizer: a Keras optimizer for the outer step; default Adam(1e-3).
    accuracy: report accuracy; ``None`` (auto) does so when labels are
      integers (classification with logits).
    vectorize: how the tasks of a meta-batch are run. ``"auto"`` (default)
      picks the fastest that the model allows: ``"batched"`` (task-batched
      fast-weights kernels, :mod:`maml_tf.core.fast_weights`: every layer is
      one op over all tasks; models of supported Keras layers), else
      ``"vectorized_map"`` (``tf.vectorized_map`` of the per-task function),
      else ``"map_fn"`` (one task after another). All give the same numbers.
      ``True``/``False`` mean ``"vectorized_map"``/``"map_fn"``.
    conv_impl: convolution kernel of the batched path: ``"auto"`` (grouped
      convolution on GPU, patches + batched matmul on CPU), ``"patches"``,
      ``"grouped"`` or ``"map"``.

  Example:
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(40,
    ...     activation="relu"), keras.layers.Dense(1)])
    >>> maml = MAML(model, keras.losses.MeanSquaredError(), inner_lr=0.01)
    >>> metrics = maml.train_step(batch)           # one meta-update
    >>> adapted = maml.adapt(support_x, support_y)  # a new keras.Model
    >>> maml.evaluate(batch, steps=(0, 1, 10))["loss"]
  """

  def __init__(self, model: keras.Model, loss, inner_lr: float = 0.01,
               inner_steps: int = 1, first_order: bool = False,
               meta_optimizer: Optional[keras.optimizers.Optimizer] = None,
               accuracy: Optional[bool] = None,
               vectorize: Union[str, bool] = "auto",
               conv_impl: str = "auto"):
    self.model = functional.ensure_built(model)
    self.loss_fn = _as_loss_fn(loss)
    if not isinstance(inner_steps, (int, np.integer)) or inner_steps < 1:
      raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
    inner_lr = float(inner_lr)
    if not math.isfinite(inner_lr) or inner_lr < 0:
      raise ValueError(f"inner_lr must be a finite number >= 0, got {inner_lr}")
    if vectorize not in ("auto", True, False) + EXECUTIONS:
      raise ValueError(f"vectorize must be 'auto', True, False or one of "
                       f"{EXECUTIONS}, got {vectorize!r}")
    self.inner_lr = inner_lr
    self.inner_steps = int(inner_steps)
    self.first_order = bool(first_order)
    self.accuracy = accuracy
    self.meta_optimizer = meta_optimizer or keras.optimizers.Adam(1e-3)
    self.meta_optimizer.build(self.model.trainable_variables)
    self._vectorize_mode = {True: "vectorized_map", False: "map_fn"}.get(
        vectorize, vectorize)
    self._batched = None
    self.execution = self._resolve_execution(conv_impl)
    self._compiled = {}
    # Moving statistics of BatchNorm layers: the only state train_step writes.
    bn_ids = set()
    for layer in self.model._flatten_layers(include_self=False):  # pylint: disable=protected-access
      if isinstance(layer, keras.layers.BatchNormalization):
        bn_ids.update(id(v) for v in (layer.moving_mean, layer.moving_variance))
    self._state_kinds = []
    for v in self.model.non_trainable_variables:
      if id(v) in bn_ids:
        self._state_kinds.append("mean")
      elif not v.dtype.startswith("float"):
        self._state_kinds.append("first")   # RNG seeds: advance them
      else:
        self._state_kinds.append("keep")    # frozen weights: never written

  @property
  def vectorize(self) -> bool:
    """True unless the tasks run one after another (``tf.map_fn``)."""
    return self.execution != "map_fn"

  def _resolve_execution(self, conv_impl: str) -> str:
    mode = self._vectorize_mode
    if mode in ("auto", "batched"):
      try:
        self._batched = fast_weights.compile_batched(self.model, conv_impl)
        return "batched"
      except fast_weights.Unsupported as e:
        if mode == "batched":
          raise ValueError(f"vectorize='batched' is not possible: {e}") from e
        return "vectorized_map"
    return mode

  # ------------------------------------------------------------------ inputs
  def _prepare(self, batch) -> TaskBatch:
    batch = validate_task_batch(batch)
    dtype = self.model.trainable_variables[0].dtype
    sx, qx = (tf.convert_to_tensor(t) for t in (batch.support_x, batch.query_x))
    if sx.dtype.is_floating and sx.dtype != dtype:
      sx, qx = tf.cast(sx, dtype), tf.cast(qx, dtype)
    sy, qy = (tf.convert_to_tensor(t) for t in (batch.support_y, batch.query_y))
    if sy.dtype.is_floating and sy.dtype != dtype:
      sy, qy = tf.cast(sy, dtype), tf.cast(qy, dtype)
    return TaskBatch(sx, sy, qx, qy)

  def _wants_accuracy(self, batch: TaskBatch) -> bool:
    if self.accuracy is not None:
      return bool(self.accuracy)
    return batch.support_y.dtype.is_integer

  # --------------------------------------------------------------- the core
  def _task_metrics(self, plan: _Plan, params, state, with_acc: bool):
    """Per-task function: query loss (and accuracy) after each recorded step."""
    record = set(plan.record_steps)
    last = max(plan.record_steps)

    def run(task):
      sx, sy, qx, qy = task
      losses, accs = {}, {}

      def score(step, fast, st):
        if step in record:
          pred, _ = functional.functional_call(self.model, fast, st, qx, True)
          losses[step] = self.loss_fn(qy, pred)
          if with_acc:
            accs[step] = sparse_accuracy(qy, pred)

      score(0, params, state)
      _, final_state = adapt_params(self.model, self.loss_fn, params, state,
                                    sx, sy, plan.inner_lr, last,
                                    plan.first_order, on_step=score)
      out = {"loss": tf.stack([losses[s] for s in plan.record_steps])}
      if with_acc:
        out["accuracy"] = tf.stack([accs[s] for s in plan.record_steps])
      out["state"] = final_state
      return out
    return run

  def _map_tasks(self, fn, batch: TaskBatch):
    elems = tuple(batch)
    if self.execution == "vectorized_map":
      return tf.vectorized_map(fn, elems, fallback_to_while_loop=False)
    spec = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype),
        fn(tuple(t[0] for t in elems)))  # traced once to learn the output spec
    return tf.map_fn(fn, elems, fn_output_signature=spec)

  def _run_tasks(self, plan: _Plan, params, state, batch, with_acc):
    if self.execution == "batched":
      return self._run_tasks_batched(plan, params, state, batch, with_acc)
    return self._map_tasks(self._task_metrics(plan, params, state, with_acc),
                           batch)

  def _per_task(self, fn, y, pred):
    """``[T]`` values of a per-task reduction such as the loss."""
    return tf.vectorized_map(lambda a: fn(a[0], a[1]), (y, pred))

  def _run_tasks_batched(self, plan: _Plan, params, state, batch, with_acc):
    """All tasks at once through the task-batched fast-weights model."""
    sx, sy, qx, qy = batch
    num_tasks = sx.shape[0] if sx.shape[0] is not None else tf.shape(sx)[0]
    tile = lambda v: tf.tile(v[None], [num_tasks] + [1] * v.shape.rank)
    state = [tile(v) for v in state]
    losses, accs = {}, {}

    def score(step, fast):
      if step in plan.record_steps:
        pred, _ = self._batched(fast, state, qx, training=True)
        losses[step] = self._per_task(self.loss_fn, qy, pred)
        if with_acc:
          accs[step] = self._per_task(sparse_accuracy, qy, pred)

    score(0, params)                    # shared weights: plain kernels
    fast = [tile(p) for p in params]
    for step in range(max(plan.record_steps)):
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(fast)
        pred, state = self._batched(fast, state, sx, training=True)
        loss = tf.reduce_sum(self._per_task(self.loss_fn, sy, pred))
      grads = tape.gradient(loss, fast,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
      if plan.first_order:
        grads = [tf.stop_gradient(g) for g in grads]
      fast = inner_update(fast, grads, plan.inner_lr)
      score(step + 1, fast)
    out = {"loss": tf.stack([losses[s] for s in plan.record_steps], axis=1),
           "state": state}
    if with_acc:
      out["accuracy"] = tf.stack([accs[s] for s in plan.record_steps], axis=1)
    return out

  def _new_state(self, state, task_states):
    new = []
    for kind, old, per_task in zip(self._state_kinds, state, task_states):
      if kind == "mean":
        new.append(tf.reduce_mean(per_task, axis=0))
      elif kind == "first":
        new.append(per_task[0])
      else:
        new.append(old)
    return new

  # --------------------------------------------------------- compiled steps
  def _compile(self, key, make, batch, reduce_retracing=False):
    """A tf.function per key; resolves vectorize='auto' on the first trace."""
    if key in self._compiled:
      return self._compiled[key]
    fn = tf.function(make(), reduce_retracing=reduce_retracing)
    if self.execution == "vectorized_map":     # fall back if pfor cannot
      try:
        fn.get_concrete_function(batch)
      except (ValueError, NotImplementedError, TypeError,
              tf.errors.OpError) as e:
        warnings.warn(
            f"maml_tf: could not vectorise model {self.model.name!r} over "
            f"tasks ({type(e).__name__}: {_root_cause(e)}); using tf.map_fn, "
            "which gives the same numbers more slowly.")
        self.execution = "map_fn"
        self._compiled.clear()
        fn = tf.function(make(), reduce_retracing=reduce_retracing)
    self._compiled[key] = fn
    return fn

  def _train_plan(self):
    return _Plan((0, self.inner_steps), self.inner_lr, self.first_order)

  def _make_meta_loss(self):
    plan = self._train_plan()

    def meta_loss(batch):
      params, state = functional.read_weights(self.model)
      out = self._run_tasks(plan, params, state, batch, False)
      return tf.reduce_mean(out["loss"][:, -1])
    return meta_loss

  def _make_train_step(self, with_acc: bool):
    plan = self._train_plan()
    variables = self.model.trainable_variables
    state_vars = self.model.non_trainable_variables

    def train_step(batch):
      params, state = functional.read_weights(self.model)
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(params)
        out = self._run_tasks(plan, params, state, batch, with_acc)
        loss = tf.reduce_mean(out["loss"][:, -1])
        # Inside the tape: a check outside it would cut the gradient path.
        loss = tf.debugging.check_numerics(
            loss, "maml_tf: the meta-loss (query loss after adaptation) is "
            "NaN or Inf")
      grads = tape.gradient(loss, params,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
      grads = [tf.debugging.check_numerics(
          g, f"maml_tf: the meta-gradient of {v.path} is NaN or Inf")
               for g, v in zip(grads, variables)]
      self.meta_optimizer.apply_gradients(zip(grads, variables))
      for var, kind, value in zip(state_vars, self._state_kinds,
                                  self._new_state(state, out["state"])):
        if kind != "keep":
          var.assign(value)
      metrics = {"loss_before": tf.reduce_mean(out["loss"][:, 0]),
                 "loss_after": loss}
      if with_acc:
        metrics["accuracy_before"] = tf.reduce_mean(out["accuracy"][:, 0])
        metrics["accuracy_after"] = tf.reduce_mean(out["accuracy"][:, -1])
      return metrics
    return train_step

  def _make_evaluate(self, steps, inner_lr, with_acc):
    plan = _Plan(tuple(steps), inner_lr, True)

    def evaluate(batch):
      params, state = functional.read_weights(self.model)
      out = self._run_tasks(plan, params, state, batch, with_acc)
      out.pop("state")
      return out
    return evaluate

  # ------------------------------------------------------------- public API
  def meta_loss(self, batch: TaskBatch) -> tf.Tensor:
    """Mean query loss after ``inner_steps`` adaptation steps (a scalar).

    Differentiable with respect to ``model.trainable_variables``, including
    the second-order terms unless ``first_order=True``. Writes nothing.

    Example:
      >>> with tf.GradientTape() as tape:
      ...   loss = maml.meta_loss(batch)
      >>> grads = tape.gradient(loss, model.trainable_variables)
    """
    batch = self._prepare(batch)
    return self._compile("meta_loss", self._make_meta_loss, batch)(batch)

  def train_step_tensors(self, batch: TaskBatch) -> Dict[str, tf.Tensor]:
    """As :meth:`train_step` but returns tensors (no host synchronisation)."""
    batch = self._prepare(batch)
    with_acc = self._wants_accuracy(batch)
    fn = self._compile(("train", with_acc),
                       lambda: self._make_train_step(with_acc), batch)
    try:
      return fn(batch)
    except tf.errors.InvalidArgumentError as e:
      if "maml_tf:" in str(e):
        msg = str(e).split("maml_tf:")[1].split("\n")[0].split(" : ")[0]
        raise FloatingPointError(
            f"maml_tf:{msg}. The meta-parameters were not updated by this "
            "step. Lower inner_lr or the meta learning rate, or check the "
            "data for NaN/Inf.") from None
      raise

  def train_step(self, batch: TaskBatch) -> Dict[str, float]:
    """One meta-update on ``batch``; returns the metrics as Python floats.

    Keys: ``loss_before`` and ``loss_after`` (mean query loss before and after
    adaptation) and, for classification, ``accuracy_before/after``. Compiled
    once per batch shape. Raises ``FloatingPointError`` (and leaves the
    weights unchanged) if the loss or the meta-gradient is not finite.
    """
    return {k: float(v) for k, v in self.train_step_tensors(batch).items()}

  def evaluate(self, batch: TaskBatch, steps: Sequence[int] = (0, 1, 5, 10),
               inner_lr: Optional[float] = None,
               per_task: bool = False) -> Dict[str, np.ndarray]:
    """Query loss (and accuracy) after each number of inner steps in ``steps``.

    Arguments:
      batch: tasks to adapt to (support) and score on (query).
      steps: step counts to report, e.g. ``(0, 1, 5, 10)``.
      inner_lr: step size for this evaluation; default ``self.inner_lr``.
      per_task: return ``[len(steps), T]`` arrays instead of task means.

    Returns:
      ``{"steps": array, "loss": array, "accuracy": array (classification)}``.
    """
    steps = tuple(int(s) for s in steps)
    if not steps or min(steps) < 0:
      raise ValueError(f"steps must be non-negative integers, got {steps}")
    inner_lr = self.inner_lr if inner_lr is None else float(inner_lr)
    batch = self._prepare(batch)
    with_acc = self._wants_accuracy(batch)
    ordered = tuple(sorted(set(steps)))
    fn = self._compile(("eval", ordered, inner_lr, with_acc),
                       lambda: self._make_evaluate(ordered, inner_lr, with_acc),
                       batch, reduce_retracing=True)
    out = fn(batch)
    result = {"steps": np.asarray(steps)}
    for key, value in out.items():
      value = value.numpy().T                      # [len(ordered), T]
      value = value[[ordered.index(s) for s in steps]]
      result[key] = value if per_task else value.mean(axis=1)
    return result

  def adapt(self, support_x, support_y, steps: Optional[int] = None,
            inner_lr: Optional[float] = None,
            batchnorm_statistics: str = "support") -> keras.Model:
    """Adapts to one task and returns a new ``keras.Model`` with its weights.

    The meta-model's variables are never changed.

    Arguments:
      support_x, support_y: the task's support set ``[K, ...]`` (no task axis).
      steps: inner steps; default ``inner_steps``.
      inner_lr: step size; default ``self.inner_lr``.
      batchnorm_statistics: ``"support"`` sets the adapted model's BatchNorm
        moving statistics to the support set's batch statistics under the
        adapted weights, so it predicts per example in inference mode;
        ``"keep"`` leaves the meta-model's moving statistics.

    Example:
      >>> adapted = maml.adapt(x_support, y_support, steps=10)
      >>> y = adapted(x_new, training=False)
    """
    if batchnorm_statistics not in ("support", "keep"):
      raise ValueError("batchnorm_statistics must be 'support' or 'keep', "
                       f"got {batchnorm_statistics!r}")
    steps = self.inner_steps if steps is None else int(steps)
    if steps < 0:
      raise ValueError(f"steps must be >= 0, got {steps}")
    inner_lr = self.inner_lr if inner_lr is None else float(inner_lr)
    x = tf.convert_to_tensor(support_x)
    y = tf.convert_to_tensor(support_y)
    if x.shape[0] != y.shape[0]:
      raise ValueError(f"support_x has {x.shape[0]} examples but support_y has "
                       f"{y.shape[0]} (shapes {x.shape} vs {y.shape})")
    dtype = self.model.trainable_variables[0].dtype
    if x.dtype.is_floating:
      x = tf.cast(x, dtype)
    if y.dtype.is_floating:
      y = tf.cast(y, dtype)
    params, state = functional.read_weights(self.model)
    fast, _ = adapt_params(self.model, self.loss_fn, params, state, x, y,
                           inner_lr, steps)
    adapted = clone_with_weights(self.model, fast, state)
    if batchnorm_statistics == "support":
      refresh_batchnorm_statistics(adapted, x)
    return adapted


def _root_cause(error: Exception) -> str:
  lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
  return lines[-1][:300] if lines else type(error).__name__


def clone_with_weights(model: keras.Model, params, state) -> keras.Model:
  """A new model of ``model``'s architecture holding ``params`` and ``state``."""
  try:
    clone = keras.models.clone_model(model)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(
        f"maml_tf could not clone model {model.name!r} ({type(e).__name__}: "
        f"{e}). Subclassed models need get_config()/from_config() so that an "
        "adapted copy can be made.") from e
  if not clone.built:
    clone.build(model.inputs[0].shape if getattr(model, "inputs", None)
                else None)
  if (len(clone.trainable_variables) != len(params)
      or len(clone.non_trainable_variables) != len(state)):
    raise TypeError(f"the clone of {model.name!r} has different variables "
                    "than the model; cannot copy adapted weights")
  for var, value in zip(clone.trainable_variables, params):
    var.assign(value)
  for var, value in zip(clone.non_trainable_variables, state):
    var.assign(value)
  return clone


def refresh_batchnorm_statistics(model: keras.Model, x) -> keras.Model:
  """Sets every BatchNorm layer's moving statistics to those of batch ``x``."""
  layers = [l for l in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
            if isinstance(l, keras.layers.BatchNormalization)]
  if not layers:
    return model
  saved = [l.momentum for l in layers]
  try:
    for l in layers:
      l.momentum = 0.0
    with functional.exact_moments():
      model(x, training=True)
  finally:
    for l, m in zip(layers, saved):
      l.momentum = m
  return model
