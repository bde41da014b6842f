"""A SavedModel that carries MAML's inner loop: adaptation without Python.

``export_adaptable(maml, path, support_x, support_y)`` writes a SavedModel of
the *meta-learned* model together with its adaptation procedure, so a serving
system adapts to a new task's K examples with TensorFlow alone (no maml_tf,
no Keras model code). Signatures:

``adapt_and_predict(support_x, support_y, query_x)``
    predictions on ``query_x`` of the model adapted on the support set, with
    the number of steps and the step size baked in at export time.
``adapt_and_predict_with(support_x, support_y, query_x, steps, inner_lr)``
    the same with both given as inputs (``steps`` a scalar int32).
``adapt(support_x, support_y)``
    the adapted weights: a dict ``{variable path: tensor}``.
``predict(x)``
    the meta-model itself (no adaptation), inference mode.

The results equal ``MAML.adapt(support_x, support_y)`` followed by
``adapted(query_x, training=False)``: the inner loop uses batch statistics,
and BatchNorm layers then predict with the support set's statistics under
the adapted weights (see ``MAML.adapt``).

Example:
  >>> export_adaptable(maml, "/tmp/adaptable", support_x, support_y)
  >>> m = tf.saved_model.load("/tmp/adaptable")          # any TF process
  >>> m.adapt_and_predict(sx, sy, qx)
"""

import contextlib
from typing import Optional

import keras
import tensorflow as tf

from maml_tf.core import functional


@contextlib.contextmanager
def _batchnorm_momentum_zero(model: keras.Model):
  """While tracing: BatchNorm's "moving" statistics become the batch's."""
  layers = [l for l in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
            if isinstance(l, keras.layers.BatchNormalization)]
  saved = [l.momentum for l in layers]
  for l in layers:
    l.momentum = 0.0
  try:
    yield
  finally:
    for l, m in zip(layers, saved):
      l.momentum = m


class _Adaptable(tf.Module):
  """The tracked object: meta-parameters plus the adaptation functions."""

  def __init__(self, maml, steps: int, inner_lr: float):
    super().__init__(name="maml_adaptable")
    self.model = maml.model
    self._loss_fn = maml.loss_fn
    self.default_steps = tf.constant(int(steps), tf.int32)
    self.default_inner_lr = tf.constant(float(inner_lr),
                                        maml.model.trainable_variables[0].dtype)
    self._paths = [v.path for v in maml.model.trainable_variables]

  def _adapt(self, sx, sy, steps, inner_lr):
    params, state = functional.read_weights(self.model)
    lr = tf.cast(inner_lr, params[0].dtype)

    def body(i, fast):
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(fast)
        pred, _ = functional.functional_call(self.model, fast, state, sx, True)
        loss = self._loss_fn(sy, pred)
      grads = tape.gradient(loss, fast,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
      return i + 1, [p - lr * g for p, g in zip(fast, grads)]

    _, fast = tf.while_loop(lambda i, _: i < steps, body,
                            (tf.constant(0), params))
    return fast, state

  def _predict_adapted(self, sx, sy, qx, steps, inner_lr):
    fast, state = self._adapt(sx, sy, steps, inner_lr)
    with _batchnorm_momentum_zero(self.model):
      _, support_state = functional.functional_call(self.model, fast, state,
                                                    sx, True)
    # Keep non-BatchNorm state (frozen weights) as it was; take BN statistics.
    out, _ = functional.functional_call(self.model, fast, support_state, qx,
                                        False)
    return out


def export_adaptable(maml, path: str, support_x, support_y,
                     steps: Optional[int] = None,
                     inner_lr: Optional[float] = None) -> str:
  """Writes a SavedModel that adapts and predicts (see the module docstring).

  Arguments:
    maml: a :class:`maml_tf.MAML` (its model holds the meta-parameters).
    path: output folder.
    support_x, support_y: an example support set; fixes the dtypes and the
      per-example shapes (the number of examples stays free).
    steps: baked-in number of inner steps; default ``maml.inner_steps``.
    inner_lr: baked-in step size; default ``maml.inner_lr``.

  Returns:
    ``path``.
  """
  steps = maml.inner_steps if steps is None else int(steps)
  inner_lr = maml.inner_lr if inner_lr is None else float(inner_lr)
  sx = tf.convert_to_tensor(support_x)
  sy = tf.convert_to_tensor(support_y)
  dtype = maml.model.trainable_variables[0].dtype
  x_spec = tf.TensorSpec((None,) + tuple(sx.shape[1:]),
                         dtype if sx.dtype.is_floating else sx.dtype)
  y_spec = tf.TensorSpec((None,) + tuple(sy.shape[1:]),
                         dtype if sy.dtype.is_floating else sy.dtype)
  module = _Adaptable(maml, steps, inner_lr)

  @tf.function(input_signature=[x_spec, y_spec, x_spec])
  def adapt_and_predict(support_x, support_y, query_x):
    return module._predict_adapted(support_x, support_y, query_x,  # pylint: disable=protected-access
                                   module.default_steps,
                                   module.default_inner_lr)

  @tf.function(input_signature=[x_spec, y_spec, x_spec,
                                tf.TensorSpec((), tf.int32),
                                tf.TensorSpec((), tf.float32)])
  def adapt_and_predict_with(support_x, support_y, query_x, steps, inner_lr):
    return module._predict_adapted(support_x, support_y, query_x, steps,  # pylint: disable=protected-access
                                   inner_lr)

  @tf.function(input_signature=[x_spec, y_spec])
  def adapt(support_x, support_y):
    fast, _ = module._adapt(support_x, support_y, module.default_steps,  # pylint: disable=protected-access
                            module.default_inner_lr)
    return dict(zip(module._paths, fast))  # pylint: disable=protected-access

  @tf.function(input_signature=[x_spec])
  def predict(x):
    return module.model(x, training=False)

  module.adapt_and_predict = adapt_and_predict
  module.adapt_and_predict_with = adapt_and_predict_with
  module.adapt = adapt
  module.predict = predict
  tf.saved_model.save(module, path, signatures={
      "adapt_and_predict": adapt_and_predict,
      "adapt": adapt,
      "serving_default": adapt_and_predict})
  return path
