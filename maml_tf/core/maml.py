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

import contextlib
import dataclasses
import math
import os
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from maml_tf.core import dense_chain
from maml_tf.core import fast_weights
from maml_tf.core import functional
from maml_tf.core import fused_adam
from maml_tf.core.task_batch import TaskBatch, validate_task_batch

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
EXECUTIONS = ("batched", "vectorized_map", "map_fn")
_CONV_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
                keras.layers.Conv2DTranspose)


def inner_update(params: Sequence[tf.Tensor], grads: Sequence[tf.Tensor],
                 inner_lr) -> list:
  """One plain gradient step ``theta - alpha * g`` (pure).

  Arguments:
    params: current fast weights.
    grads: their gradients, same structure (``None`` leaves a weight as is).
    inner_lr: a scalar step size, or one per parameter (Meta-SGD style:
      scalars or tensors shaped like the parameter).
  """
  lrs = (list(inner_lr) if isinstance(inner_lr, (list, tuple))
         else [inner_lr] * len(params))
  return [p if g is None else p - lr * g
          for p, g, lr in zip(params, grads, lrs)]


def adapt_params(model: keras.Model, loss_fn: LossFn, params, state, x, y,
                 inner_lr, steps: int, first_order: bool = False,
                 on_step: Optional[Callable[[int, list, list], None]] = None,
                 adapt_mask: Optional[Sequence[bool]] = None,
                 forward: Optional[Callable] = None,
                 recompute: bool = False):
  """Runs ``steps`` inner gradient steps from ``params`` on ``(x, y)`` (pure).

  Arguments:
    model: the Keras model, used only as a function (never written).
    loss_fn: ``(y_true, y_pred) -> scalar``.
    params: starting weights, ordered as ``model.trainable_variables``.
    state: non-trainable state, ordered as ``model.non_trainable_variables``.
    x, y: the support set of one task.
    inner_lr: step size: a scalar, one per parameter, or a function
      ``step -> either`` (per-step step sizes, MAML++).
    steps: number of gradient steps, >= 0.
    first_order: drop the second-order terms (``stop_gradient`` on the
      inner gradients).
    on_step: optional ``f(step, fast_params, state)`` called after each step
      (used by evaluation to score the query set along the way).
    adapt_mask: one bool per parameter; ``False`` keeps that parameter fixed
      in the inner loop (ANIL adapts only the head).
    forward: ``f(params, state, x) -> (y_pred, state)``; default
      ``functional_call(model, ..., training=True)``. The task-batched path
      passes its batched model here.
    recompute: gradient checkpointing through the inner loop: each step keeps
      only its inputs and is recomputed during the outer backward pass, so
      peak memory no longer grows with the activations of every step (about
      one extra forward and inner backward per step in time).

  Returns:
    ``(fast_params, state)``.

  Example:
    >>> params, state = functional.read_weights(model)
    >>> fast, state = adapt_params(model, mse, params, state, x, y, 0.01, 1)
  """
  if forward is None:
    forward = lambda p, s, x: functional.functional_call(model, p, s, x, True)
  mask = list(adapt_mask) if adapt_mask is not None else [True] * len(params)
  fast = list(params)

  def step_fn(fast, state, lr):
    watched = [f for f, m in zip(fast, mask) if m]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(watched)
      pred, state = forward(fast, state, x)
      loss = loss_fn(y, pred)
    grads = iter(tape.gradient(
        loss, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO))
    grads = [next(grads) if m else None for m in mask]
    if first_order:
      grads = [None if g is None else tf.stop_gradient(g) for g in grads]
    return inner_update(fast, grads, lr), state

  for step in range(steps):
    lr = inner_lr(step) if callable(inner_lr) else inner_lr
    if recompute:
      fast, state = _recomputed_step(step_fn, fast, state, lr)
    else:
      fast, state = step_fn(fast, state, lr)
    if on_step is not None:
      on_step(step + 1, fast, state)
  return fast, state


def _recomputed_step(step_fn, fast, state, lr):
  """``step_fn`` with gradient checkpointing: keeps only its inputs alive.

  The backward pass recomputes the step (forward, inner gradient) under a
  tape and differentiates it there, so the second-order terms are exact
  while the step's activations are freed after the forward pass. Step sizes
  are passed as arguments so that learned ones still get gradients.
  Non-float state (RNG seeds) stays outside and is not advanced by the step.
  """
  per_param_lr = isinstance(lr, (list, tuple))
  lrs = [tf.convert_to_tensor(v, fast[0].dtype)
         for v in (lr if per_param_lr else [lr])]
  floats = [i for i, s in enumerate(state) if s.dtype.is_floating]
  n, m = len(fast), len(floats)

  def flat_step(*args):
    st = list(state)
    for i, value in zip(floats, args[n:n + m]):
      st[i] = value
    l = list(args[n + m:])
    new_fast, new_state = step_fn(list(args[:n]), st,
                                  l if per_param_lr else l[0])
    return tuple(new_fast) + tuple(new_state[i] for i in floats)

  @tf.custom_gradient
  def checkpointed(*args):
    result = flat_step(*args)

    def grad(*dresult, variables=None):
      # Recompute the step under a fresh tape: the inner tape nests inside
      # it, so the vector-Jacobian product includes the second-order terms.
      # (tf.recompute_grad cannot be used: it runs the forward pass with all
      # tapes stopped, which silently zeroes the inner gradient.)
      # The control dependency keeps the graph executor from recomputing
      # every step early (their inputs are ready long before): step k is
      # recomputed only once the gradient reaching it exists.
      with tf.control_dependencies([d for d in dresult if d is not None]):
        ids = [tf.identity(a) for a in args]
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(ids)
        again = flat_step(*ids)
      dresult = [tf.zeros_like(r) if d is None else d
                 for r, d in zip(again, dresult)]
      grads = tape.gradient(list(again), ids, output_gradients=dresult,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
      if variables is None:
        return grads
      return grads, [tf.zeros_like(v) for v in variables]
    return result, grad

  if tf.executing_eagerly():
    raise RuntimeError("recompute=True needs graph mode (inside tf.function); "
                       "MAML's compiled steps provide it")
  out = checkpointed(*fast, *[state[i] for i in floats], *lrs)
  new_state = list(state)
  for i, value in zip(floats, out[n:]):
    new_state[i] = value
  return list(out[:n]), new_state


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


def _recomputed_query(batched, task_loss, fast, state, qx, qy, chunk: int,
                      with_acc: bool):
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
  num_tasks = int(qx.shape[0])
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
    st = list(state)
    for i, value in zip(floats, part[n:]):
      st[i] = value
    pred, _ = batched(part[:n], st, qx[a:b], training=True)
    return task_loss(qy[a:b], pred), pred

  @tf.custom_gradient
  def checkpointed(*args):
    losses, accs, prev = [], [], []
    for a, b in bounds:
      with tf.control_dependencies(prev):
        part = chunk_of([tf.identity(v) for v in args], a, b)
      loss, pred = run(part, a, b)
      losses.append(loss)
      if with_acc:
        accs.append(sparse_accuracy_per_task(qy[a:b], pred))
      prev = [loss]
    loss = tf.concat(losses, 0)
    acc = tf.concat(accs, 0) if with_acc else tf.zeros_like(loss)

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
  return loss, (acc if with_acc else None)


def _unless_differentiated(step, fast, state):
  """Step 0's query score is a metric, never part of the meta-objective.

  Scoring it through ``stop_gradient`` keeps it off the outer tape:
  otherwise the outer backward pass would run through the whole pre-update
  query forward pass with zero gradients (about 40% of an Omniglot step).
  """
  if step != 0:
    return fast, state
  return ([tf.stop_gradient(f) for f in fast],
          [tf.stop_gradient(s) for s in state])


def _correct(y_true, y_pred):
  """1.0 where the argmax prediction equals the integer label, else 0.0."""
  pred = tf.argmax(y_pred, axis=-1, output_type=tf.int64)
  return tf.cast(tf.equal(pred, tf.cast(y_true, tf.int64)), tf.float32)


def sparse_accuracy(y_true, y_pred):
  """Fraction of argmax predictions equal to integer labels."""
  return tf.reduce_mean(_correct(y_true, y_pred))


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


def _task_axis_mean(values):
  """``[T, ...] -> [T]``: the mean over every axis but the first."""
  return tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))


def sparse_accuracy_per_task(y_true, y_pred):
  """:func:`sparse_accuracy` of each task: ``[T, N]`` labels -> ``[T]``."""
  return _task_axis_mean(_correct(y_true, y_pred))


# Keras loss functions whose value is the mean of per-example terms.
_PER_EXAMPLE_LOSSES = frozenset(
    getattr(keras.losses, name) for name in (
        "mean_squared_error", "mean_absolute_error",
        "mean_absolute_percentage_error", "mean_squared_logarithmic_error",
        "sparse_categorical_crossentropy", "categorical_crossentropy",
        "binary_crossentropy", "huber", "log_cosh", "hinge",
        "squared_hinge", "kl_divergence", "poisson")
    if hasattr(keras.losses, name))


def _per_task_loss_fn(loss) -> Optional[Callable]:
  """``(y [T, N, ...], pred [T, N, ...]) -> [T]`` without a loop over tasks.

  Defined for Keras' per-example losses (the functions above, and their
  ``Loss`` classes with the default ``"sum_over_batch_size"`` reduction),
  whose value on a task is the mean of per-example terms, so the loss of
  every task is the mean over all but the task axis. ``None`` for any other
  loss, which then runs once per task under ``tf.vectorized_map``.
  """
  if isinstance(loss, str):
    loss = keras.losses.get(loss)
  if isinstance(loss, keras.losses.Loss):
    wrapper = next((c for c in type(loss).__mro__
                    if c.__name__ == "LossFunctionWrapper"), None)
    if (wrapper is None or type(loss).call is not wrapper.call
        or getattr(loss, "fn", None) not in _PER_EXAMPLE_LOSSES
        or loss.reduction != "sum_over_batch_size"
        # ignored labels are masked, and the mean is over the others
        or getattr(loss, "_fn_kwargs", {}).get("ignore_class") is not None):
      return None
    cast = lambda t: keras.ops.convert_to_tensor(t, dtype=loss.dtype)
    return lambda y, pred: _task_axis_mean(loss.call(cast(y), cast(pred)))
  # By identity: a user's callable need not be hashable.
  if any(loss is fn for fn in _PER_EXAMPLE_LOSSES):
    return lambda y, pred: _task_axis_mean(loss(y, pred))
  return None


def multi_step_loss_weights(iteration, num_steps: int, anneal_iterations: int):
  """MAML++ multi-step loss weights (Antoniou et al. 2019), a ``[num_steps]`` tensor.

  Uniform at iteration 0; the weights of the intermediate steps decay
  linearly to ``0.03 / num_steps`` over ``anneal_iterations`` while the last
  step's weight grows, so training ends on the plain MAML objective.
  """
  n = float(num_steps)
  it = tf.cast(iteration, tf.float32)
  decay = 1.0 / n / max(anneal_iterations, 1)
  floor = 0.03 / n
  nonfinal = tf.maximum(1.0 / n - it * decay, floor)
  final = tf.minimum(1.0 / n + it * (n - 1) * decay, 1.0 - (n - 1) * floor)
  return tf.concat([tf.fill([num_steps - 1], nonfinal), [final]], 0)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What one compiled task pass computes."""
  record_steps: Tuple[int, ...]   # query metrics after these step counts
  inner_lr: Optional[float]       # None: the learner's own (maybe learned)
  first_order: bool


INNER_LR_MODES = (None, "scalar", "per_parameter", "per_layer_per_step")
# Gradient ops that TF registers as not differentiable although they are:
# second-order terms through them would silently vanish.
_SECOND_ORDER_DROPPED = frozenset({
    "ResizeBilinearGrad", "SparseAddGrad", "FakeQuantWithMinMaxArgsGradient",
    "FakeQuantWithMinMaxVarsGradient",
    "FakeQuantWithMinMaxVarsPerChannelGradient"})


class MAML:
  """Model-Agnostic Meta-Learning for any built Keras 3 model.

  The same class runs the gradient-based family (see ``docs`` in README):
  first-order MAML (``first_order=True``), Meta-SGD
  (``learn_inner_lr="per_parameter"``), ANIL (``adapt="head"``), MAML++
  (``learn_inner_lr="per_layer_per_step"``, ``multi_step_loss_iterations``,
  ``first_order_until``, a cosine-decayed meta learning rate) and, in
  :class:`maml_tf.core.reptile.Reptile`, Reptile.

  Arguments:
    model: a built Keras 3 model (Sequential, functional or subclassed). Its
      trainable variables are the meta-parameters theta.
    loss: a Keras loss (object or name) or a callable
      ``(y_true, y_pred) -> scalar``.
    inner_lr: the inner step size alpha (the initial value when learned).
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
      convolution on GPU; on CPU, where TF has no grouped-convolution
      gradient, one convolution per task, or im2col ``"patches"`` for
      tasks of fewer than 2**15 input values, see ``task_chunk``),
      ``"patches"``, ``"grouped"`` or ``"map"``.
    learn_inner_lr: meta-learn the inner step sizes: ``None`` (fixed),
      ``"scalar"`` (one alpha), ``"per_parameter"`` (Meta-SGD: an alpha per
      weight) or ``"per_layer_per_step"`` (MAML++ LSLR: an alpha per weight
      tensor and inner step).
    adapt: which parameters the inner loop adapts: ``"all"`` (MAML),
      ``"head"`` (ANIL: the last layer that has weights), a list of layer
      names, or a predicate ``f(variable) -> bool``. The others stay at
      theta for every task but are still meta-learned.
    multi_step_loss_iterations: MAML++ multi-step loss: the meta-loss is a
      weighted sum of the query losses after every inner step, annealed to
      the last step's alone over this many iterations (0: off).
    first_order_until: MAML++ derivative-order annealing: first-order
      meta-gradients for the first this-many iterations, then second order.
    recompute: gradient checkpointing (second-order training only): each
      inner step keeps only its inputs and is recomputed in the backward
      pass, so peak memory stops growing with the activations of each inner
      step; on the task-batched path the query pass is checkpointed too,
      recomputed in chunks of tasks whose query sets hold no more examples
      than the meta-batch's support sets (:func:`query_chunk_size`). Costs
      roughly one more forward and inner backward per step.
    task_chunk: ``train_step`` runs the query passes (forward and backward)
      for chunks of this many tasks, one chunk after another: exactly the
      same update, with the query activations of one chunk alive (they stay
      in the CPU caches). On the task-batched path the inner loops of all
      tasks still run at once, as a few large ops (their support sets are
      small), and the outer backward pass carries every chunk's gradient
      through them in one pass; with ``recompute=True``, and on the other
      paths, the whole meta-gradient is computed chunk by chunk instead,
      holding one task's inner loop rather than every task's. Omniglot
      5-way 1-shot, 32 tasks, 2 CPUs: 0.33 -> 0.27 s per step at 1 inner
      step and 0.77 -> 0.53 s at 5, for an allocator peak of 280 MB at 1
      inner step and 1.1 GB at 10 against 25-35 MB chunk by chunk.
      ``None``: all tasks at once. ``"auto"``
      (default): 1 for convolutional models without a GPU when one task's
      support and query sets hold at least 2**15 input values (Omniglot
      5-way 1-shot with 15 query images per class: 1.5x faster than all at
      once), else ``None``; smaller tasks then run all at once with im2col
      convolutions (``conv_impl="auto"`` picks ``"patches"`` for them on
      CPU). When it does not divide the meta-batch, the largest divisor
      below it is used. With two or more usable CPUs two chunks run at
      once.
    closed_form: compute the meta-gradient in closed form
      (:mod:`maml_tf.core.dense_chain`: the backward pass and exact
      Hessian-vector products written out, about half the ops of autodiff)
      when the model is a ``keras.Sequential`` of ``Dense`` layers with
      ReLU or linear activations, the loss is Keras' mean squared error, the
      inner step size is fixed, every weight is adapted and there is no
      multi-step loss or recomputation: the paper's sinusoid regressor.
      ``"auto"`` (default): whenever possible; ``True``: a ``ValueError``
      says why not; ``False``: never. The same numbers either way (tested).
    jit_compile: compile :meth:`train_steps` with XLA. ``None`` (default):
      when the closed form runs (the sinusoid: 0.20 ms per meta-iteration on
      one core of this project's CPU, against 0.26 ms for the closed form
      and 0.30 ms for autodiff in the graph executor; convolutional models
      are many times slower under XLA:CPU). XLA ignores ``tf.debugging``
      checks, so the compiled loop tests the loss and meta-gradients for
      NaN/Inf itself and stops before a non-finite update, with the same
      ``FloatingPointError``. XLA's stateless random ops draw other numbers
      than the graph executor's from the same seeds, so an in-graph sampler
      gives other (equally distributed) tasks with and without XLA.

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
               conv_impl: str = "auto",
               learn_inner_lr: Optional[str] = None,
               adapt: Union[str, Sequence[str], Callable] = "all",
               multi_step_loss_iterations: int = 0,
               first_order_until: int = 0,
               recompute: bool = False,
               task_chunk: Union[str, int, None] = "auto",
               closed_form: Union[str, bool] = "auto",
               jit_compile: Optional[bool] = None):
    self.model = functional.ensure_built(model)
    self.loss_fn = _as_loss_fn(loss)
    self._task_losses = _per_task_loss_fn(loss)
    if not isinstance(inner_steps, (int, np.integer)) or inner_steps < 1:
      raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
    inner_lr = float(inner_lr)
    if not math.isfinite(inner_lr) or inner_lr < 0:
      raise ValueError(f"inner_lr must be a finite number >= 0, got {inner_lr}")
    if vectorize not in ("auto", True, False) + EXECUTIONS:
      raise ValueError(f"vectorize must be 'auto', True, False or one of "
                       f"{EXECUTIONS}, got {vectorize!r}")
    if learn_inner_lr not in INNER_LR_MODES:
      raise ValueError(f"learn_inner_lr must be one of {INNER_LR_MODES}, got "
                       f"{learn_inner_lr!r}")
    for name, value in (("multi_step_loss_iterations",
                         multi_step_loss_iterations),
                        ("first_order_until", first_order_until)):
      if int(value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    self.inner_lr = inner_lr
    self.inner_steps = int(inner_steps)
    self.first_order = bool(first_order)
    self.accuracy = accuracy
    self.learn_inner_lr = learn_inner_lr
    self.multi_step_loss_iterations = int(multi_step_loss_iterations)
    self.first_order_until = int(first_order_until)
    self.recompute = bool(recompute)
    self.task_chunk = self._check_task_chunk(task_chunk)
    self._conv_impl = conv_impl
    self._has_conv = any(isinstance(l, _CONV_LAYERS) for l in
                         self.model._flatten_layers(include_self=False))  # pylint: disable=protected-access
    self._on_gpu = bool(tf.config.list_physical_devices("GPU"))
    self.adapt_mask = _adapt_mask(self.model, adapt)
    self.inner_lr_variables = self._make_inner_lr_variables()
    self.meta_optimizer = meta_optimizer or keras.optimizers.Adam(1e-3)
    self.meta_optimizer.build(self.meta_variables)
    self._fused_update = fused_adam.fused_adam_update(self.meta_optimizer,
                                                      self.meta_variables)
    self._vectorize_mode = {True: "vectorized_map", False: "map_fn"}.get(
        vectorize, vectorize)
    self._batched = None
    self._patches_model = None       # built on first use (small CPU tasks)
    self.execution = self._resolve_execution(conv_impl)
    self._dense_chain = self._resolve_closed_form(closed_form, loss)
    if jit_compile not in (None, True, False):
      raise ValueError(f"jit_compile must be None, True or False, got "
                       f"{jit_compile!r}")
    self._jit_auto = jit_compile is None
    self.jit_compile = (self._dense_chain is not None if jit_compile is None
                        else jit_compile)
    self._guard = None     # a _FiniteGuard while an XLA step is traced
    # Task chunks in flight at once: two when two CPUs are usable (oneDNN
    # does not spread one small task's convolutions over both cores:
    # Omniglot 5-way 1-shot on this project's 2-CPU machine 0.41 -> 0.35 s
    # per step; four in flight no better), for about twice one chunk's
    # memory.
    self._chunk_parallel = 2 if _usable_cpus() >= 2 else 1
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

  @staticmethod
  def _check_task_chunk(task_chunk):
    if task_chunk is None or task_chunk == "auto":
      return task_chunk
    if (isinstance(task_chunk, bool) or
        not isinstance(task_chunk, (int, np.integer)) or task_chunk < 1):
      raise ValueError("task_chunk must be None, 'auto' or an integer >= 1, "
                       f"got {task_chunk!r}")
    return int(task_chunk)

  def _small_tasks(self, batch) -> bool:
    """Is one task's data small (support + query < 2**15 input values)?

    On CPU, convolutional models then run fastest all tasks at once with
    im2col convolutions (``conv_impl='patches'``: a handful of big ops
    instead of thousands of tiny ones; Omniglot with 1 query image per
    class: 2x), and larger tasks fastest one after another with oneDNN's
    convolution per task (``task_chunk=1``: one task's activations stay
    in the CPU caches; Omniglot with 15 query images per class: 1.5x).
    """
    sx, qx = batch.support_x, batch.query_x
    per_task = (sx.shape[1] or 0) + (qx.shape[1] or 0)
    return per_task * int(np.prod(sx.shape[2:] or [1])) < 2 ** 15

  def _cpu_conv_auto(self) -> bool:
    return self._has_conv and not self._on_gpu and self.execution == "batched"

  def _batched_model(self, batch):
    """The task-batched model; im2col convolutions for small CPU tasks."""
    if (self._conv_impl == "auto" and self._cpu_conv_auto()
        and self._small_tasks(batch)):
      if self._patches_model is None:
        self._patches_model = fast_weights.compile_batched(self.model,
                                                           "patches")
      return self._patches_model
    return self._batched

  # ------------------------------------------------------- meta-parameters
  def _make_inner_lr_variables(self) -> list:
    mode = self.learn_inner_lr
    if mode is None:
      return []
    dtype = self.model.trainable_variables[0].dtype
    if mode == "scalar":
      shapes = [()]
    elif mode == "per_parameter":
      shapes = [tuple(v.shape) for v in self.model.trainable_variables]
    else:
      shapes = [(self.inner_steps,)] * len(self.model.trainable_variables)
    return [keras.Variable(np.full(shape, self.inner_lr), dtype=dtype,
                           name=f"inner_lr_{i}")
            for i, shape in enumerate(shapes)]

  @property
  def meta_variables(self) -> list:
    """Everything the outer step updates: the model's trainable variables,
    then the learned inner step sizes (if any)."""
    return list(self.model.trainable_variables) + list(self.inner_lr_variables)

  def checkpoint_items(self) -> Dict[str, object]:
    """Trackables a checkpoint must hold to resume this learner."""
    items = {"model": self.model, "meta_optimizer": self.meta_optimizer}
    if self.inner_lr_variables:
      items["inner_lr"] = {str(i): v for i, v in
                           enumerate(self.inner_lr_variables)}
    return items

  def _lr_schedule(self, plan: _Plan, lrs: Sequence[tf.Tensor]):
    """``step -> step size(s)`` for the inner loop."""
    if plan.inner_lr is not None or not lrs:
      value = self.inner_lr if plan.inner_lr is None else plan.inner_lr
      return lambda step: value
    if self.learn_inner_lr == "scalar":
      return lambda step: lrs[0]
    if self.learn_inner_lr == "per_parameter":
      return lambda step: list(lrs)
    last = self.inner_steps - 1
    return lambda step: [lr[min(step, last)] for lr in lrs]

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

  def _resolve_closed_form(self, closed_form, loss):
    """The model's :class:`dense_chain.DenseChain`, or None (autodiff)."""
    if closed_form not in ("auto", True, False):
      raise ValueError(f"closed_form must be 'auto', True or False, got "
                       f"{closed_form!r}")
    if closed_form is False:
      return None
    why = None
    if self.learn_inner_lr is not None:
      why = "learned inner step sizes"
    elif not all(self.adapt_mask):
      why = "only some weights adapted"
    elif self.multi_step_loss_iterations:
      why = "a multi-step loss"
    elif self.recompute:
      why = "recompute=True"
    chain = None if why else dense_chain.analyse(self.model, loss)
    if chain is None and closed_form is True:
      raise ValueError(
          "closed_form=True is not possible: " + (why or (
              "it needs a keras.Sequential of Dense layers with ReLU or "
              "linear activations and Keras' mean squared error loss")))
    return chain

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
  def _run_tasks(self, plan: _Plan, params, state, batch, with_acc,
                 lrs=(), return_fast=False):
    """Adapts every task and scores its query set after each recorded step.

    Returns ``{"loss": [T, S], "accuracy": [T, S], "state": [T, ...] list,
    "fast": [T, ...] list (if return_fast)}``.
    """
    lr_of = self._lr_schedule(plan, lrs)
    if self.execution == "batched":
      return self._run_tasks_batched(plan, params, state, batch, with_acc,
                                     lr_of, return_fast)
    return self._map_tasks(
        self._task_fn(plan, params, state, with_acc, lr_of, return_fast), batch)

  def _task_fn(self, plan, params, state, with_acc, lr_of, return_fast):
    """The per-task function of the generic (mapped) paths."""
    def run(task):
      sx, sy, qx, qy = task
      losses, accs = {}, {}

      def score(step, fast, st):
        if step in plan.record_steps:
          fast, st = _unless_differentiated(step, fast, st)
          pred, _ = functional.functional_call(self.model, fast, st, qx, True)
          losses[step] = self.loss_fn(qy, pred)
          if with_acc:
            accs[step] = sparse_accuracy(qy, pred)

      score(0, params, state)
      fast, final_state = adapt_params(
          self.model, self.loss_fn, params, state, sx, sy, lr_of,
          max(plan.record_steps), plan.first_order, on_step=score,
          adapt_mask=self.adapt_mask,
          recompute=self.recompute and not plan.first_order)
      out = {"loss": tf.stack([losses[s] for s in plan.record_steps]),
             "state": final_state}
      if with_acc:
        out["accuracy"] = tf.stack([accs[s] for s in plan.record_steps])
      if return_fast:
        out["fast"] = fast
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

  def _task_loss(self, y, pred):
    """``[T]`` losses of ``[T, N, ...]`` labels and predictions."""
    if self._task_losses is not None:
      return self._task_losses(y, pred)
    return tf.vectorized_map(lambda a: self.loss_fn(a[0], a[1]), (y, pred))

  def _run_tasks_batched(self, plan, params, state, batch, with_acc, lr_of,
                         return_fast):
    """All tasks at once through the task-batched fast-weights model."""
    batched = self._batched_model(batch)
    sx, sy, qx, qy = batch
    num_tasks = sx.shape[0] if sx.shape[0] is not None else tf.shape(sx)[0]
    tile = lambda v: _tile_tasks(v, num_tasks)
    state = [tile(v) for v in state]
    losses, accs = {}, {}

    recompute = self.recompute and not plan.first_order
    chunk = None
    if recompute and qx.shape[0] is not None:
      chunk = query_chunk_size(int(qx.shape[0]), int(sx.shape[1]),
                               int(qx.shape[1]))
      chunk = None if chunk >= int(qx.shape[0]) else chunk

    def score(step, fast, st):
      if step in plan.record_steps:
        fast, st = _unless_differentiated(step, fast, st)
        if step != 0 and chunk is not None:
          losses[step], accs[step] = _recomputed_query(
              batched, self._task_loss, fast, st, qx, qy, chunk, with_acc)
          return
        pred, _ = batched(fast, st, qx, training=True)
        losses[step] = self._task_loss(qy, pred)
        if with_acc:
          accs[step] = sparse_accuracy_per_task(qy, pred)

    score(0, params, state)          # shared weights: plain kernels
    # Adapted weights get a task axis; the others stay shared (cheaper).
    fast = [tile(p) if m else p for p, m in zip(params, self.adapt_mask)]
    fast, state = adapt_params(
        self.model,
        lambda y, pred: tf.reduce_sum(self._task_loss(y, pred)),
        fast, state, sx, sy, lr_of, max(plan.record_steps), plan.first_order,
        on_step=score, adapt_mask=self.adapt_mask,
        forward=lambda p, s, x: batched(p, s, x, training=True),
        recompute=recompute)
    out = {"loss": tf.stack([losses[s] for s in plan.record_steps], axis=1),
           "state": state}
    if with_acc:
      out["accuracy"] = tf.stack([accs[s] for s in plan.record_steps], axis=1)
    if return_fast:
      out["fast"] = [f if m else tile(f)
                     for f, m in zip(fast, self.adapt_mask)]
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

  def _write_state(self, state, task_states):
    if self._guard is not None and self._guard.ok is not None:
      def write():
        self._write_state_now(state, task_states)
        return tf.constant(True)
      tf.cond(self._guard.ok, write, lambda: tf.constant(False))
      return
    self._write_state_now(state, task_states)

  def _write_state_now(self, state, task_states):
    for var, kind, value in zip(self.model.non_trainable_variables,
                                self._state_kinds,
                                self._new_state(state, task_states)):
      if kind != "keep":
        var.assign(value)

  # --------------------------------------------------------- compiled steps
  def _compile(self, key, make, batch, reduce_retracing=False,
               second_order=False):
    """A tf.function per key; falls back to map_fn if pfor cannot trace."""
    if key in self._compiled:
      return self._compiled[key]
    fn = tf.function(make(), reduce_retracing=reduce_retracing)
    try:
      self._trace(fn, batch, second_order)
    except (ValueError, NotImplementedError, TypeError,
            tf.errors.OpError) as e:
      if self.execution != "vectorized_map":
        raise
      warnings.warn(
          f"maml_tf: could not vectorise model {self.model.name!r} over "
          f"tasks ({type(e).__name__}: {_root_cause(e)}); using tf.map_fn, "
          "which gives the same numbers more slowly.")
      self.execution = "map_fn"
      self._compiled.clear()
      fn = tf.function(make(), reduce_retracing=reduce_retracing)
      self._trace(fn, batch, second_order)
    self._compiled[key] = fn
    return fn

  def _trace(self, fn, batch, second_order: bool = False):
    """Traces ``fn``; a missing second derivative becomes a clear error.

    Two cases: TF raises because a gradient op has no gradient registered
    (e.g. ``ResizeNearestNeighborGrad``), or, worse, TF declares a gradient op
    not differentiable and silently drops the second-order terms through it
    (``ResizeBilinearGrad``). The second is found by scanning the traced graph.
    """
    try:
      concrete = (fn.get_concrete_function() if batch is None else
                  fn.get_concrete_function(batch))
    except Exception as e:  # pylint: disable=broad-except
      text = str(e)
      if not (isinstance(e, LookupError) or "No gradient defined" in text
              or "gradient registry has no entry" in text):
        raise
      raise NotImplementedError(
          f"maml_tf: model {self.model.name!r} uses an operation that "
          f"TensorFlow cannot differentiate twice ({_root_cause(e)}). "
          "Second-order MAML needs the gradient of every gradient op; use "
          "first_order=True, or replace the layer (e.g. UpSampling2D with "
          "interpolation='nearest' by Conv2DTranspose).") from e
    if second_order:
      graph_def = concrete.graph.as_graph_def()
      types = {n.op for n in graph_def.node}
      types.update(n.op for f in graph_def.library.function
                   for n in f.node_def)
      dropped = sorted(types & _SECOND_ORDER_DROPPED)
      if dropped:
        raise NotImplementedError(
            f"maml_tf: model {self.model.name!r} uses {', '.join(dropped)}, "
            "which TensorFlow declares not differentiable, so the second-order "
            "terms through it would silently be zero. Use first_order=True, "
            "or replace the layer (e.g. UpSampling2D(interpolation='bilinear')"
            " by interpolation='nearest' or Conv2DTranspose).")

  def _train_plan(self, first_order: bool, before: bool = True) -> _Plan:
    """Steps scored while training: the objective's, and 0 if ``before``."""
    if self.multi_step_loss_iterations:
      steps = tuple(range(0 if before else 1, self.inner_steps + 1))
    else:
      steps = (0, self.inner_steps) if before else (self.inner_steps,)
    return _Plan(steps, None, first_order)

  def _read_meta(self):
    params, state = functional.read_weights(self.model)
    lrs = [tf.convert_to_tensor(v) for v in self.inner_lr_variables]
    return params, state, lrs

  def _objective(self, out, plan: _Plan):
    """The meta-loss from per-task query losses ``[T, S]``."""
    if not self.multi_step_loss_iterations:
      return tf.reduce_mean(out["loss"][:, -1])
    weights = multi_step_loss_weights(self.meta_optimizer.iterations,
                                      self.inner_steps,
                                      self.multi_step_loss_iterations)
    first = 1 if plan.record_steps[0] == 0 else 0
    per_step = tf.reduce_mean(out["loss"][:, first:], axis=0)
    return tf.reduce_sum(tf.cast(weights, per_step.dtype) * per_step)

  def _make_meta_loss(self):
    plan = self._train_plan(self.first_order, before=False)

    def meta_loss(batch):
      params, state, lrs = self._read_meta()
      return self._objective(self._run_tasks(plan, params, state, batch,
                                             False, lrs), plan)
    return meta_loss

  def _metrics(self, out, loss, with_acc, plan: _Plan):
    value = {
        "loss_after": lambda: tf.reduce_mean(out["loss"][:, -1]),
        "loss_before": lambda: tf.reduce_mean(out["loss"][:, 0]),
        "meta_loss": lambda: loss,
        "accuracy_after": lambda: tf.reduce_mean(out["accuracy"][:, -1]),
        "accuracy_before": lambda: tf.reduce_mean(out["accuracy"][:, 0])}
    names = self._metric_names(with_acc, plan.record_steps[0] == 0)
    return {name: value[name]() for name in names}

  def _apply(self, grads, loss=None):
    """Checks the meta-gradient (and ``loss``) is finite, then takes the
    outer step."""
    if self._guard is not None:
      # Under XLA, where check_numerics does nothing: the step is taken
      # only if the loss and every gradient are finite.
      loss_ok = (tf.constant(True) if loss is None
                 else tf.reduce_all(tf.math.is_finite(loss)))
      self._guard.flags = tf.stack(
          [loss_ok] + [tf.reduce_all(tf.math.is_finite(g)) for g in grads])
      self._guard.ok = tf.reduce_all(self._guard.flags)

      def update():
        self._update(grads)
        return tf.constant(True)
      tf.cond(self._guard.ok, update, lambda: tf.constant(False))
      return
    variables = self.meta_variables
    grads = [tf.debugging.check_numerics(
        g, f"maml_tf: {_meta_gradient_name(v)} is NaN or Inf")
             for g, v in zip(grads, variables)]
    self._update(grads)

  def _update(self, grads):
    if self._fused_update is not None and not tf.distribute.has_strategy():
      self._fused_update(grads)
    else:
      self.meta_optimizer.apply_gradients(zip(grads, self.meta_variables))

  def _chunk_size(self, batch) -> Optional[int]:
    """Tasks per chunk for this meta-batch (None: all at once)."""
    num_tasks = batch.support_x.shape[0]
    chunk = self.task_chunk
    if chunk == "auto":
      # See _small_tasks: large convolutional tasks on CPU, one at a time.
      chunk = (1 if self._cpu_conv_auto() and not self._small_tasks(batch)
               else None)
    if chunk is None or num_tasks is None:
      return None
    chunk = min(chunk, num_tasks)
    while num_tasks % chunk:
      chunk -= 1
    return None if chunk == num_tasks else chunk

  def _meta_gradients(self, plan: _Plan, params, state, lrs, batch,
                      with_acc):
    """``(grads, out, loss)``: the meta-gradient w.r.t. ``params + lrs``.

    With ``task_chunk``, chunks of tasks run one after another in a
    ``tf.map_fn`` (each chunk's objective and gradient inside the loop body,
    so only one chunk's activations are ever alive) and the per-chunk
    gradients, losses and outputs are averaged / concatenated: the same
    numbers as all tasks at once, since the objective is a mean over tasks.
    """
    chunk = self._chunk_size(batch)
    if chunk is None:
      return self._gradients_of(plan, params, state, lrs, batch, with_acc)
    if self._split_ok(plan, batch):
      return self._split_gradients(plan, params, state, lrs, batch, with_acc,
                                   chunk)
    num_chunks = batch.support_x.shape[0] // chunk
    chunks = tuple(_split_tasks(t, num_chunks, chunk) for t in batch)

    def body(c):
      # Identities make the captured weights local to the loop body, where
      # the tape can watch them.
      grads, out, loss = self._gradients_of(
          plan, [tf.identity(p) for p in params], state,
          [tf.identity(l) for l in lrs], TaskBatch(*c), with_acc)
      out.pop("fast", None)
      dtype = params[0].dtype
      out["loss"] = tf.cast(out["loss"], dtype)
      if with_acc:
        out["accuracy"] = tf.cast(out["accuracy"], tf.float32)
      return grads, out, tf.cast(loss, dtype)

    steps = len(plan.record_steps)
    out_spec = {"loss": tf.TensorSpec([chunk, steps], params[0].dtype),
                "state": [tf.TensorSpec([chunk] + s.shape.as_list(), s.dtype)
                          for s in state]}
    if with_acc:
      out_spec["accuracy"] = tf.TensorSpec([chunk, steps], tf.float32)
    spec = ([tf.TensorSpec(p.shape, p.dtype) for p in params + lrs],
            out_spec, tf.TensorSpec([], params[0].dtype))
    grads, out, losses = tf.map_fn(body, chunks, fn_output_signature=spec,
                                   parallel_iterations=self._chunk_parallel)
    out = tf.nest.map_structure(_merge_chunks, out)
    return ([tf.reduce_mean(g, axis=0) for g in grads], out,
            tf.reduce_mean(losses))

  def _split_ok(self, plan, batch) -> bool:
    """Query-side chunks only (:meth:`_split_gradients`)?

    Not with ``recompute``: its users ask for memory, and chunking the
    whole meta-gradient keeps one task's inner loop alive instead of every
    task's (Omniglot 5-way 1-shot, 10 inner steps: 30 MB against 430 MB).
    """
    return (self.execution == "batched" and not self.recompute
            and not self.multi_step_loss_iterations
            and batch.support_x.shape[0] is not None)

  def _split_gradients(self, plan, params, state, lrs, batch, with_acc,
                       chunk):
    """Task chunks on the query side only; the inner loops all at once.

    The support sets are small, so every task's inner loop (forward, inner
    gradient, and in the backward pass its second-order terms) runs as one
    task-batched pass over the whole meta-batch: a few large ops instead of
    one small op per task. The query sets are large, so their passes run
    ``chunk`` tasks at a time (their activations stay in the CPU caches),
    each chunk giving ``v_t = dL/dtheta'_t`` for its tasks; the outer
    backward pass then carries all ``v_t`` through the inner loops at once:
    ``grads = tape.gradient(theta', theta, output_gradients=v)``. The same
    meta-gradient as one pass over all tasks (tested).
    """
    sx, sy, qx, qy = batch
    num_tasks = int(sx.shape[0])
    support_model = self._batched_model(
        TaskBatch(sx, sy, sx[:, :0], sy[:, :0]))
    query_model = self._batched_model(batch)
    tile = lambda v: _tile_tasks(v, num_tasks)
    lr_of = self._lr_schedule(plan, lrs)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(params + lrs)
      fast = [tile(p) if m else p for p, m in zip(params, self.adapt_mask)]
      fast, new_state = adapt_params(
          self.model,
          lambda y, pred: tf.reduce_sum(self._task_loss(y, pred)),
          fast, [tile(v) for v in state], sx, sy, lr_of,
          max(plan.record_steps), plan.first_order,
          adapt_mask=self.adapt_mask,
          forward=lambda p, s, x: support_model(p, s, x, training=True))
    per_task = list(self.adapt_mask)
    adapted = [f for f, m in zip(fast, per_task) if m]
    shared = [f for f, m in zip(fast, per_task) if not m]
    num_chunks = num_tasks // chunk
    split = lambda t: _split_tasks(t, num_chunks, chunk)
    score_before = plan.record_steps[0] == 0
    dtype = params[0].dtype

    def merge(per_task_values, shared_values):
      it_a, it_s = iter(per_task_values), iter(shared_values)
      return [next(it_a) if m else next(it_s) for m in per_task]

    def body(c):
      fast_c, state_c, qx_c, qy_c = c
      fast_c = list(fast_c)
      local_shared = [tf.identity(v) for v in shared]
      with tf.GradientTape(watch_accessed_variables=False) as qtape:
        qtape.watch(fast_c + local_shared)
        pred, _ = query_model(merge(fast_c, local_shared), list(state_c),
                              qx_c, training=True)
        losses = self._task_loss(qy_c, pred)
        total = tf.reduce_sum(losses) / num_tasks
      grads = qtape.gradient(total, fast_c + local_shared,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
      rows = [losses]
      accs = [sparse_accuracy_per_task(qy_c, pred)] if with_acc else []
      if score_before:         # a metric at theta: shared weights and state
        pred0, _ = query_model([tf.identity(p) for p in params],
                               [tf.identity(v) for v in state], qx_c,
                               training=True)
        rows.insert(0, self._task_loss(qy_c, pred0))
        if with_acc:
          accs.insert(0, sparse_accuracy_per_task(qy_c, pred0))
      out = {"loss": tf.cast(tf.stack(rows, axis=1), dtype)}
      if with_acc:
        out["accuracy"] = tf.cast(tf.stack(accs, axis=1), tf.float32)
      return grads[:len(fast_c)], grads[len(fast_c):], out

    steps = len(plan.record_steps)
    out_spec = {"loss": tf.TensorSpec([chunk, steps], dtype)}
    if with_acc:
      out_spec["accuracy"] = tf.TensorSpec([chunk, steps], tf.float32)
    spec = ([tf.TensorSpec([chunk] + f.shape[1:].as_list(), f.dtype)
             for f in adapted],
            [tf.TensorSpec(f.shape, f.dtype) for f in shared], out_spec)
    v_adapted, v_shared, out = tf.map_fn(
        body, ([split(f) for f in adapted], [split(v) for v in new_state],
               split(qx), split(qy)),
        fn_output_signature=spec, parallel_iterations=self._chunk_parallel)
    out = tf.nest.map_structure(_merge_chunks, out)
    out["state"] = new_state
    loss = _check_meta_loss(tf.reduce_mean(out["loss"][:, -1]))
    v = merge([_merge_chunks(g) for g in v_adapted],
              [tf.reduce_sum(g, axis=0) for g in v_shared])
    grads = tape.gradient(fast, params + lrs, output_gradients=v,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return grads, out, loss

  def _gradients_of(self, plan, params, state, lrs, batch, with_acc):
    """``(grads, out, loss)`` of one pass over ``batch`` (all its tasks)."""
    if self._dense_chain is not None and not with_acc and not lrs:
      grads, losses = dense_chain.meta_gradients(
          self._dense_chain, params, batch, self.inner_lr, self.inner_steps,
          plan.first_order, plan.record_steps, xla=self._guard is not None)
      loss = _check_meta_loss(tf.reduce_mean(losses[:, -1]))
      return grads, {"loss": losses, "state": []}, loss
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(params + lrs)
      out = self._run_tasks(plan, params, state, batch, with_acc, lrs)
      # Inside the tape: a check outside it would cut the gradient path.
      loss = _check_meta_loss(self._objective(out, plan))
    grads = tape.gradient(loss, params + lrs,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return grads, out, loss

  def _make_train_step(self, with_acc: bool, first_order: bool,
                       before: bool = True):
    plan = self._train_plan(first_order, before)

    def train_step(batch):
      params, state, lrs = self._read_meta()
      grads, out, loss = self._meta_gradients(plan, params, state, lrs, batch,
                                              with_acc)
      self._apply(grads, loss)
      self._write_state(state, out["state"])
      return self._metrics(out, loss, with_acc, plan)
    return train_step

  def _make_evaluate(self, steps, inner_lr, with_acc):
    plan = _Plan(tuple(steps), inner_lr, True)

    def evaluate(batch):
      params, state, lrs = self._read_meta()
      out = self._run_tasks(plan, params, state, batch, with_acc, lrs)
      out.pop("state")
      return out
    return evaluate

  # ------------------------------------------------------------- public API
  def meta_loss(self, batch: TaskBatch) -> tf.Tensor:
    """Mean query loss after ``inner_steps`` adaptation steps (a scalar).

    Differentiable with respect to ``model.trainable_variables`` (and the
    learned step sizes), including the second-order terms unless
    ``first_order=True``. Writes nothing.

    Example:
      >>> with tf.GradientTape() as tape:
      ...   loss = maml.meta_loss(batch)
      >>> grads = tape.gradient(loss, model.trainable_variables)
    """
    batch = self._prepare(batch)
    return self._compile("meta_loss", self._make_meta_loss, batch,
                         second_order=not self.first_order)(batch)

  def _first_order_now(self) -> bool:
    if self.first_order:
      return True
    return (self.first_order_until > 0 and
            int(self.meta_optimizer.iterations.numpy()) < self.first_order_until)

  def train_step_tensors(self, batch: TaskBatch,
                         pre_update_metrics: bool = True
                         ) -> Dict[str, tf.Tensor]:
    """As :meth:`train_step` but returns tensors (no host synchronisation)."""
    batch = self._prepare(batch)
    with_acc = self._wants_accuracy(batch)
    first_order = self._first_order_now()
    before = bool(pre_update_metrics)
    fn = self._compile(("train", with_acc, first_order, before),
                       lambda: self._make_train_step(with_acc, first_order,
                                                     before),
                       batch, second_order=not first_order)
    with _floating_point_errors():
      return fn(batch)

  def train_step(self, batch: TaskBatch,
                 pre_update_metrics: bool = True) -> Dict[str, float]:
    """One meta-update on ``batch``; returns the metrics as Python floats.

    Keys: ``loss_after`` (mean query loss after adaptation) and, for
    classification, ``accuracy_after``; with ``pre_update_metrics`` (default)
    also ``loss_before``/``accuracy_before``, which cost one more forward
    pass over every query set (about 20% of an Omniglot step; training loops
    can ask for them only on the steps they log). Compiled once per batch
    shape and flag. Raises ``FloatingPointError`` (and leaves the weights
    unchanged) if the loss or the meta-gradient is not finite.

    Example:
      >>> maml.train_step(batch)
      {'loss_after': 0.52, 'loss_before': 2.91}
    """
    return {k: float(v) for k, v in
            self.train_step_tensors(batch, pre_update_metrics).items()}

  def train_steps(self, sample_batch: Callable[[tf.Tensor], TaskBatch],
                  num_steps: int, pre_update_metrics: bool = False
                  ) -> Dict[str, tf.Tensor]:
    """``num_steps`` meta-updates in one compiled call (a ``tf.while_loop``).

    For small models the per-call cost of a ``tf.function`` (tens of
    microseconds) and host-side batch building rival the meta-step itself;
    running many steps, with the tasks sampled in the graph, removes both
    (the sinusoid MLP: several times more meta-iterations per second).

    Arguments:
      sample_batch: ``iteration -> TaskBatch``, traceable TensorFlow code
        (e.g. :func:`maml_tf.tasks.sinusoid.batch_sampler`), called with the
        meta-optimizer's iteration count (an int64 scalar tensor) before
        each step. Sampling from it statelessly makes runs reproducible and
        resumable.
      num_steps: meta-updates per call (>= 1). One compiled function per
        ``(sample_batch, num_steps)``.
      pre_update_metrics: also average ``loss_before``/``accuracy_before``.

    Returns:
      The metrics of :meth:`train_step_tensors`, each the mean over the
      ``num_steps`` steps.

    Example:
      >>> sample = sinusoid.batch_sampler(25, 10, 10, seed=0)
      >>> for _ in range(70):
      ...   metrics = maml.train_steps(sample, 1000)  # 70,000 meta-updates
    """
    if isinstance(num_steps, bool) or int(num_steps) < 1:
      raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    num_steps = int(num_steps)
    # The derivative order (``first_order_until``) is decided per call.
    first_order = self._first_order_now()
    before = bool(pre_update_metrics)
    key = ("train_steps", id(sample_batch), num_steps, first_order, before)
    if key not in self._compiled:
      self._compiled[key] = self._compile_steps(sample_batch, num_steps,
                                                first_order, before,
                                                self.jit_compile)
    fn = self._compiled[key]
    try:
      with _floating_point_errors():
        metrics, flags = fn()
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
            tf.errors.InternalError) as e:
      if not (self._jit_auto and fn.maml_jit and not fn.maml_ran
              and "XLA" in str(e)):
        raise
      warnings.warn(f"maml_tf: XLA could not compile train_steps "
                    f"({_root_cause(e)}); running it without XLA.")
      self.jit_compile = False
      self._compiled = {k: v for k, v in self._compiled.items()
                        if k[0] != "train_steps"}
      return self.train_steps(sample_batch, num_steps, pre_update_metrics)
    fn.maml_ran = True
    if flags is not None:
      flags = flags.numpy()
      if not flags.all():
        names = [_META_LOSS] + [_meta_gradient_name(v)
                                for v in self.meta_variables]
        bad = names[int(np.argmin(flags))]
        raise FloatingPointError(_fp_message(f" {bad} is NaN or Inf"))
    return metrics

  def _compile_steps(self, sample_batch, num_steps: int, first_order: bool,
                     before: bool, jit: bool):
    """The compiled ``tf.while_loop`` of :meth:`train_steps`.

    Returns ``() -> (metrics, flags)``; under XLA ``flags`` are the loss's
    and each meta-gradient's finiteness at the last step run (the loop stops
    at the first non-finite one, before its update), else ``None``.
    """
    def loop():
      self._guard = _FiniteGuard() if jit else None
      try:
        sample = lambda: self._prepare(
            sample_batch(self.meta_optimizer.iterations))
        # The batch's dtypes decide the metrics (accuracy for int labels);
        # only the dtypes of this traced sample are used.
        with_acc = self._wants_accuracy(sample())
        step = self._make_train_step(with_acc, first_order, before)
        names = self._metric_names(with_acc, before)
        zeros = {k: tf.zeros([], self.model.trainable_variables[0].dtype)
                 for k in names}
        flags = tf.ones([1 + len(self.meta_variables)], tf.bool)

        def body(i, sums, flags):
          metrics = step(sample())
          if jit:
            flags = self._guard.flags
          return i + 1, {k: sums[k] + tf.cast(metrics[k], sums[k].dtype)
                         for k in sums}, flags
        if jit:      # stop at the first non-finite step
          cond = lambda i, _, flags: tf.logical_and(i < num_steps,
                                                    tf.reduce_all(flags))
        else:        # check_numerics raises instead
          cond = lambda i, _, flags: i < num_steps
        _, sums, flags = tf.while_loop(
            cond, body, (tf.constant(0), zeros, flags), parallel_iterations=1)
        return ({k: v / num_steps for k, v in sums.items()},
                flags if jit else None)
      finally:
        self._guard = None
    fn = tf.function(loop, jit_compile=jit)
    self._trace(fn, None, second_order=not first_order)
    fn.maml_jit, fn.maml_ran = jit, False
    return fn

  def _metric_names(self, with_acc: bool, before: bool) -> Tuple[str, ...]:
    names = ["loss_after"] + (["loss_before"] if before else [])
    if self.multi_step_loss_iterations:
      names.append("meta_loss")
    if with_acc:
      names += ["accuracy_after"] + (["accuracy_before"] if before else [])
    return tuple(names)

  def evaluate(self, batch: TaskBatch, steps: Sequence[int] = (0, 1, 5, 10),
               inner_lr: Optional[float] = None,
               per_task: bool = False) -> Dict[str, np.ndarray]:
    """Query loss (and accuracy) after each number of inner steps in ``steps``.

    Arguments:
      batch: tasks to adapt to (support) and score on (query).
      steps: step counts to report, e.g. ``(0, 1, 5, 10)``.
      inner_lr: step size for this evaluation; default the learner's own
        (``self.inner_lr``, or the learned step sizes).
      per_task: return ``[len(steps), T]`` arrays instead of task means.

    Returns:
      ``{"steps": array, "loss": array, "accuracy": array (classification)}``.
    """
    steps = tuple(int(s) for s in steps)
    if not steps or min(steps) < 0:
      raise ValueError(f"steps must be non-negative integers, got {steps}")
    inner_lr = None if inner_lr is None else float(inner_lr)
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
      inner_lr: step size; default the learner's own (fixed or learned).
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
    params, state, lrs = self._read_meta()
    plan = _Plan((steps,), None if inner_lr is None else float(inner_lr), True)
    fast, _ = adapt_params(self.model, self.loss_fn, params, state, x, y,
                           self._lr_schedule(plan, lrs), steps,
                           adapt_mask=self.adapt_mask)
    adapted = clone_with_weights(self.model, fast, state)
    if batchnorm_statistics == "support":
      refresh_batchnorm_statistics(adapted, x)
    return adapted


@contextlib.contextmanager
def _floating_point_errors():
  """Turns the graph's NaN/Inf checks into ``FloatingPointError``."""
  try:
    yield
  except tf.errors.InvalidArgumentError as e:
    if "maml_tf:" in str(e):
      msg = str(e).split("maml_tf:")[1].split("\n")[0].split(" : ")[0]
      raise FloatingPointError(_fp_message(msg)) from None
    raise


def _usable_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:      # not Linux
    return os.cpu_count() or 1


def _tile_tasks(v, num_tasks):
  """``v`` repeated along a new leading task axis.

  ``expand_dims``, not ``v[None]``, whose gradient is a StridedSliceGrad.
  """
  return tf.tile(tf.expand_dims(v, 0), [num_tasks] + [1] * v.shape.rank)


def _split_tasks(t, num_chunks: int, chunk: int):
  """``[T, ...] -> [num_chunks, chunk, ...]``."""
  return tf.reshape(t, [num_chunks, chunk] + t.shape[1:].as_list())


def _merge_chunks(t):
  """``[num_chunks, chunk, ...] -> [T, ...]`` (undoes :func:`_split_tasks`)."""
  return tf.reshape(t, [-1] + t.shape[2:].as_list())


_META_LOSS = "the meta-loss (query loss after adaptation)"


def _meta_gradient_name(variable) -> str:
  return f"the meta-gradient of {variable.path}"


def _check_meta_loss(loss):
  return tf.debugging.check_numerics(loss, f"maml_tf: {_META_LOSS} is NaN "
                                     "or Inf")


def _fp_message(msg: str) -> str:
  return (f"maml_tf:{msg}. The meta-parameters were not updated by this "
          "step. Lower inner_lr or the meta learning rate, or check the "
          "data for NaN/Inf.")


class _FiniteGuard:
  """NaN/Inf flags of the step being traced under XLA (see ``_apply``)."""

  def __init__(self):
    self.flags = None     # [loss] + [each meta-gradient] finite
    self.ok = None        # all of them


def _adapt_mask(model: keras.Model, adapt) -> list:
  """One bool per trainable variable: does the inner loop adapt it?"""
  variables = model.trainable_variables
  if adapt == "all":
    return [True] * len(variables)
  if adapt == "head":
    layers = [l for l in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
              if l.trainable_weights]
    head = {id(v) for v in layers[-1].trainable_weights}
    mask = [id(v) in head for v in variables]
  elif callable(adapt):
    mask = [bool(adapt(v)) for v in variables]
  elif isinstance(adapt, (list, tuple)):
    names = set(adapt)
    layers = {l.name: l for l in model._flatten_layers(include_self=False)}  # pylint: disable=protected-access
    missing = names - set(layers)
    if missing:
      raise ValueError(f"adapt names layers that model {model.name!r} does not "
                       f"have: {sorted(missing)}; it has {sorted(layers)}")
    chosen = {id(v) for n in names for v in layers[n].trainable_weights}
    mask = [id(v) in chosen for v in variables]
  else:
    raise ValueError("adapt must be 'all', 'head', a list of layer names or a "
                     f"predicate, got {adapt!r}")
  if not any(mask):
    raise ValueError(f"adapt={adapt!r} selects no trainable variable of "
                     f"model {model.name!r}")
  return mask


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
