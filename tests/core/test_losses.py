"""Per-task losses without a task loop equal one call per task."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf.core import losses


class _Unhashable:

  __hash__ = None        # e.g. a dataclass with eq=True

  def __call__(self, y_true, y_pred):
    return tf.reduce_mean(tf.abs(y_true - y_pred))


class _OwnCall(keras.losses.MeanSquaredError):

  def call(self, y_true, y_pred):          # not per-example: must not be used
    return super().call(y_true, y_pred) * 0 + 1.0


@pytest.mark.parametrize("loss,labels", [
    ("mse", "real"), (keras.losses.MeanSquaredError(), "real"),
    (keras.losses.Huber(), "real"), (keras.losses.mean_absolute_error, "real"),
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True), "sparse"),
    (keras.losses.CategoricalCrossentropy(from_logits=True), "onehot"),
    (keras.losses.BinaryCrossentropy(from_logits=True), "binary")])
def test_per_task_losses_without_a_task_loop(loss, labels):
  """Keras per-example losses: a mean per task equals one call per task."""
  rng = np.random.default_rng(0)
  pred = tf.constant(rng.normal(size=(3, 4, 5)), tf.float32)
  y = {"real": lambda: tf.constant(rng.normal(size=(3, 4, 5)), tf.float32),
       "sparse": lambda: tf.constant(rng.integers(0, 5, (3, 4)), tf.int32),
       "onehot": lambda: tf.one_hot(rng.integers(0, 5, (3, 4)), 5),
       "binary": lambda: tf.constant(rng.integers(0, 2, (3, 4, 5)),
                                     tf.float32)}[labels]()
  per_task = losses.per_task_loss_fn(loss)
  assert per_task is not None
  loss_fn = losses.as_loss_fn(loss)
  expected = [float(loss_fn(y[t], pred[t])) for t in range(3)]
  np.testing.assert_allclose(per_task(y, pred).numpy(), expected, rtol=1e-6)
  assert len(set(np.round(expected, 6))) == 3     # tasks differ


@pytest.mark.parametrize("loss", [
    lambda y, p: tf.reduce_mean(tf.abs(y - p)), _OwnCall(), _Unhashable(),
    keras.losses.MeanSquaredError(reduction="sum"),
    keras.losses.SparseCategoricalCrossentropy(ignore_class=0)])
def test_other_losses_keep_the_task_loop(loss):
  assert losses.per_task_loss_fn(loss) is None


def test_a_cross_entropy_that_does_not_fit_the_output_layer_is_named():
  """Keras' default from_logits=False on logits (or from_logits=True on a
  softmax) trains without an error on the wrong loss: the learner warns,
  naming the loss, the layer and the fix."""
  import warnings  # pylint: disable=g-import-not-at-top
  from maml_tf import MAML  # pylint: disable=g-import-not-at-top
  logits = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="head")])
  probs = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                            keras.layers.Softmax(name="probs")])

  def warned(model, loss):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      MAML(model, loss, inner_lr=0.1)
    return [str(w.message) for w in caught if "maml_tf: the loss" in
            str(w.message)]
  got = warned(logits, "sparse_categorical_crossentropy")
  assert len(got) == 1 and "'head'" in got[0] and "from_logits=True" in got[0]
  assert warned(logits, keras.losses.SparseCategoricalCrossentropy())
  assert not warned(logits, keras.losses.SparseCategoricalCrossentropy(
      from_logits=True))
  assert not warned(probs, "sparse_categorical_crossentropy")
  got = warned(probs, keras.losses.CategoricalCrossentropy(from_logits=True))
  assert len(got) == 1 and "'probs'" in got[0] and "probabilities" in got[0]
  assert not warned(logits, "mse")


def test_nan_outputs_score_nan_accuracy():
  # Before, the argmax of NaN logits (class 0) counted as a prediction.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from maml_tf.core import losses  # pylint: disable=g-import-not-at-top
  pred = tf.constant([[0.1, 2.0], [float("nan"), 1.0], [3.0, float("inf")]])
  got = losses.correct(tf.constant([1, 0, 1]), pred).numpy()
  assert got[0] == 1.0 and np.isnan(got[1]) and got[2] == 1.0


def test_accuracy_leaves_out_ignored_labels():
  logits = tf.constant([[[2., 0.], [0., 2.], [2., 0.], [0., 2.]],
                        [[2., 0.], [2., 0.], [2., 0.], [2., 0.]]])
  y = tf.constant([[0, 0, 9, 9], [9, 9, 9, 9]])
  got = losses.sparse_accuracy_per_task(y, logits, ignore_class=9).numpy()
  assert got[0] == 0.5 and np.isnan(got[1])   # a task of ignored labels only
  np.testing.assert_allclose(   # labels with a trailing axis of 1 likewise
      losses.task_accuracy(9)(y[..., None], logits).numpy()[0], 0.5)
  np.testing.assert_allclose(
      losses.sparse_accuracy_per_task(y, logits).numpy(), [0.25, 0.0])


def test_ignore_class_is_read_from_every_form_of_a_sparse_loss():
  import functools  # pylint: disable=g-import-not-at-top
  fn = keras.losses.sparse_categorical_crossentropy
  for loss in (keras.losses.SparseCategoricalCrossentropy(ignore_class=-1),
               functools.partial(fn, ignore_class=-1)):
    assert losses.ignore_class_of(loss) == -1, loss
  assert losses.ignore_class_of(fn) is None
  assert losses.ignore_class_of("sparse_categorical_crossentropy") is None
