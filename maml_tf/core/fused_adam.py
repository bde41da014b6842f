"""A fused Adam update for the outer step: one kernel per variable.

Keras 3's Adam in the TF backend applies each variable's update as about
fifteen small ops (casts, powers, square roots, three assignments). On small
models, whose meta-step is a few hundred small ops, that is a large share of
the step. TensorFlow's
``ResourceApplyAdam`` kernel computes exactly Keras' update::

    alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    m += (g - m) * (1 - beta_1)
    v += (g^2 - v) * (1 - beta_2)
    theta -= alpha * m / (sqrt(v) + epsilon)

in one op per variable, on the optimizer's own slot variables, so the
optimizer object, its checkpoints and its ``iterations`` stay Keras'.

:func:`fused_adam_update` returns ``None`` (use the Keras optimizer as is)
for anything but a plain ``keras.optimizers.Adam``: AMSGrad, weight decay,
gradient clipping, EMA, gradient accumulation, loss scaling, variable
constraints, non-float32 variables, or a ``tf.distribute`` strategy.

Example:
  >>> update = fused_adam_update(optimizer, variables)
  >>> if update is None:
  ...   optimizer.apply_gradients(zip(grads, variables))
  ... else:
  ...   update(grads)
"""

from typing import Callable, List, Optional, Sequence

import keras
import tensorflow as tf

from maml_tf.core import keras_compat


def fused_adam_update(optimizer: keras.optimizers.Optimizer,
                      variables: Sequence) -> Optional[Callable[[List[tf.Tensor]], None]]:
  """``grads -> None`` applying Keras Adam fused, or ``None`` if it cannot.

  Arguments:
    optimizer: the meta-optimizer, already built on ``variables``.
    variables: the Keras variables it updates, in gradient order.

  Returns:
    A function of the gradient list (traceable in ``tf.function``) that
    updates ``variables`` and the optimizer's slots and iteration counter
    exactly as ``optimizer.apply_gradients`` would, or ``None``. Outside
    any ``tf.distribute`` strategy only: under one, call the optimizer
    (it all-reduces the gradients).
  """
  if type(optimizer) is not keras.optimizers.Adam:  # pylint: disable=unidiomatic-typecheck
    return None
  if (optimizer.amsgrad or optimizer.weight_decay or optimizer.clipnorm
      or optimizer.clipvalue or optimizer.global_clipnorm or optimizer.use_ema
      or optimizer.gradient_accumulation_steps
      or optimizer.loss_scale_factor is not None or not optimizer.built):
    return None
  if any(v.dtype != "float32" or v.constraint is not None
         for v in variables):
    return None
  slots = keras_compat.adam_slots(optimizer, variables)
  if slots is None:
    return None

  handle = lambda variable: keras_compat.tf_variable(variable).handle

  def update(grads):
    t = tf.cast(optimizer.iterations + 1, tf.float32)
    lr = tf.cast(optimizer.learning_rate, tf.float32)
    beta_1 = tf.constant(optimizer.beta_1, tf.float32)
    beta_2 = tf.constant(optimizer.beta_2, tf.float32)
    beta_1_power, beta_2_power = tf.pow(beta_1, t), tf.pow(beta_2, t)
    epsilon = tf.constant(optimizer.epsilon, tf.float32)
    for g, v, (m, s) in zip(grads, variables, slots):
      tf.raw_ops.ResourceApplyAdam(
          var=handle(v), m=handle(m), v=handle(s), beta1_power=beta_1_power,
          beta2_power=beta_2_power, lr=lr, beta1=beta_1, beta2=beta_2,
          epsilon=epsilon, grad=tf.cast(g, tf.float32))
    optimizer.iterations.assign_add(1)
  return update
