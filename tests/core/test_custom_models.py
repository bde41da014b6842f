"""Functional (skip connection) and subclassed models meta-train and adapt."""

import keras
import numpy as np
import pytest

from maml_tf import MAML
from maml_tf.tasks import sinusoid


def _skip_model():
  x = keras.Input((1,))
  h = keras.layers.Dense(32, activation="relu")(x)
  h2 = keras.layers.Dense(32, activation="relu")(h)
  h = keras.layers.Add()([h, h2])
  return keras.Model(x, keras.layers.Dense(1)(h), name="skip")


class Residual(keras.Model):
  """A subclassed model with a residual connection."""

  def __init__(self, width=32, **kwargs):
    super().__init__(**kwargs)
    self.width = width
    self.inp = keras.layers.Dense(width, activation="relu")
    self.hidden = keras.layers.Dense(width, activation="relu")
    self.out = keras.layers.Dense(1)

  def call(self, x, training=False):
    h = self.inp(x)
    return self.out(h + self.hidden(h))

  def get_config(self):
    return {**super().get_config(), "width": self.width}


def _subclassed():
  model = Residual()
  model(np.zeros((1, 1), np.float32))
  return model


@pytest.mark.parametrize("build", [_skip_model, _subclassed],
                         ids=["functional_skip", "subclassed"])
def test_model_meta_trains_and_adapts(build):
  keras.utils.set_random_seed(0)
  maml = MAML(build(), "mse", inner_lr=0.01)
  test = sinusoid.sample_batch(100, 10, 20, np.random.default_rng(99))[0]
  start = maml.evaluate(test, steps=(1,))["loss"][0]
  for i in range(600):
    maml.train_step_tensors(sinusoid.sample_batch(
        25, 10, 10, np.random.default_rng([1, i]))[0])
  end = maml.evaluate(test, steps=(1,))["loss"][0]
  assert end < 0.6 * start, (start, end)
  adapted = maml.adapt(test.support_x[0], test.support_y[0], steps=5)
  assert type(adapted) is type(maml.model)
  assert not np.allclose(adapted.get_weights()[0], maml.model.get_weights()[0])
