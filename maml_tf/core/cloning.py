"""Adapted models as new Keras models (the meta-model is never written)."""

import keras

from maml_tf.core import functional
from maml_tf.core import inner_loop
from maml_tf.core import keras_compat


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
  params, state = functional.read_weights(model)
  new_state = inner_loop.support_statistics(model, params, state, x)
  bn = {id(v) for l in keras_compat.flatten_layers(model)
        if isinstance(l, keras.layers.BatchNormalization)
        for v in (l.moving_mean, l.moving_variance)}
  for var, value in zip(model.non_trainable_variables, new_state):
    if id(var) in bn:
      var.assign(value)
  return model
