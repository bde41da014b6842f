"""The meta-objective: weight regularizers on the meta-parameters."""

import keras
import numpy as np
import pytest

from maml_tf import MAML, PlanWarning
from maml_tf.tasks import sinusoid


def _model(regularizer=None, activity=None):
  keras.utils.set_random_seed(0)
  return keras.Sequential([
      keras.Input((1,)),
      keras.layers.Dense(8, activation="tanh", name="hidden",
                         kernel_regularizer=regularizer,
                         activity_regularizer=activity),
      keras.layers.Dense(1)])


def test_weight_regularizers_are_added_on_the_meta_parameters():
  """One SGD meta-step with an L2 kernel regularizer moves the kernel by
  the plain meta-step plus the penalty's gradient, ``2 * l2 * theta``."""
  batch = sinusoid.sample_batch(4, 5, 5, np.random.default_rng(3))[0]
  lr, l2 = 0.1, 0.05
  after = {}
  for name, regularizer in (("plain", None), ("l2", keras.regularizers.L2(l2))):
    maml = MAML(_model(regularizer), "mse", inner_lr=0.05,
                meta_optimizer=keras.optimizers.SGD(lr))
    before = [w.copy() for w in maml.model.get_weights()]
    maml.train_step(batch)
    after[name] = maml.model.get_weights()
  kernel = before[0]
  np.testing.assert_allclose(after["l2"][0],
                             after["plain"][0] - lr * 2 * l2 * kernel,
                             rtol=1e-5, atol=1e-6)
  for a, b in zip(after["l2"][1:], after["plain"][1:]):   # no regularizer
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_activity_regularizers_are_named_as_left_out():
  with pytest.warns(PlanWarning, match=r"activity regularizers of "
                    r"\['hidden'\] are not part of the meta-objective"):
    MAML(_model(activity=keras.regularizers.L2(0.1)), "mse", inner_lr=0.05)


def test_meta_loss_includes_the_penalty_and_a_constant_one_is_harmless():
  batch = sinusoid.sample_batch(4, 5, 5, np.random.default_rng(3))[0]
  l2 = 0.05
  plain = MAML(_model(), "mse", inner_lr=0.05)
  penalized = MAML(_model(keras.regularizers.L2(l2)), "mse", inner_lr=0.05)
  kernel = penalized.model.get_weights()[0]
  np.testing.assert_allclose(
      float(penalized.meta_loss(batch)) - float(plain.meta_loss(batch)),
      l2 * np.sum(kernel ** 2), rtol=1e-4)
  # A regularizer of zero weight (L1L2's defaults) has no gradient.
  zero = MAML(_model(keras.regularizers.L1L2()), "mse", inner_lr=0.05)
  assert np.isfinite(zero.train_step(batch)["loss_after"])



class _AddsLoss(keras.layers.Layer):
  """A custom layer that adds a penalty with ``add_loss``."""

  def call(self, x):
    self.add_loss(0.1 * keras.ops.sum(x ** 2))
    return x


class _SubclassedAddsLoss(keras.Model):

  def __init__(self):
    super().__init__()
    self.hidden = keras.layers.Dense(8, activation="tanh")
    self.penalty = _AddsLoss()
    self.out = keras.layers.Dense(1)

  def build(self, shape):
    # Built without a symbolic call, which add_loss would refuse (Keras
    # then leaves its name scope open for every later model).
    self.hidden.build(shape)
    self.out.build(tuple(shape[:-1]) + (8,))

  def call(self, x):       # no `training`: functional_call's other branch
    return self.out(self.penalty(self.hidden(x)))


class _PenalizesItsKernel(keras.layers.Layer):
  """A block whose call penalizes its sublayer's kernel with ``add_loss``:
  traceable on symbolic inputs, so it reached the task-batched path."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.dense = keras.layers.Dense(8, activation="tanh")

  def call(self, x):
    y = self.dense(x)
    self.add_loss(0.1 * keras.ops.sum(self.dense.kernel ** 2))
    return y


def _functional_penalizes_kernel():
  inp = keras.Input((1,))
  return keras.Model(inp, keras.layers.Dense(1)(_PenalizesItsKernel()(inp)))


def _functional_adds_loss():
  inp = keras.Input((1,))
  h = _AddsLoss()(keras.layers.Dense(8, activation="tanh")(inp))
  return keras.Model(inp, keras.layers.Dense(1)(h))


def _subclassed_adds_loss():
  model = _SubclassedAddsLoss()
  model.build((None, 1))
  return model


@pytest.mark.parametrize("build", [_functional_adds_loss,
                                   _subclassed_adds_loss,
                                   _functional_penalizes_kernel])
def test_losses_added_in_call_are_named_as_left_out_once(build):
  # Before, add_loss inside a layer was dropped from the objective silently.
  batch = sinusoid.sample_batch(4, 5, 5, np.random.default_rng(3))[0]
  with pytest.warns(PlanWarning) as record:
    maml = MAML(build(), "mse", inner_lr=0.05)
    maml.train_step(batch)
    maml.train_step(batch)
  dropped = [w for w in record if "loss term" in str(w.message)]
  assert len(dropped) == 1, [str(w.message) for w in record]
  assert "not part of the meta-objective" in str(dropped[0].message)
  # Tracing the call left no stale losses on the layers.
  assert len(maml.model.losses) <= len(build().losses)


def test_weight_regularizers_alone_do_not_warn(recwarn):
  batch = sinusoid.sample_batch(4, 5, 5, np.random.default_rng(3))[0]
  model = keras.Sequential([keras.Input((1,)), _WithRegularizedWeight(),
                            keras.layers.Dense(1)])
  MAML(model, "mse", inner_lr=0.05).train_step(batch)
  assert not [w for w in recwarn if "loss term" in str(w.message)]


class _WithRegularizedWeight(keras.layers.Layer):
  """A custom layer (per-task path) with a regularized weight."""

  def build(self, shape):
    self.kernel = self.add_weight(shape=(shape[-1], 4),
                                  regularizer=keras.regularizers.L2(0.01))

  def call(self, x):
    return keras.ops.tanh(x @ self.kernel)


def test_an_activity_regularizer_and_an_add_loss_are_both_named():
  # Before, the activity regularizer's warning hid the add_loss one.
  batch = sinusoid.sample_batch(4, 5, 5, np.random.default_rng(3))[0]
  inp = keras.Input((1,))
  h = keras.layers.Dense(8, activation="tanh", name="reg",
                         activity_regularizer=keras.regularizers.L2(0.1))(inp)
  model = keras.Model(inp, keras.layers.Dense(1)(_AddsLoss()(h)))
  with pytest.warns(PlanWarning) as record:
    MAML(model, "mse", inner_lr=0.05).train_step(batch)
  messages = [str(w.message) for w in record]
  assert any("activity regularizers of ['reg']" in m for m in messages)
  assert any("2 loss term(s)" in m for m in messages), messages

