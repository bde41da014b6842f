"""Losses and metrics of the inner and outer loops.

* :func:`as_loss_fn`: a Keras loss (object or name) or a callable as a
  ``(y_true, y_pred) -> scalar`` function (the mean over the examples).
* :func:`per_task_loss_fn`: the ``[T]`` losses of a whole meta-batch in one
  op, for Keras' per-example losses; ``None`` for any other loss (the
  learner then maps the scalar loss over tasks).
* :func:`sparse_accuracy` / :func:`sparse_accuracy_per_task`: argmax
  accuracy against integer labels.
* :func:`multi_step_loss_weights` and :func:`meta_objective`: the
  meta-objective from the query losses after each recorded inner step
  (MAML++'s annealed multi-step loss, else the last step's loss).
"""

import functools
from typing import Callable, Optional, Tuple

import keras
import tensorflow as tf

from maml_tf.core import keras_compat

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def as_loss_fn(loss) -> LossFn:
  """``(y_true, y_pred) -> scalar``: the loss's mean over the examples.

  Raises:
    TypeError: ``loss`` is neither a Keras loss name, a Keras loss nor a
      callable.
  """
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


def task_axis_mean(values):
  """``[T, ...] -> [T]``: the mean over every axis but the first."""
  return tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))


def _class_labels(y_true, y_pred):
  """Integer labels as int64, a trailing axis of 1 (``[N, 1]``, as Keras'
  sparse losses allow) dropped."""
  y_true = tf.cast(y_true, tf.int64)
  if y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == 1:
    y_true = tf.squeeze(y_true, -1)
  return y_true


def correct(y_true, y_pred):
  """1.0 where the argmax prediction equals the integer label, else 0.0
  (NaN where the prediction holds a NaN).

  Labels may carry a trailing axis of 1 (``[N, 1]``), as Keras' sparse
  losses allow.
  """
  pred = tf.argmax(y_pred, axis=-1, output_type=tf.int64)
  hit = tf.cast(tf.equal(pred, _class_labels(y_true, y_pred)), tf.float32)
  # An output holding a NaN scores NaN, not a hit or miss of the argmax
  # that TensorFlow picks among NaNs.
  nan = tf.reduce_any(tf.math.is_nan(y_pred), axis=-1)
  return tf.where(nan, tf.constant(float("nan"), tf.float32), hit)


def sparse_accuracy(y_true, y_pred):
  """Fraction of argmax predictions equal to integer labels."""
  return tf.reduce_mean(correct(y_true, y_pred))


def sparse_accuracy_per_task(y_true, y_pred, ignore_class=None):
  """:func:`sparse_accuracy` of each task: ``[T, N]`` labels -> ``[T]``.

  With ``ignore_class`` (a sparse loss's), labels equal to it are left out
  of each task's fraction, as the loss leaves them out; a task with no other
  label scores NaN.
  """
  hit = correct(y_true, y_pred)
  if ignore_class is None:
    return task_axis_mean(hit)
  keep = tf.not_equal(_class_labels(y_true, y_pred),
                      tf.cast(ignore_class, tf.int64))
  axes = list(range(1, hit.shape.rank))
  hits = tf.reduce_sum(tf.where(keep, hit, 0.0), axis=axes)
  return hits / tf.reduce_sum(tf.cast(keep, tf.float32), axis=axes)


def ignore_class_of(loss) -> Optional[int]:
  """The label ``loss`` leaves out (Keras' sparse losses' ``ignore_class``):
  read from a ``Loss`` object, a ``LossFunctionWrapper``'s function
  arguments or a ``functools.partial``; ``None`` where there is none."""
  value = getattr(loss, "ignore_class", None)
  if value is None and isinstance(loss, keras.losses.Loss):
    parts = keras_compat.loss_function_parts(loss)
    value = parts[1].get("ignore_class") if parts else None
  if value is None and isinstance(loss, functools.partial):
    value = loss.keywords.get("ignore_class")
  return value


def task_accuracy(ignore_class=None) -> Callable:
  """``(y [T, N], pred) -> [T]``: :func:`sparse_accuracy_per_task` with the
  loss's ``ignore_class``."""
  return lambda y, pred: sparse_accuracy_per_task(y, pred, ignore_class)


# Keras loss functions whose value is the mean of per-example terms.
PER_EXAMPLE_LOSSES = frozenset(
    getattr(keras.losses, name) for name in (
        "mean_squared_error", "mean_absolute_error",
        "mean_absolute_percentage_error", "mean_squared_logarithmic_error",
        "sparse_categorical_crossentropy", "categorical_crossentropy",
        "binary_crossentropy", "huber", "log_cosh", "hinge",
        "squared_hinge", "kl_divergence", "poisson")
    if hasattr(keras.losses, name))


def per_task_loss_fn(loss) -> Optional[Callable]:
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
    parts = keras_compat.loss_function_parts(loss)
    if (parts is None or parts[0] not in PER_EXAMPLE_LOSSES
        or loss.reduction != "sum_over_batch_size"
        # ignored labels are masked, and the mean is over the others
        or ignore_class_of(loss) is not None):
      return None
    cast = lambda t: keras.ops.convert_to_tensor(t, dtype=loss.dtype)
    return lambda y, pred: task_axis_mean(loss.call(cast(y), cast(pred)))
  # By identity: a user's callable need not be hashable.
  if any(loss is fn for fn in PER_EXAMPLE_LOSSES):
    return lambda y, pred: task_axis_mean(loss(y, pred))
  return None


# Keras losses whose labels are targets or 0/1 values, never class indices.
_NOT_CLASS_INDICES = frozenset((
    "mean_squared_error", "mean_absolute_error",
    "mean_absolute_percentage_error", "mean_squared_logarithmic_error",
    "binary_crossentropy", "binary_focal_crossentropy", "huber", "log_cosh",
    "hinge", "squared_hinge", "poisson", "cosine_similarity",
    "kl_divergence", "categorical_hinge", "mse", "mae", "mape", "msle"))


def scores_classes(loss, num_classes) -> bool:
  """Can integer labels be scored by argmax under ``loss``? Not for a
  model with one output unit (``num_classes`` 1), nor Keras' regression and
  binary losses (names and aliases, functions or ``Loss`` objects). (A
  loss's ``ignore_class`` labels are left out of the score:
  :func:`sparse_accuracy_per_task`.)"""
  if num_classes == 1:
    return False
  if isinstance(loss, str):
    try:
      loss = keras.losses.get(loss)       # Keras' aliases: "MSE", "bce"
    except ValueError:
      return True
  fn = getattr(loss, "fn", loss)     # a Keras Loss object's function
  return getattr(fn, "__name__", "") not in _NOT_CLASS_INDICES


def takes_class_indices(loss) -> bool:
  """Is ``loss`` Keras' sparse categorical cross-entropy (integer labels)?"""
  if isinstance(loss, str):
    return loss in ("sparse_categorical_crossentropy",
                    "SparseCategoricalCrossentropy")
  if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
    return True
  return loss is keras.losses.sparse_categorical_crossentropy


# Keras' cross-entropies: they take probabilities unless from_logits=True.
_CROSS_ENTROPIES = ("sparse_categorical_crossentropy",
                    "categorical_crossentropy", "binary_crossentropy",
                    "categorical_focal_crossentropy",
                    "binary_focal_crossentropy")
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


def _cross_entropy(loss) -> Optional[Tuple[str, bool]]:
  """``(name, from_logits)`` if ``loss`` is one of Keras' cross-entropies,
  else None."""
  if isinstance(loss, str):
    fn = keras.losses.get(loss)
    return ((loss, False) if getattr(fn, "__name__", "") in _CROSS_ENTROPIES
            else None)
  if getattr(loss, "__name__", None) in _CROSS_ENTROPIES:
    return loss.__name__, False          # a Keras loss function
  parts = (keras_compat.loss_function_parts(loss)
           if isinstance(loss, keras.losses.Loss) else None)
  if parts is not None and getattr(parts[0], "__name__", "") in (
      _CROSS_ENTROPIES):
    return type(loss).__name__, bool(parts[1].get("from_logits", False))
  return None


def _output_activation(model) -> Optional[Tuple[str, str]]:
  """``(layer name, activation name)`` of a Sequential or functional
  model's last layer (nested models followed); None where the layers do not
  say (a subclassed model, a layer without an activation)."""
  try:
    if not model.outputs or len(model.outputs) != 1:
      return None
  except (AttributeError, ValueError):      # subclassed: no layer graph
    return None
  layer = model.layers[-1]
  if isinstance(layer, keras.Model):
    return _output_activation(layer)
  if isinstance(layer, keras.layers.Softmax):
    return layer.name, "softmax"
  activation = getattr(layer, "activation", None)
  name = activation if isinstance(activation, str) else getattr(
      activation, "__name__", None)
  return (layer.name, name) if name else None


def logits_mismatch(loss, model) -> Optional[str]:
  """Why ``loss`` looks wrong for ``model``'s outputs, else None.

  A Keras cross-entropy on probabilities (its default,
  ``from_logits=False``, e.g. ``"sparse_categorical_crossentropy"``) on a
  model whose last layer has no softmax or sigmoid (logits) trains on
  clipped nonsense without an error; one with ``from_logits=True`` on a
  softmax or sigmoid output squashes twice. The message names the loss,
  the layer and the fix.
  """
  found = _cross_entropy(loss)
  output = _output_activation(model) if found else None
  if output is None:
    return None
  (name, from_logits), (layer, activation) = found, output
  probabilities = activation in _PROBABILITY_ACTIVATIONS
  if not from_logits and not probabilities:
    return (f"maml_tf: the loss {name} takes probabilities "
            f"(from_logits=False), but the model's last layer {layer!r} has "
            f"activation {activation!r}: its outputs are logits. Use e.g. "
            "keras.losses.SparseCategoricalCrossentropy(from_logits=True), "
            "or end the model in a softmax")
  if from_logits and probabilities:
    return (f"maml_tf: the loss {name} takes logits (from_logits=True), but "
            f"the model's last layer {layer!r} ends in {activation!r}: its "
            "outputs are probabilities. Drop that activation, or use "
            "from_logits=False")
  return None


def check_class_labels(name: str, labels, num_classes,
                       ignore_class: Optional[int] = None,
                       what: str = "TaskBatch.") -> None:
  """Raises ``ValueError`` naming ``name`` unless its labels are class indices.

  Float labels are refused (a sparse loss would silently truncate them);
  eager integer labels must lie in ``[0, num_classes)`` when
  ``num_classes`` is known, or equal ``ignore_class`` (the loss's, which
  Keras leaves out). Symbolic labels are checked for dtype only. ``what``
  prefixes ``name`` in the message.
  """
  what = what if what.endswith(".") else what + " "
  dtype = tf.as_dtype(labels.dtype)
  if not dtype.is_integer:
    raise ValueError(
        f"{what}{name} is {dtype.name}, but the loss takes integer class "
        "indices (sparse categorical cross-entropy): cast the labels to "
        "int32, or use CategoricalCrossentropy for one-hot or soft labels")
  if not num_classes or not tf.executing_eagerly() or not hasattr(
      labels, "numpy"):
    return
  values = labels.numpy()
  if ignore_class is not None:
    values = values[values != ignore_class]
  if values.size and (values.min() < 0 or values.max() >= num_classes):
    raise ValueError(
        f"{what}{name} holds labels {int(values.min())}..{int(values.max())}"
        f", outside the model's {num_classes} outputs (0..{num_classes - 1})"
        + (f" (ignore_class {ignore_class} aside)"
           if ignore_class is not None else ""))


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


def meta_objective(losses, scored_before: bool, weights=None):
  """The meta-loss from per-task query losses ``[T, S]``.

  Arguments:
    losses: query losses after each recorded step count.
    scored_before: the first column is step 0 (a metric, never weighted).
    weights: ``[S']`` multi-step weights over the remaining columns, or
      ``None``: the last column's mean (plain MAML).
  """
  if weights is None:
    return tf.reduce_mean(losses[:, -1])
  per_step = tf.reduce_mean(losses[:, 1 if scored_before else 0:], axis=0)
  return tf.reduce_sum(tf.cast(weights, per_step.dtype) * per_step)
