"""A SavedModel that carries MAML's inner loop: adaptation without Python.

``export_adaptable(maml, path, support_x, support_y)`` writes a SavedModel of
the *meta-learned* model together with its adaptation procedure, so a serving
system adapts to a new task's K examples with TensorFlow alone (no maml_tf,
no Keras model code). Signatures:

``adapt_and_predict(support_x, support_y, query_x)``
    predictions on ``query_x`` of the model adapted on the support set, with
    the number of steps and the step size baked in at export time.
``adapt_and_predict_with(support_x, support_y, query_x, steps, inner_lr)``
    the same with both given as inputs (``steps`` a scalar int32; the
    ``inner_lr`` input is one fixed step size, replacing learned ones).
``adapt(support_x, support_y)``
    the adapted weights: a dict ``{variable path: tensor}``.
``predict(x)``
    the meta-model itself (no adaptation), inference mode.

The adaptation is the learner's own :attr:`maml_tf.MAML.inner_loop` (its
adapt mask, fixed or learned step sizes, per-step step sizes), so the
results equal ``MAML.adapt(support_x, support_y)`` followed by
``adapted(query_x, training=False)`` for every member of the family: the
inner loop uses batch statistics, and BatchNorm layers then predict with the
support set's statistics under the adapted weights (see ``MAML.adapt``).

Example:
  >>> export_adaptable(maml, "/tmp/adaptable", support_x, support_y)
  >>> m = tf.saved_model.load("/tmp/adaptable")          # any TF process
  >>> m.adapt_and_predict(sx, sy, qx)
"""

from typing import Optional

import keras
import tensorflow as tf

from maml_tf.core import functional
from maml_tf.core import inner_loop
from maml_tf.core import keras_compat
from maml_tf.export import saved_model


class _Adaptable(tf.Module):
  """The tracked object: meta-parameters, learned step sizes, adaptation."""

  def __init__(self, maml, steps: int, inner_lr: Optional[float]):
    super().__init__(name="maml_adaptable")
    self.model = maml.model
    # Tracked here too: Keras does not hand every non-trainable variable to
    # TF's tracking (random layers' seed states), and the inner loop reads
    # them all.
    self.model_state = [keras_compat.tf_variable(v)
                        for v in maml.model.non_trainable_variables]
    self.inner_lr_variables = list(maml.inner_lr_variables)
    self.loop = maml.inner_loop
    dtype = maml.model.trainable_variables[0].dtype
    self.default_steps = tf.constant(int(steps), tf.int32)
    self.fixed_inner_lr = (None if inner_lr is None
                           else tf.constant(float(inner_lr), dtype))
    self.paths = [v.path for v in maml.model.trainable_variables]

  def adapted(self, sx, sy, steps, inner_lr):
    """``(fast weights, state)``: adapted as ``MAML.adapt`` does.

    ``inner_lr`` ``None``: the learner's own step sizes. ``state`` is the
    meta-model's (the inner loop's running statistics are not kept).
    """
    params, state = functional.read_weights(self.model)
    lrs = [tf.convert_to_tensor(v) for v in self.inner_lr_variables]
    if inner_lr is not None:
      inner_lr = tf.cast(inner_lr, params[0].dtype)
    fast, _ = self.loop.adapt(params, state, sx, sy, steps, lrs,
                              inner_lr=inner_lr)
    return fast, state

  def predict_adapted(self, sx, sy, qx, steps, inner_lr):
    fast, state = self.adapted(sx, sy, steps, inner_lr)
    support_state = inner_loop.support_statistics(self.model, fast, state, sx)
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
    inner_lr: baked-in fixed step size; default the learner's own (its
      fixed ``inner_lr``, or its learned step sizes).

  Returns:
    ``path``.
  """
  if not hasattr(maml, "inner_loop"):
    raise TypeError(
        "export_adaptable takes the learner (a maml_tf.MAML), got a "
        f"{type(maml).__name__}"
        + ("; export_adapted(model, path) exports an adapted keras.Model"
           if isinstance(maml, keras.Model) else ""))
  steps = maml.inner_steps if steps is None else int(steps)
  if tf.nest.is_nested(support_x):
    raise ValueError(
        "export_adaptable takes models of one input tensor; support_x is a "
        f"{type(support_x).__name__}. Adapt in Python and export the adapted "
        "model with export_adapted, which keeps the input structure")
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
    return module.predict_adapted(support_x, support_y, query_x,
                                  module.default_steps, module.fixed_inner_lr)

  @tf.function(input_signature=[x_spec, y_spec, x_spec,
                                tf.TensorSpec((), tf.int32),
                                tf.TensorSpec((), tf.float32)])
  def adapt_and_predict_with(support_x, support_y, query_x, steps, inner_lr):
    return module.predict_adapted(support_x, support_y, query_x, steps,
                                  inner_lr)

  @tf.function(input_signature=[x_spec, y_spec])
  def adapt(support_x, support_y):
    fast, _ = module.adapted(support_x, support_y, module.default_steps,
                             module.fixed_inner_lr)
    return dict(zip(module.paths, fast))

  @tf.function(input_signature=[x_spec])
  def predict(x):
    return module.model(x, training=False)

  saved_model.check_portable(adapt_and_predict.get_concrete_function(),
                             f"model {maml.model.name!r}")
  module.adapt_and_predict = adapt_and_predict
  module.adapt_and_predict_with = adapt_and_predict_with
  module.adapt = adapt
  module.predict = predict
  tf.saved_model.save(module, path, signatures={
      "adapt_and_predict": adapt_and_predict,
      "adapt": adapt,
      "serving_default": adapt_and_predict})
  return path
