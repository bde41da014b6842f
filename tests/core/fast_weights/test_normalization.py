"""Written-out BatchNorm backward pass against autodiff of the formula."""

import numpy as np
import pytest
import tensorflow as tf

from maml_tf.core.fast_weights.normalization import (
    moments, normalize, normalize_with_moments)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("gamma_shape,beta_shape", [
    ((4,), (4,)), ((2, 1, 1, 1, 4), (2, 1, 1, 1, 4)), (None, (4,)),
    ((2, 1, 1, 1, 4), None), (None, None)])
def test_normalize_with_moments_derivatives(gamma_shape, beta_shape, graph):
  """Values, gradients and second derivatives equal autodiff's formula."""
  rng = np.random.default_rng(0)
  const = lambda shape: tf.constant(rng.normal(size=shape) + 1.0)
  x = const((2, 5, 3, 3, 4))
  gamma = None if gamma_shape is None else const(gamma_shape)
  beta = None if beta_shape is None else const(beta_shape)
  w, wm, wv = const(x.shape), const((2, 1, 1, 1, 4)), const((2, 1, 1, 1, 4))
  axes = [1, 2, 3]

  def reference(x, gamma, beta):
    mean, var = moments(x, axes)
    return (normalize(x, mean, var, gamma, beta, 1e-3), mean, var)

  def derivatives(normalize):
    inputs = [t for t in (x, gamma, beta) if t is not None]
    with tf.GradientTape() as outer:
      outer.watch(inputs)
      with tf.GradientTape() as inner:
        inner.watch(inputs)
        args = iter(inputs[1:])
        y, mean, var = normalize(inputs[0],
                                 next(args) if gamma is not None else None,
                                 next(args) if beta is not None else None)
        # The moments are outputs too (the moving statistics use them).
        value = (tf.reduce_sum(tf.sin(y) * w) + tf.reduce_sum(mean * wm)
                 + tf.reduce_sum(tf.square(var) * wv))
      grads = inner.gradient(value, inputs)
      # A scalar of the gradients: its gradient holds Hessian-vector products.
      second = tf.add_n([tf.reduce_sum(g * tf.cos(t)) for g, t in
                         zip(grads, inputs)])
    return [value] + grads + outer.gradient(second, inputs)

  ours = lambda: derivatives(
      lambda x, g, b: normalize_with_moments(x, g, b, 1e-3, axes))
  ours = tf.function(ours)() if graph else ours()
  expected = derivatives(reference)
  assert len(ours) == len(expected) > 1
  for a, b in zip(ours, expected):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-11)
