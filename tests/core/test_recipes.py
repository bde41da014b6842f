"""Recipes for custom architectures, each checked against finite differences.

Frozen layers, an RNN, a small Transformer block; and a layer whose second
derivative TensorFlow does not define gets a clear error, not silently wrong
gradients.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, TaskBatch

F64 = "float64"


def _frozen():
  frozen = keras.layers.Dense(6, activation="tanh", dtype=F64, name="frozen")
  frozen.trainable = False
  return keras.Sequential([keras.Input((3,), dtype=F64), frozen,
                           keras.layers.Dense(4, activation="tanh", dtype=F64),
                           keras.layers.Dense(1, dtype=F64)])


def _rnn():
  return keras.Sequential([keras.Input((4, 3), dtype=F64),
                           keras.layers.GRU(3, dtype=F64),
                           keras.layers.Dense(1, dtype=F64)])


def _transformer():
  x = keras.Input((4, 3), dtype=F64)
  attn = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2, dtype=F64)
  h = keras.layers.LayerNormalization(dtype=F64)(
      keras.layers.Add(dtype=F64)([x, attn(x, x)]))
  ff = keras.layers.Dense(3, dtype=F64)(
      keras.layers.Dense(5, activation="relu", dtype=F64)(h))
  h = keras.layers.LayerNormalization(dtype=F64)(
      keras.layers.Add(dtype=F64)([h, ff]))
  h = keras.layers.GlobalAveragePooling1D(dtype=F64)(h)
  return keras.Model(x, keras.layers.Dense(1, dtype=F64)(h), name="block")


def _batch(input_shape, seed=0, tasks=2, k=4, q=4):
  rng = np.random.default_rng(seed)
  sx = rng.normal(size=(tasks, k) + input_shape)
  qx = rng.normal(size=(tasks, q) + input_shape)
  f = lambda x: np.tanh(x.reshape(x.shape[:2] + (-1,)).sum(-1, keepdims=True))
  return TaskBatch(sx, f(sx), qx, f(qx))


def _check(maml, batch, meta_loss_fd, rtol=1e-5):
  variables = maml.model.trainable_variables
  with tf.GradientTape() as tape:
    loss = maml.meta_loss(batch)
  analytic = np.concatenate([g.numpy().ravel()
                             for g in tape.gradient(loss, variables)])
  numeric = meta_loss_fd(maml, batch, variables)
  err = np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric)
  assert err < rtol, err


@pytest.mark.parametrize("build,shape", [(_frozen, (3,)), (_rnn, (4, 3)),
                                         (_transformer, (4, 3))],
                         ids=["frozen_layer", "gru", "transformer_block"])
def test_recipe_meta_gradient_matches_finite_differences(build, shape,
                                                         meta_loss_fd):
  maml = MAML(build(), keras.losses.MeanSquaredError(dtype=F64), inner_lr=0.2,
              inner_steps=2)
  _check(maml, _batch(shape), meta_loss_fd)


def test_frozen_layer_is_left_alone_by_inner_and_outer_loop():
  maml = MAML(_frozen(), keras.losses.MeanSquaredError(dtype=F64),
              inner_lr=0.2)
  frozen = maml.model.get_layer("frozen")
  before = [w.numpy().copy() for w in frozen.weights]
  batch = _batch((3,))
  adapted = maml.adapt(batch.support_x[0], batch.support_y[0], steps=3)
  for _ in range(3):
    maml.train_step(batch)
  for a, w, c in zip(before, frozen.weights,
                     adapted.get_layer("frozen").weights):
    np.testing.assert_array_equal(a, w.numpy())
    np.testing.assert_array_equal(a, c.numpy())
  assert not np.allclose(adapted.layers[1].kernel.numpy(),
                         maml.model.layers[1].kernel.numpy())


class NearestResize(keras.layers.Layer):
  """tf.image.resize(nearest): its gradient op has no registered gradient."""

  def call(self, x):
    return tf.image.resize(x, (8, 8), method="nearest")


@pytest.mark.parametrize("layer,match", [
    (lambda: keras.layers.UpSampling2D(interpolation="bilinear"),
     "silently be zero"),                      # TF drops the terms
    (NearestResize, "cannot differentiate twice"),   # TF raises
], ids=["upsampling_bilinear", "resize_nearest"])
def test_layer_without_second_derivative_gets_a_clear_error(layer, match):
  model = keras.Sequential([
      keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3, padding="same"),
      layer(), keras.layers.Flatten(), keras.layers.Dense(1)])
  maml = MAML(model, "mse", inner_lr=0.1)
  rng = np.random.default_rng(0)
  batch = TaskBatch(rng.normal(size=(2, 3, 4, 4, 1)).astype("f4"),
                    rng.normal(size=(2, 3, 1)).astype("f4"),
                    rng.normal(size=(2, 3, 4, 4, 1)).astype("f4"),
                    rng.normal(size=(2, 3, 1)).astype("f4"))
  with pytest.raises(NotImplementedError, match=match):
    maml.train_step(batch)
  fomaml = MAML(model, "mse", inner_lr=0.1, first_order=True)
  assert np.isfinite(fomaml.train_step(batch)["loss_after"])
