"""The sinusoid task sampler."""

import numpy as np
import tensorflow as tf

from maml_tf.tasks import sinusoid


def test_batch_sampler_is_a_pure_function_of_the_iteration():
  sample = sinusoid.batch_sampler(4, 3, 2, seed=1)
  a, b, c = sample(tf.constant(7)), sample(tf.constant(7)), sample(8)
  np.testing.assert_array_equal(a.support_x, b.support_x)
  assert not np.allclose(a.support_x, c.support_x)
  assert a.support_x.shape == (4, 3, 1) and a.query_y.shape == (4, 2, 1)
  x = np.concatenate([a.support_x, a.query_x], 1)
  assert np.all(np.abs(x) <= 5.0)
  # y = A sin(x - phi) with A <= 5: amplitudes bounded, one task per row.
  y = np.concatenate([a.support_y, a.query_y], 1)
  assert np.all(np.abs(y) <= 5.0) and np.std(y) > 0.1
