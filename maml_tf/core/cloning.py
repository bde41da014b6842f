"""Adapted models as new Keras models (the meta-model is never written)."""

import keras
import numpy as np
import tensorflow as tf

from maml_tf.core import functional
from maml_tf.core import inner_loop
from maml_tf.core import keras_compat


class AdaptedModel(keras.Model):
  """Adapted weights, run through another model's architecture.

  What :meth:`maml_tf.MAML.adapt` returns for a model that Keras cannot
  clone (a subclassed model without ``get_config``): it holds its own
  copies of the adapted weights and state as variables and calls the
  meta-model as a pure function of them
  (:func:`maml_tf.core.functional.functional_call`), so the meta-model's
  variables are never read or written. It exports like any Keras model.

  Arguments:
    base: the meta-model (its architecture).
    params, state: the adapted weights, in the order of
      ``base.trainable_variables`` / ``base.non_trainable_variables``.
  """

  def __init__(self, base: keras.Model, params, state, **kwargs):
    super().__init__(name=kwargs.pop("name", f"{base.name}_adapted"),
                     **kwargs)
    # A function, not the model: Keras would track the base's variables.
    self._forward = lambda p, s, x, training: functional.functional_call(
        base, p, s, x, training)
    self.example_input_shape = example_input_shape(base)
    self.adapted_params = [
        self._weight(v, value, True) for v, value in
        zip(base.trainable_variables, params)]
    self.adapted_state = [
        self._weight(v, value, False) for v, value in
        zip(base.non_trainable_variables, state)]
    self.built = True

  def _weight(self, like, value, trainable: bool):
    weight = self.add_weight(shape=tuple(like.shape), dtype=like.dtype,
                             initializer="zeros", trainable=trainable,
                             name=like.name)
    weight.assign(value)
    return weight

  def call(self, x, training=None):
    out, new_state = self._forward(
        [v.value for v in self.adapted_params],
        [v.value for v in self.adapted_state], x, bool(training))
    if training:
      for variable, value in zip(self.adapted_state, new_state):
        variable.assign(value)
    return out


def example_input_shape(model: keras.Model):
  """The per-batch input shape ``model`` was built on, or ``None``."""
  inputs = getattr(model, "inputs", None)
  if inputs:
    return tuple(inputs[0].shape)
  shape = getattr(model, "example_input_shape", None)
  return shape if shape is not None else keras_compat.build_input_shape(model)


def clone_with_weights(model: keras.Model, params, state,
                       check_x=None) -> keras.Model:
  """A new model of ``model``'s architecture holding ``params`` and ``state``.

  A clone through ``get_config`` where Keras makes one of the same
  variables (shapes, dtypes, trainable or not, in order) that computes
  what ``model`` computes with them on ``check_x`` (in inference mode;
  where given); else an :class:`AdaptedModel`. (A subclassed model whose
  layers were frozen, replaced or created in ``build`` after ``__init__``
  clones into another architecture.)
  """
  try:
    clone = keras.models.clone_model(model)
    if not clone.built:
      clone.build(model.inputs[0].shape if getattr(model, "inputs", None)
                  else example_input_shape(model))
  except Exception:  # pylint: disable=broad-except
    return AdaptedModel(model, params, state)
  if not (_same_variables(clone.trainable_variables, params)
          and _same_variables(clone.non_trainable_variables, state)):
    return AdaptedModel(model, params, state)
  for var, value in zip(clone.trainable_variables, params):
    var.assign(value)
  for var, value in zip(clone.non_trainable_variables, state):
    var.assign(value)
  if check_x is not None and not _computes_the_same(clone, model, params,
                                                    state, check_x):
    return AdaptedModel(model, params, state)
  return clone


def _same_variables(variables, values) -> bool:
  return len(variables) == len(values) and all(
      tuple(v.shape) == tuple(x.shape)
      and tf.as_dtype(v.dtype) == tf.as_dtype(x.dtype)
      for v, x in zip(variables, values))


def _computes_the_same(clone, model, params, state, x) -> bool:
  try:
    got = clone(x, training=False)
  except Exception:  # pylint: disable=broad-except
    return False
  want, _ = functional.functional_call(model, params, state, x, False)
  got, want = tf.nest.flatten(got), tf.nest.flatten(want)
  if len(got) != len(want):
    return False
  for a, b in zip(got, want):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-3,
                                             atol=1e-3 * scale,
                                             equal_nan=True):
      return False
  return True


def refresh_batchnorm_statistics(model: keras.Model, x) -> keras.Model:
  """Sets every BatchNorm layer's moving statistics to those of batch ``x``."""
  params, state = functional.read_weights(model)
  new_state = inner_loop.support_statistics(model, params, state, x)
  bn = {id(v) for l in keras_compat.flatten_layers(model)
        if isinstance(l, keras.layers.BatchNormalization)
        for v in (l.moving_mean, l.moving_variance)}
  for var, value in zip(model.non_trainable_variables, new_state):
    if id(var) in bn:
      var.assign(value)
  return model
