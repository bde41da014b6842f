"""The speed paths give the same numbers as the plain ones.

Task chunks (per-chunk meta-gradients, averaged), the fused Adam outer step,
several meta-steps in one compiled call with in-graph sampling, and
train steps without the pre-update metrics.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, TaskBatch
from maml_tf.core import fused_adam
from maml_tf.core import maml as maml_lib
from maml_tf.models.mlp import mlp
from maml_tf.tasks import sinusoid


def _weights(model):
  return [v.numpy().copy() for v in model.weights]


@pytest.mark.parametrize("kwargs", [{}, {"learn_inner_lr": "per_parameter"},
                                    {"adapt": "head"}, {"recompute": True}])
def test_task_chunks_give_the_same_update_as_all_tasks_at_once(
    kwargs, conv_bn_f64, monkeypatch):
  """Chunks on the query side only (MAML._split_gradients) are exact."""
  split_calls = []
  real_split = MAML._split_gradients

  def spy(self, *args):
    split_calls.append(args[-1])
    return real_split(self, *args)
  monkeypatch.setattr(MAML, "_split_gradients", spy)
  batch = conv_bn_f64.batch(4, seed=3)
  runs = {}
  for chunk in (None, 1, 3):         # 3 does not divide 4: chunks of 2
    keras.utils.set_random_seed(11)
    maml = MAML(conv_bn_f64(), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, dtype="float64"), inner_lr=0.1, inner_steps=2,
                meta_optimizer=keras.optimizers.SGD(0.05), task_chunk=chunk,
                **kwargs)
    assert maml._chunk_size(maml._prepare(batch)) == {None: None, 1: 1,
                                                      3: 2}[chunk]
    metrics = [maml.train_step(batch) for _ in range(2)]
    assert maml.model.trainable_variables[0].dtype == "float64"
    runs[chunk] = (metrics, _weights(maml.model),
                   [v.numpy() for v in maml.inner_lr_variables])
  # recompute=True chunks the whole meta-gradient (less memory).
  assert set(split_calls) == (set() if kwargs.get("recompute") else {1, 2})
  ref_m, ref_w, ref_lr = runs[None]
  assert ref_m[1]["loss_after"] != pytest.approx(ref_m[0]["loss_after"])
  for chunk in (1, 3):
    m, w, lr = runs[chunk]
    for a, b in zip(m, ref_m):
      assert set(a) == set(b)
      for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), (chunk, k)
    for a, b in zip(w, ref_w):     # BatchNorm moving statistics included
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(lr, ref_lr):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def _images(tasks, n, side):
  rng = np.random.default_rng(0)
  return TaskBatch(rng.random((tasks, n, side, side, 1), dtype=np.float32),
                   np.zeros((tasks, n), np.int32),
                   rng.random((tasks, n, side, side, 1), dtype=np.float32),
                   np.zeros((tasks, n), np.int32))


def test_task_chunk_and_conv_impl_auto_follow_the_task_size():
  conv = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(2, 3),
                           keras.layers.Flatten(), keras.layers.Dense(2)])
  maml = MAML(conv, keras.losses.SparseCategoricalCrossentropy(
      from_logits=True))
  assert maml.task_chunk == "auto" and maml.execution == "batched"
  small = maml._prepare(_images(4, 5, 28))       # 10 x 784 values per task
  large = maml._prepare(_images(4, 40, 28))      # 80 x 784
  if tf.config.list_physical_devices("GPU"):
    assert maml._chunk_size(large) is None
  else:
    assert maml._chunk_size(small) is None
    assert maml._batched_model(small).conv_impl == "patches"
    assert maml._chunk_size(large) == 1
    assert maml._batched_model(large).conv_impl == "map"
  assert MAML(mlp(1, 1, hidden=(4,)), "mse")._chunk_size(
      maml._prepare(sinusoid.sample_batch(4, 5, 5,
                                          np.random.default_rng(0))[0])) is None
  for bad in (0, -2, 1.5, "all", True):
    with pytest.raises(ValueError, match="task_chunk"):
      MAML(mlp(1, 1, hidden=(4,)), "mse", task_chunk=bad)


def test_fused_adam_equals_keras_adam():
  runs = []
  for fused in (True, False):
    keras.utils.set_random_seed(2)
    maml = MAML(mlp(1, 1, hidden=(8, 8)), "mse", inner_lr=0.01,
                meta_optimizer=keras.optimizers.Adam(3e-3), closed_form=False)
    assert (maml._fused_update is not None) is True
    if not fused:
      maml._fused_update = None
    rng = np.random.default_rng(0)
    metrics = [maml.train_step(sinusoid.sample_batch(5, 4, 4, rng)[0])
               for _ in range(4)]
    runs.append((metrics, _weights(maml.model),
                 [v.numpy() for v in maml.meta_optimizer.variables]))
  (m1, w1, o1), (m2, w2, o2) = runs
  assert w1[0].shape == w2[0].shape
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(o1, o2):         # iterations, m and v slots (float32)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
  assert int(o1[0]) == 4
  assert m1[-1]["loss_after"] == pytest.approx(m2[-1]["loss_after"], rel=1e-5)


def test_fused_adam_declines_what_it_does_not_implement():
  variables = [keras.Variable(np.zeros(3, "f4"))]
  for opt in (keras.optimizers.Adam(amsgrad=True),
              keras.optimizers.Adam(clipnorm=1.0),
              keras.optimizers.Adam(weight_decay=0.1),
              keras.optimizers.AdamW(), keras.optimizers.SGD()):
    opt.build(variables)
    assert fused_adam.fused_adam_update(opt, variables) is None
  opt = keras.optimizers.Adam()
  opt.build(variables)
  assert fused_adam.fused_adam_update(opt, variables) is not None


def test_train_steps_in_one_call_equal_single_steps():
  sample = sinusoid.batch_sampler(6, 5, 5, seed=4)
  runs = []
  for loop in (True, False):
    keras.utils.set_random_seed(5)
    # Without XLA, whose random ops draw other (equally distributed) tasks
    # from the same seeds than the graph executor's.
    maml = MAML(mlp(1, 1, hidden=(8, 8)), "mse", inner_lr=0.01,
                jit_compile=False)
    if loop:
      metrics = maml.train_steps(sample, 3)
      metrics = {k: float(v) for k, v in metrics.items()}
    else:
      steps = []
      for _ in range(3):
        batch = sample(maml.meta_optimizer.iterations)
        steps.append(maml.train_step(batch, pre_update_metrics=False))
      metrics = {k: np.mean([s[k] for s in steps]) for k in steps[0]}
    runs.append((metrics, _weights(maml.model),
                 int(maml.meta_optimizer.iterations.numpy())))
  (m1, w1, i1), (m2, w2, i2) = runs
  assert i1 == i2 == 3
  assert set(m1) == {"loss_after"}
  assert m1["loss_after"] == pytest.approx(m2["loss_after"], rel=1e-5)
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="num_steps"):
    maml.train_steps(sample, 0)


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


def test_pre_update_metrics_are_optional():
  maml = MAML(mlp(1, 1, hidden=(4,)), "mse")
  batch = sinusoid.sample_batch(3, 4, 4, np.random.default_rng(0))[0]
  assert set(maml.train_step(batch)) == {"loss_before", "loss_after"}
  assert set(maml.train_step(batch, pre_update_metrics=False)) == {
      "loss_after"}


def test_train_steps_for_classification_report_accuracy():
  rng = np.random.default_rng(1)
  batch = TaskBatch(rng.normal(size=(3, 4, 5)).astype("f4"),
                    np.tile(np.arange(2), (3, 2)).astype("i4"),
                    rng.normal(size=(3, 6, 5)).astype("f4"),
                    np.tile(np.arange(2), (3, 3)).astype("i4"))
  maml = MAML(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              inner_lr=0.1)
  metrics = maml.train_steps(lambda iteration: batch, 4,
                             pre_update_metrics=True)
  assert set(metrics) == {"loss_before", "loss_after", "accuracy_before",
                          "accuracy_after"}
  assert 0.0 <= float(metrics["accuracy_after"]) <= 1.0
  assert int(maml.meta_optimizer.iterations.numpy()) == 4
  assert float(metrics["loss_after"]) < float(metrics["loss_before"])


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
  per_task = maml_lib._per_task_loss_fn(loss)
  assert per_task is not None
  loss_fn = maml_lib._as_loss_fn(loss)
  expected = [float(loss_fn(y[t], pred[t])) for t in range(3)]
  np.testing.assert_allclose(per_task(y, pred).numpy(), expected, rtol=1e-6)
  assert len(set(np.round(expected, 6))) == 3     # tasks differ


@pytest.mark.parametrize("loss", [
    lambda y, p: tf.reduce_mean(tf.abs(y - p)), _OwnCall(), _Unhashable(),
    keras.losses.MeanSquaredError(reduction="sum"),
    keras.losses.SparseCategoricalCrossentropy(ignore_class=0)])
def test_other_losses_keep_the_task_loop(loss):
  assert maml_lib._per_task_loss_fn(loss) is None
