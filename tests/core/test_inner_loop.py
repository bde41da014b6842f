"""The one adaptation: adapt_params, step sizes, masks, support statistics."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf.core import functional
from maml_tf.core.inner_loop import (InnerLoop, StepSizes, adapt_mask,
                                     adapt_params, support_statistics)


def _model():
  keras.utils.set_random_seed(0)
  return keras.Sequential([
      keras.Input((3,)), keras.layers.Dense(5, activation="tanh"),
      keras.layers.BatchNormalization(), keras.layers.Dense(2, name="head")])


def _data():
  rng = np.random.default_rng(0)
  return (tf.constant(rng.normal(size=(6, 3)), tf.float32),
          tf.constant(rng.normal(size=(6, 2)), tf.float32))


def _mse(y, pred):
  return tf.reduce_mean(tf.square(y - pred))


@pytest.mark.parametrize("mode", [None, "scalar", "per_parameter",
                                  "per_layer_per_step"])
def test_a_tensor_number_of_steps_equals_the_unrolled_loop(mode):
  """The while-loop form (the adaptable SavedModel's) equals the unrolled
  one for every step-size rule, past the learned per-step sizes too."""
  model = _model()
  x, y = _data()
  params, state = functional.read_weights(model)
  sizes = StepSizes(mode, 0.1, inner_steps=2)
  rng = np.random.default_rng(1)
  lrs = {None: [], "scalar": [tf.constant(0.07)],
         "per_parameter": [tf.constant(rng.uniform(0.01, 0.2, p.shape),
                                       tf.float32) for p in params],
         "per_layer_per_step": [tf.constant([0.05, 0.15]) for _ in params]
         }[mode]
  loop = InnerLoop(model, _mse, (True, True, False, False, True, True), sizes)
  unrolled, _ = loop.adapt(params, state, x, y, 3, lrs)
  looped, _ = tf.function(
      lambda n: loop.adapt(params, state, x, y, n, lrs))(tf.constant(3))
  for a, b in zip(unrolled, looped):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
  # Masked weights (BatchNorm's gamma/beta here) stay at theta.
  for i in (2, 3):
    np.testing.assert_array_equal(unrolled[i].numpy(), params[i].numpy())
  assert not np.allclose(unrolled[0].numpy(), params[0].numpy())
  with pytest.raises(ValueError, match="tensor number of steps"):
    adapt_params(model, _mse, params, state, x, y, 0.1, tf.constant(1),
                 on_step=lambda *a: None)


def test_step_sizes_schedule():
  lrs = [tf.constant([1.0, 2.0])]
  per_step = StepSizes("per_layer_per_step", 0.5, 2).schedule(lrs)
  assert [float(per_step(s)[0]) for s in (0, 1, 5)] == [1.0, 2.0, 2.0]
  assert float(per_step(tf.constant(7))[0]) == 2.0
  assert StepSizes("per_layer_per_step", 0.5, 2).schedule(lrs, 0.3)(0) == 0.3
  assert StepSizes(None, 0.5, 2).schedule()(4) == 0.5


def test_adapt_mask_forms():
  model = _model()
  assert adapt_mask(model, "all") == (True,) * 6
  assert adapt_mask(model, "head") == (False,) * 4 + (True, True)
  assert adapt_mask(model, ["head"]) == adapt_mask(model, "head")
  assert adapt_mask(model, lambda v: "kernel" in v.path) == (
      True, False, False, False, True, False)
  with pytest.raises(ValueError, match="does not have"):
    adapt_mask(model, ["nope"])
  with pytest.raises(ValueError, match="selects no trainable"):
    adapt_mask(model, lambda v: False)
  with pytest.raises(ValueError, match="adapt must be"):
    adapt_mask(model, 3)


class _HeadFirst(keras.Model):
  """Subclassed, its classifier created first and called last."""

  def __init__(self):
    super().__init__()
    self.classifier = keras.layers.Dense(5, name="classifier")
    self.backbone = [keras.layers.Dense(8, activation="relu")
                     for _ in range(2)]

  def call(self, x):
    for layer in self.backbone:
      x = layer(x)
    return self.classifier(x)


def test_the_head_is_the_last_layer_called_not_the_last_created():
  model = _HeadFirst()
  model(np.zeros((1, 3), "f4"))
  head = {id(v) for v in model.classifier.trainable_weights}
  assert adapt_mask(model, "head") == tuple(
      id(v) in head for v in model.trainable_variables)
  # A nested model as the last layer: its own head.
  inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
                            keras.layers.Dense(2, name="inner_head")])
  outer = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), inner])
  assert adapt_mask(outer, "head") == adapt_mask(outer, ["inner_head"])
  # A Sequential built without an Input: its layers in order, no warning.
  bare = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(2)])
  bare.build((None, 3))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert adapt_mask(bare, "head") == (False, False, True, True)
  # A user's layer whose weights are its own (its sublayer holds none).
  x = keras.Input((3,))
  model = keras.Model(x, _ScaledOut(2, name="scaled")(
      keras.layers.Dense(4)(x)))
  assert adapt_mask(model, "head") == adapt_mask(model, ["scaled"])


class _ScaledOut(keras.layers.Layer):

  def __init__(self, units, **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.act = keras.layers.Activation("tanh")

  def build(self, shape):
    self.w = self.add_weight(shape=(shape[-1], self.units))

  def call(self, x):
    return self.act(keras.ops.matmul(x, self.w))


def test_support_statistics_are_the_batch_moments_and_leave_momentum():
  model = _model()
  x, _ = _data()
  params, state = functional.read_weights(model)
  new = support_statistics(model, params, state, x)
  h = model.layers[0](x)
  np.testing.assert_allclose(new[0].numpy(), tf.reduce_mean(h, 0).numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new[1].numpy(),
                             tf.math.reduce_variance(h, 0).numpy(),
                             rtol=1e-4, atol=1e-6)
  assert model.layers[1].momentum == 0.99
  # The model's own variables are never written.
  np.testing.assert_array_equal(model.non_trainable_variables[0].numpy(),
                                np.zeros(5, "f4"))


# ------------------------------------------------------------ random layers
def _dropout_learner(**kwargs):
  from maml_tf import MAML  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(5)
  model = keras.Sequential([
      keras.Input((3,)), keras.layers.Dense(16, activation="tanh"),
      keras.layers.Dropout(0.5), keras.layers.Dense(1)])
  return MAML(model, "mse", inner_lr=0.1, inner_steps=2,
              meta_optimizer=keras.optimizers.SGD(0.05), **kwargs)


def _same_task(tasks):
  from maml_tf import TaskBatch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  one = [rng.normal(size=(1, n, d)).astype("float32")
         for n, d in ((5, 3), (5, 1), (7, 3), (7, 1))]
  return TaskBatch(*(np.repeat(t, tasks, axis=0) for t in one))


def _grads(maml, batch, **kwargs):
  batch = maml.prepare(batch)
  result = maml.compute_gradients(batch, maml.plan(batch), **kwargs)
  return np.concatenate([g.numpy().ravel() for g in result.grads])


@pytest.mark.parametrize("execution", ["batched", "map_fn"])
def test_dropout_draws_per_task_and_chunks_draw_what_the_batch_draws(
    execution):
  vectorize = {"batched": "auto", "map_fn": False}[execution]
  maml = _dropout_learner(vectorize=vectorize)
  assert maml.plan(_same_task(4)).execution == execution
  # Four copies of one task: with one mask for all they would give the
  # one-task gradient; per-task masks give another.
  one, four = _grads(maml, _same_task(1)), _grads(maml, _same_task(4))
  assert np.abs(one - four).max() > 1e-3
  # Copy 0 of a batch draws what a one-task batch draws.
  np.testing.assert_allclose(_grads(maml, _same_task(1)), one, atol=0)
  # Task chunks (and replicas: first_task) draw exactly the whole batch's.
  chunked = _dropout_learner(task_chunk=2, vectorize=vectorize)
  assert chunked.plan(_same_task(4)).task_chunk == 2
  np.testing.assert_allclose(_grads(chunked, _same_task(4)), four, atol=1e-6)
  halves = [_grads(maml, _same_task(2), first_task=f) for f in (0, 2)]
  np.testing.assert_allclose((halves[0] + halves[1]) / 2, four, atol=1e-6)
  # The task-batched path draws the per-task path's masks.
  per_task = _dropout_learner(vectorize=False)
  np.testing.assert_allclose(_grads(per_task, _same_task(4)), four, atol=1e-6)


def test_dropout_runs_are_reproducible_and_steps_draw_fresh_masks():
  runs = []
  for _ in range(2):
    maml = _dropout_learner()
    seed = [v for v, kind in zip(maml.model.non_trainable_variables,
                                 maml.state_kinds) if kind == "seed"]
    assert len(seed) == 1
    start = seed[0].numpy().copy()
    repeat = [float(maml.meta_loss(_same_task(3))) for _ in range(2)]
    assert repeat[0] == repeat[1]       # evaluation never advances seeds
    runs.append([maml.train_step(_same_task(3))["loss_after"]
                 for _ in range(3)])
    np.testing.assert_array_equal(seed[0].numpy() - start, [0, 3])
  assert runs[0] == runs[1]             # the same seed, the same run
  assert len(set(runs[0])) == 3         # each step draws new masks
