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
