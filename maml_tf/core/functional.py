"""Functional evaluation of any Keras 3 model with explicit weights.

MAML needs the model as a pure function ``f(params, state, x)`` so that the
inner loop can evaluate it at fast weights ``theta'`` without touching the
model's variables. Keras 3 offers exactly that as ``model.stateless_call``;
this module wraps it and fixes one trap of the TensorFlow backend:

Keras computes the moments of BatchNormalization and LayerNormalization with
``tf.nn.moments``, which subtracts a ``stop_gradient(mean)`` when computing the
variance. The first derivative is unaffected (its missing term is zero), but
the *second* derivative is wrong: the Hessian of the variance loses its
``-11^T/n`` term. MAML differentiates the inner gradient, so every call made
through :func:`functional_call` swaps in exact moments while it traces.
``tests/core/test_meta_gradients.py`` checks this against finite differences.
"""

import contextlib
import threading
import warnings
from typing import Sequence, Tuple

import keras
import tensorflow as tf

_PATCH_LOCK = threading.RLock()


def _exact_moments(x, axes, keepdims=False):
  """Mean and (biased) variance with exact first and second derivatives."""
  mean = tf.reduce_mean(x, axis=axes, keepdims=True)
  variance = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
  if not keepdims:
    mean = tf.squeeze(mean, axis=axes)
    variance = tf.squeeze(variance, axis=axes)
  return mean, variance


@contextlib.contextmanager
def exact_moments():
  """Within this context Keras' TF backend computes moments exactly.

  Example:
    >>> with exact_moments():
    ...   y = keras.layers.LayerNormalization()(tf.ones((2, 3)))
  """
  try:
    from keras.src.backend.tensorflow import nn as tf_nn  # pylint: disable=g-import-not-at-top
    original = tf_nn._compute_moments  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # pragma: no cover - other Keras versions
    warnings.warn(
        "maml_tf could not patch Keras' moments; second-order meta-gradients "
        "through BatchNormalization/LayerNormalization may be inexact with "
        f"Keras {keras.__version__}.")
    yield
    return
  with _PATCH_LOCK:
    tf_nn._compute_moments = _exact_moments  # pylint: disable=protected-access
    try:
      yield
    finally:
      tf_nn._compute_moments = original  # pylint: disable=protected-access


def functional_call(model: keras.Model,
                    params: Sequence[tf.Tensor],
                    state: Sequence[tf.Tensor],
                    x,
                    training: bool = True) -> Tuple[tf.Tensor, list]:
  """Runs ``model`` on ``x`` with weights ``params`` and state ``state``.

  Arguments:
    model: a built Keras 3 model.
    params: tensors in the order of ``model.trainable_variables``.
    state: tensors in the order of ``model.non_trainable_variables``
      (BatchNorm moving statistics, frozen layers' weights, RNG seeds).
    x: the input batch.
    training: forwarded to the layers (``True`` uses batch statistics).

  Returns:
    ``(outputs, new_state)``. The model's own variables are never written.

  Example:
    >>> params = [v.value for v in model.trainable_variables]
    >>> state = [v.value for v in model.non_trainable_variables]
    >>> y, state = functional_call(model, params, state, x)
  """
  with exact_moments():
    outputs, new_state = model.stateless_call(
        list(params), list(state), x, training=training)
  return outputs, list(new_state)


def read_weights(model: keras.Model):
  """Current ``(params, state)`` tensors of ``model`` (reads are taped)."""
  params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
  state = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
  return params, state


def ensure_built(model: keras.Model) -> keras.Model:
  """Raises a clear error when ``model`` has no weights yet."""
  if not isinstance(model, keras.Model):
    raise TypeError(
        f"maml_tf needs a keras.Model (Sequential, functional or subclassed); "
        f"got {type(model).__name__}")
  if not model.built or not model.trainable_variables:
    raise ValueError(
        f"model {model.name!r} has no trainable weights yet: build it first, "
        "e.g. give Sequential an keras.Input or call model(example_batch) once")
  return model
