"""Task-batched Conv2D kernels against tf.nn.conv2d, task by task."""

import numpy as np
import pytest
import tensorflow as tf

from maml_tf.core.fast_weights import kernels

T = 3
CONV_IMPLS = ("patches", "grouped", "map")


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (7, 3, 2, "same"), (7, 3, 2, "valid"), (8, 3, 2, "same"),
    (6, 2, 1, "same"), (5, 4, 3, "same"), (5, 1, 2, "valid"),
    (5, 1, 2, "same")])
@pytest.mark.parametrize("impl", CONV_IMPLS + ("slices",))
def test_conv_kernels_match_tf(size, kernel, stride, padding, impl):
  rng = np.random.default_rng(3)
  x = tf.constant(rng.normal(size=(T, 2, size, size, 3)))
  w = tf.constant(rng.normal(size=(T, kernel, kernel, 3, 4)))
  fn = {"patches": kernels.conv2d_patches,
        "grouped": kernels.conv2d_grouped,
        "map": kernels.conv2d_map,
        "slices": kernels.conv2d_slices}[impl]
  y = fn(x, w, (stride, stride), padding)
  ref = tf.stack([tf.nn.conv2d(x[t], w[t], stride, padding.upper())
                  for t in range(T)])
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels", [1, 3])
def test_shallow_patches_by_one_hot_convolution_equal_extract_patches(
    channels, monkeypatch):
  """Patches at most ONE_HOT_PATCH_DEPTH deep come from a one-hot
  convolution: the same values and first and second derivatives as
  tf.image.extract_patches (float64)."""
  assert 9 * channels <= kernels.ONE_HOT_PATCH_DEPTH
  rng = np.random.default_rng(4)
  x = tf.constant(rng.normal(size=(T, 2, 9, 9, channels)))
  w = tf.constant(rng.normal(size=(T, 3, 3, channels, 5)))
  v = tf.constant(rng.normal(size=(T, 2, 5, 5, 5)))

  def derivatives():
    with tf.GradientTape() as outer:
      outer.watch([x, w])
      with tf.GradientTape() as inner:
        inner.watch([x, w])
        y = kernels.conv2d_patches(x, w, (2, 2), "same")
        loss = tf.reduce_sum(tf.tanh(y) * v)
      gx, gw = inner.gradient(loss, [x, w])
      second = tf.reduce_sum(gx ** 2) + tf.reduce_sum(gw ** 2)
    return [y, gx, gw] + outer.gradient(second, [x, w])
  one_hot = derivatives()
  monkeypatch.setattr(kernels, "ONE_HOT_PATCH_DEPTH", 0)
  extracted = derivatives()
  np.testing.assert_array_equal(one_hot[0], extracted[0])
  for a, b in zip(one_hot[1:], extracted[1:]):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
