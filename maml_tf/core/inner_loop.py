"""The adaptation: inner gradient steps from theta on a task's support set.

:func:`adapt_params` is the one inner loop of maml_tf: meta-training (every
execution strategy), evaluation, :meth:`maml_tf.MAML.adapt`, the adaptable
SavedModel and distributed training all run it, through an
:class:`InnerLoop` that fixes what a learner adapts and with which step
sizes. It is pure: weights in, weights out.

Random layers (Dropout, GaussianNoise, ...): every forward call of the
inner loop draws from its own stream of the layers' seeds, a function of
(the seed state, the task's index in the meta-batch, the call): support
step ``k`` of task ``t`` uses stream ``2k`` of task ``t``, its query pass
after ``k`` steps stream ``2k + 1``, so no two calls share a mask, and the
same seed state gives the same masks (``keras.utils.set_random_seed`` or a
layer's ``seed=`` makes runs reproducible). The task-batched path gives
each task its own seeds (:func:`task_states`) and draws the same masks.
The outer backward pass differentiates through the masks its forward pass
drew. A meta-step
advances the seed state once (:func:`next_seed`), so the next meta-step
draws fresh masks; ``MAML.adapt`` and evaluation never advance it, so they
are repeatable.

Step sizes (:class:`StepSizes`): a fixed alpha, or meta-learned ones
(one scalar, one per parameter as Meta-SGD, one per weight tensor and inner
step as MAML++); an explicit ``inner_lr`` overrides them with one fixed
value. Steps beyond the learned per-step sizes reuse the last one.
"""

import dataclasses
import warnings
from typing import Callable, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from maml_tf.core import functional
from maml_tf.core import keras_compat

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
INNER_LR_MODES = (None, "scalar", "per_parameter", "per_layer_per_step")


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


_TASK_STRIDE = 1_000_003
_SEED_MODULUS = 2 ** 31 - 1
DRAWS_PER_CALL = 64      # seed counters a forward call may use up


def offset_task_seeds(state, seed_mask: Sequence[bool], tasks) -> list:
  """``state`` with each RNG seed moved ``tasks`` task streams on.

  Linear in ``tasks``, so offsetting by ``a`` and then by ``b`` equals
  offsetting by ``a + b``: a chunk of a meta-batch (or a replica's share of
  it) offset by the index of its first task draws exactly what those tasks
  draw in the whole batch.

  Arguments:
    state: the non-trainable state (seeds are ``[2]`` integer tensors, or
      ``[T, 2]``: one per task).
    seed_mask: one bool per entry of ``state``: is it a seed?
    tasks: an int or a scalar integer tensor (or, for ``[T, 2]`` seeds, a
      ``[T]`` vector: one offset per task).
  """
  if not any(seed_mask):
    return list(state)
  out = list(state)
  for i, is_seed in enumerate(seed_mask):
    if is_seed:
      s = tf.convert_to_tensor(state[i])
      key = tf.math.floormod(
          s[..., 0] + tf.cast(tasks, s.dtype) * _TASK_STRIDE, _SEED_MODULUS)
      out[i] = tf.stack([key, s[..., 1]], axis=-1)
  return out


def task_states(state, seed_mask: Sequence[bool], num_tasks) -> list:
  """``state`` with a leading task axis: task ``t``'s entry is ``state``
  with its seeds offset ``t`` task streams on (:func:`offset_task_seeds`),
  so the task-batched path draws what task ``t`` draws on its own.

  Arguments:
    state: the non-trainable state, shared by the tasks.
    seed_mask: one bool per entry of ``state``: is it a seed?
    num_tasks: an int or a scalar integer tensor.
  """
  out = [tile_tasks(v, num_tasks) for v in state]
  if not seed_mask or not any(seed_mask):
    return out
  for i, is_seed in enumerate(seed_mask):
    if is_seed:
      tiled = out[i]
      tasks = tf.range(tf.shape(tiled, out_type=tiled.dtype)[0])
      out[i] = offset_task_seeds([tiled], [True], tasks)[0]
  return out


def call_seeds(state, seed_mask: Sequence[bool], stream) -> list:
  """``state`` with each seed set to the stream one forward call draws from.

  ``stream`` (int or scalar tensor): ``2k`` for support step ``k``,
  ``2k + 1`` for the query pass after ``k`` steps.
  """
  if not seed_mask or not any(seed_mask):
    return list(state)
  out = list(state)
  for i, is_seed in enumerate(seed_mask):
    if is_seed:
      s = tf.convert_to_tensor(state[i])
      key = tf.math.floormod(s[..., 0] * 7919 + tf.cast(stream, s.dtype) + 1,
                             _SEED_MODULUS)
      out[i] = tf.stack([key, s[..., 1] * DRAWS_PER_CALL], axis=-1)
  return out


def next_seed(seed: tf.Tensor) -> tf.Tensor:
  """The seed state of the next meta-step."""
  return seed + tf.constant([0, 1], seed.dtype)


def _dense(grad):
  """Embedding gradients come as IndexedSlices; a fast weight is dense."""
  if isinstance(grad, tf.IndexedSlices):
    return tf.convert_to_tensor(grad)
  return grad


def _keep_seeds(new_state, state, seed_mask) -> list:
  if not seed_mask:
    return list(new_state)
  return [old if m else new for new, old, m in zip(new_state, state, seed_mask)]


def _unscaled(grads, loss_scale):
  """Gradients of a scaled loss divided by the scale; all NaN where any
  overflowed (as a ``LossScaleOptimizer`` reads an overflowed step)."""
  grads = [None if g is None else g / tf.cast(loss_scale, g.dtype)
           for g in grads]
  present = [g for g in grads if g is not None]
  if not present:
    return grads
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g))
                          for g in present])
  return [None if g is None else tf.where(
      finite, g, tf.constant(np.nan, g.dtype)) for g in grads]


def adapt_params(model: keras.Model, loss_fn: LossFn, params, state, x, y,
                 inner_lr, steps, first_order: bool = False,
                 on_step: Optional[Callable[[int, list, list], None]] = None,
                 adapt_mask: Optional[Sequence[bool]] = None,
                 forward: Optional[Callable] = None,
                 recompute: bool = False,
                 seed_mask: Optional[Sequence[bool]] = None,
                 loss_scale=None):
  """Runs ``steps`` inner gradient steps from ``params`` on ``(x, y)`` (pure).

  Arguments:
    model: the Keras model, used only as a function (never written).
    loss_fn: ``(y_true, y_pred) -> scalar``.
    params: starting weights, ordered as ``model.trainable_variables``.
    state: non-trainable state, ordered as ``model.non_trainable_variables``.
    x, y: the support set of one task.
    inner_lr: step size: a scalar, one per parameter, or a function
      ``step -> either`` (per-step step sizes, MAML++).
    steps: number of gradient steps, >= 0: a Python int (the steps are
      unrolled) or a scalar integer tensor (a ``tf.while_loop``; then
      ``on_step`` and ``recompute`` are not available).
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
    seed_mask: one bool per entry of ``state``, ``True`` for RNG seeds:
      step ``k`` draws from :func:`call_seeds` stream ``2k`` and the seeds
      come back unchanged (see the module docstring).
    loss_scale: a scalar (or ``None``) the support loss is multiplied by
      before its gradient, which is divided by it again: keeps float16
      gradients from underflowing (mixed precision). A step whose scaled
      gradients overflow makes every gradient NaN, so that the adapted
      weights, the query loss and the meta-gradients are NaN and a
      ``LossScaleOptimizer`` skips the update and lowers its scale (a
      saturating activation would otherwise hide the overflow).

  Returns:
    ``(fast_params, state)``.

  Example:
    >>> params, state = functional.read_weights(model)
    >>> fast, state = adapt_params(model, mse, params, state, x, y, 0.01, 1)
  """
  if forward is None:
    forward = lambda p, s, x: functional.functional_call(model, p, s, x, True)
  mask = list(adapt_mask) if adapt_mask is not None else [True] * len(params)
  lr_at = inner_lr if callable(inner_lr) else (lambda step: inner_lr)

  def step_fn(fast, state, lr, step):
    watched = [f for f, m in zip(fast, mask) if m]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(watched)
      pred, new_state = forward(fast, call_seeds(state, seed_mask, 2 * step), x)
      loss = loss_fn(y, pred)
      if loss_scale is not None:
        loss = loss * tf.cast(loss_scale, loss.dtype)
    grads = iter(tape.gradient(
        loss, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO))
    grads = [_dense(next(grads)) if m else None for m in mask]
    if loss_scale is not None:
      grads = _unscaled(grads, loss_scale)
    if first_order:
      grads = [None if g is None else tf.stop_gradient(g) for g in grads]
    return inner_update(fast, grads, lr), _keep_seeds(new_state, state,
                                                      seed_mask)

  fast, state = list(params), list(state)
  if not isinstance(steps, (int, np.integer)):
    if on_step is not None or recompute:
      raise ValueError("adapt_params with a tensor number of steps takes "
                       "neither on_step nor recompute")

    def body(i, fast, state):
      fast, state = step_fn(list(fast), list(state), lr_at(i), i)
      return i + 1, fast, state
    _, fast, state = tf.while_loop(
        lambda i, *_: i < tf.cast(steps, tf.int32), body,
        (tf.constant(0), fast, state))
    return list(fast), list(state)
  for step in range(int(steps)):
    if recompute:
      fast, state = _recomputed_step(
          lambda f, s, l, step=step: step_fn(f, s, l, step), fast, state,
          lr_at(step))
    else:
      fast, state = step_fn(fast, state, lr_at(step), step)
    if on_step is not None:
      on_step(step + 1, fast, state)
  return fast, state


def _recomputed_step(step_fn, fast, state, lr):
  """``step_fn`` with gradient checkpointing: keeps only its inputs alive.

  The backward pass recomputes the step (forward, inner gradient) under a
  tape and differentiates it there, so the second-order terms are exact
  while the step's activations are freed after the forward pass. Step sizes
  are passed as arguments so that learned ones still get gradients.
  Non-float state (RNG seeds) stays outside the checkpoint; the step keeps
  its seeds as they are (each step draws from its own stream).
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
  # Identities make every input local to the current graph: inside a
  # tf.map_fn body, weights the step passes through unchanged (ANIL's
  # body) would otherwise come back as tensors of the outer graph, which
  # tf.custom_gradient refuses.
  out = checkpointed(*[tf.identity(v) for v in
                       (*fast, *[state[i] for i in floats], *lrs)])
  new_state = list(state)
  for i, value in zip(floats, out[n:]):
    new_state[i] = value
  return list(out[:n]), new_state


@dataclasses.dataclass(frozen=True)
class StepSizes:
  """The inner step-size rule of a learner.

  Arguments:
    mode: ``None`` (fixed ``inner_lr``), ``"scalar"``, ``"per_parameter"``
      or ``"per_layer_per_step"`` (learned, see :class:`maml_tf.MAML`).
    inner_lr: the fixed step size (the initial value of learned ones).
    inner_steps: inner steps during meta-training (the length of the
      per-step step sizes).
  """
  mode: Optional[str]
  inner_lr: float
  inner_steps: int

  def variables(self, model: keras.Model) -> list:
    """The learned step sizes as new variables at ``inner_lr`` (or ``[]``)."""
    params = model.trainable_variables
    shapes = {None: [], "scalar": [()],
              "per_parameter": [tuple(v.shape) for v in params],
              "per_layer_per_step": [(self.inner_steps,)] * len(params)
              }[self.mode]
    return [keras.Variable(np.full(shape, self.inner_lr),
                           dtype=params[0].dtype, name=f"inner_lr_{i}")
            for i, shape in enumerate(shapes)]

  def schedule(self, lrs: Sequence[tf.Tensor] = (), inner_lr=None):
    """``step -> step size(s)``: the learned ``lrs``, unless ``inner_lr``.

    ``step`` may be a Python int or an integer tensor.
    """
    if inner_lr is not None or self.mode is None or not lrs:
      value = self.inner_lr if inner_lr is None else inner_lr
      return lambda step: value
    if self.mode == "scalar":
      return lambda step: lrs[0]
    if self.mode == "per_parameter":
      return lambda step: list(lrs)
    last = self.inner_steps - 1

    def per_step(step):
      if isinstance(step, (int, np.integer)):
        return [lr[min(int(step), last)] for lr in lrs]
      index = tf.minimum(tf.cast(step, tf.int32), last)
      return [tf.gather(lr, index) for lr in lrs]
    return per_step


@dataclasses.dataclass(frozen=True)
class InnerLoop:
  """What a learner's adaptation is: model, support loss, mask, step sizes.

  Arguments:
    model: the Keras model (used as a function only).
    loss_fn: ``(y_true, y_pred) -> scalar`` on one task's support set.
    adapt_mask: one bool per trainable variable (``False``: kept at theta).
    step_sizes: the step-size rule.
    seed_mask: one bool per non-trainable variable, ``True`` for the seeds
      of random layers (empty: none).
    loss_scale: ``() -> scalar`` or ``None``: the support loss scale
      (mixed float16 with a ``LossScaleOptimizer``).
  """
  model: keras.Model
  loss_fn: LossFn
  adapt_mask: Tuple[bool, ...]
  step_sizes: StepSizes
  seed_mask: Tuple[bool, ...] = ()
  loss_scale: Optional[Callable[[], tf.Tensor]] = None

  def adapt(self, params, state, x, y, steps, lrs=(), inner_lr=None,
            first_order: bool = False, on_step=None, forward=None,
            recompute: bool = False, loss_fn: Optional[LossFn] = None):
    """:func:`adapt_params` with this learner's mask and step sizes.

    Arguments:
      params, state: theta and the non-trainable state.
      x, y: the support set (with a task axis when ``forward`` is batched).
      steps: inner steps (int or scalar integer tensor).
      lrs: the learned step sizes' current values (empty when fixed).
      inner_lr: a fixed step size overriding the learner's (fixed or
        learned) ones.
      first_order, on_step, forward, recompute: as :func:`adapt_params`.
      loss_fn: replaces the support loss (the batched path sums per-task
        losses).
    """
    return adapt_params(self.model, loss_fn or self.loss_fn, params, state,
                        x, y, self.step_sizes.schedule(lrs, inner_lr), steps,
                        first_order, on_step=on_step,
                        adapt_mask=self.adapt_mask, forward=forward,
                        recompute=recompute, seed_mask=self.seed_mask,
                        loss_scale=(None if self.loss_scale is None
                                    else self.loss_scale()))

  def query_state(self, state, step) -> list:
    """The state a query pass after ``step`` inner steps runs with."""
    return call_seeds(state, self.seed_mask, 2 * step + 1)


def support_statistics(model: keras.Model, params, state, x) -> list:
  """``state`` with every BatchNorm's moving statistics set to ``x``'s.

  The batch statistics of ``x`` under weights ``params`` (exact moments);
  other state passes through ``model.stateless_call`` unchanged. What an
  adapted model predicts with in inference mode.
  """
  layers = [l for l in keras_compat.flatten_layers(model)
            if isinstance(l, keras.layers.BatchNormalization)]
  if not layers:
    return list(state)
  saved = [l.momentum for l in layers]
  try:
    for l in layers:
      l.momentum = 0.0
    _, new_state = functional.functional_call(model, params, state, x, True)
  finally:
    for l, m in zip(layers, saved):
      l.momentum = m
  return new_state


def head_layer(model: keras.layers.Layer) -> keras.layers.Layer:
  """The last layer with trainable weights that ``model``'s call runs (in a
  nested model or a user's block, its own head): from the layer graph,
  traced from ``call`` for a subclassed model (whose layers Keras lists in
  creation order). Where the call cannot be traced, the last layer
  created, with a warning naming it."""
  graph = keras_compat.functional_graph(model)
  if graph is None and not isinstance(model, keras.Sequential):
    graph = _traced_call(model)
  if graph is None:
    layers = [l for l in keras_compat.flatten_layers(model)
              if l.trainable_weights and not isinstance(l, keras.Model)]
    if not layers:
      raise ValueError(f"model {model.name!r} has no trainable weights")
    if not isinstance(model, keras.Sequential):   # (calls them in order)
      warnings.warn(
          f"maml_tf: adapt='head' takes {layers[-1].name!r}, the last layer "
          f"of {model.name!r} created: its call could not be traced to find "
          "the last one called; pass adapt=[layer names] to choose")
    return layers[-1]
  for node in reversed(list(keras_compat.graph_nodes(graph))):
    layer = node.operation
    if isinstance(layer, keras.layers.Layer) and layer.trainable_weights:
      # A model or a user's block of weighted layers: its own head (the
      # block itself where its sublayers hold none of its weights).
      block = isinstance(layer, keras.Model) or (
          not type(layer).__module__.startswith("keras.")
          and any(l.trainable_weights
                  for l in keras_compat.flatten_layers(layer)))
      if block:
        try:
          return head_layer(layer)
        except ValueError:
          return layer
      return layer
  raise ValueError(f"model {model.name!r} has no trainable weights")


def _traced_call(model):
  """``model.call`` as a functional model, or ``None``."""
  try:
    return functional.traced_call(model, False)
  except Exception:  # pylint: disable=broad-except
    return None


def adapt_mask(model: keras.Model, adapt) -> Tuple[bool, ...]:
  """One bool per trainable variable: does the inner loop adapt it?

  Arguments:
    model: the meta-model.
    adapt: ``"all"``, ``"head"`` (the last layer with weights that the
      call runs: :func:`head_layer`), a list of layer names, or a
      predicate ``f(variable) -> bool``.

  Raises:
    ValueError: an unknown form, unknown layer names, or nothing selected.
  """
  variables = model.trainable_variables
  if isinstance(adapt, str) and adapt == "all":
    return (True,) * len(variables)
  layers = keras_compat.flatten_layers(model)
  if isinstance(adapt, str) and adapt == "head":
    head = {id(v) for v in head_layer(model).trainable_weights}
    mask = [id(v) in head for v in variables]
  elif callable(adapt):
    mask = [bool(adapt(v)) for v in variables]
  elif isinstance(adapt, (list, tuple)):
    names = set(adapt)
    by_name = {l.name: l for l in layers}
    missing = names - set(by_name)
    if missing:
      raise ValueError(f"adapt names layers that model {model.name!r} does not "
                       f"have: {sorted(missing)}; it has {sorted(by_name)}")
    chosen = {id(v) for n in names for v in by_name[n].trainable_weights}
    mask = [id(v) in chosen for v in variables]
  else:
    raise ValueError("adapt must be 'all', 'head', a list of layer names or a "
                     f"predicate, got {adapt!r}")
  if not any(mask):
    raise ValueError(f"adapt={adapt!r} selects no trainable variable of "
                     f"model {model.name!r}")
  return tuple(mask)


# ------------------------------------------------------------- task axes
def tile_tasks(v, num_tasks):
  """``v`` repeated along a new leading task axis.

  ``expand_dims``, not ``v[None]``, whose gradient is a StridedSliceGrad.
  """
  return tf.tile(tf.expand_dims(v, 0), [num_tasks] + [1] * v.shape.rank)


def split_tasks(t, num_chunks: int, chunk: int):
  """``[T, ...] -> [num_chunks, chunk, ...]``."""
  return tf.reshape(t, [num_chunks, chunk] + t.shape[1:].as_list())


def merge_chunks(t):
  """``[num_chunks, chunk, ...] -> [T, ...]`` (undoes :func:`split_tasks`)."""
  return tf.reshape(t, [-1] + t.shape[2:].as_list())
