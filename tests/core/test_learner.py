"""The public MAML API: updates, adapt, evaluate, vectorisation, bad input."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, TaskBatch
from maml_tf.core import functional
from maml_tf.models.mlp import mlp
from maml_tf.tasks import sinusoid


def _batch(seed=0, tasks=8, k=5, q=7):
  return sinusoid.sample_batch(tasks, k, q, np.random.default_rng(seed))[0]


def _weights(model):
  return [v.numpy().copy() for v in model.variables]


def test_train_step_applies_the_meta_gradient_with_the_meta_optimizer():
  maml = MAML(mlp(1, 1, hidden=(8,)), "mse", inner_lr=0.05,
              meta_optimizer=keras.optimizers.SGD(0.1))
  batch = _batch()
  with tf.GradientTape() as tape:
    loss = maml.meta_loss(batch)
  grads = tape.gradient(loss, maml.model.trainable_variables)
  before = [v.numpy().copy() for v in maml.model.trainable_variables]
  metrics = maml.train_step(batch)
  assert set(metrics) == {"loss_before", "loss_after"}
  assert all(isinstance(v, float) for v in metrics.values())
  assert metrics["loss_after"] == pytest.approx(float(loss), rel=1e-5)
  for b, v, g in zip(before, maml.model.trainable_variables, grads):
    np.testing.assert_allclose(v.numpy(), b - 0.1 * g.numpy(), atol=1e-6)
  assert max(np.abs(g.numpy()).max() for g in grads) > 1e-3


def test_train_step_compiles_once_for_batches_of_one_shape():
  maml = MAML(mlp(1, 1, hidden=(8,)), "mse")
  for seed in range(3):
    maml.train_step(_batch(seed))
  (fn,) = [f for k, f in maml.compiled.items() if k[0] == "train"]
  assert fn.experimental_get_tracing_count() == 1


def test_vectorised_and_fallback_paths_agree():
  results = []
  for vectorize in (True, False):
    keras.utils.set_random_seed(3)
    maml = MAML(mlp(1, 1, hidden=(16, 16)), "mse", inner_lr=0.05,
                inner_steps=2, vectorize=vectorize)
    metrics = [maml.train_step(_batch(s)) for s in range(3)]
    ev = maml.evaluate(_batch(9), steps=(0, 1, 3))
    results.append((metrics, _weights(maml.model), ev["loss"]))
    assert maml.vectorize is vectorize
    assert maml.execution == ("vectorized_map" if vectorize else "map_fn")
  (m1, w1, e1), (m2, w2, e2) = results
  for a, b in zip(m1, m2):
    for k in a:
      assert a[k] == pytest.approx(b[k], rel=1e-5)
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(e1, e2, rtol=1e-5)


def test_vectorized_map_falls_back_to_map_fn_for_per_task_conv_filters():
  model = keras.Sequential([keras.Input((6, 6, 1)),
                            keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                            keras.layers.Dense(3)])
  maml = MAML(model, keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), inner_lr=0.1, vectorize=True, task_chunk=None)
  rng = np.random.default_rng(0)
  batch = TaskBatch(rng.normal(size=(2, 3, 6, 6, 1)).astype("f4"),
                    np.array([[0, 1, 2]] * 2, np.int32),
                    rng.normal(size=(2, 3, 6, 6, 1)).astype("f4"),
                    np.array([[0, 1, 2]] * 2, np.int32))
  with pytest.warns(UserWarning, match="could not vectorise"):
    metrics = maml.train_step(batch)
  assert maml.execution == "map_fn"
  assert set(metrics) == {"loss_before", "loss_after", "accuracy_before",
                          "accuracy_after"}
  assert 0.0 <= metrics["accuracy_after"] <= 1.0


def test_adapt_leaves_meta_model_untouched_and_fits_support():
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(16),
                            keras.layers.BatchNormalization(),
                            keras.layers.Activation("relu"),
                            keras.layers.Dense(1)])
  maml = MAML(model, "mse", inner_lr=0.05)
  batch = _batch(1)
  before = _weights(model)
  adapted = maml.adapt(batch.support_x[0], batch.support_y[0], steps=20)
  for a, b in zip(before, _weights(model)):
    np.testing.assert_array_equal(a, b)
  assert adapted is not model
  mse = lambda m: float(np.mean((np.asarray(m(batch.support_x[0],
                                                training=True))
                                 - batch.support_y[0]) ** 2))
  assert mse(adapted) < 0.7 * mse(model)
  # BatchNorm: inference mode on the support set reproduces the predictions
  # the adapted weights made with batch statistics during adaptation.
  np.testing.assert_allclose(adapted(batch.support_x[0], training=False),
                             adapted(batch.support_x[0], training=True),
                             atol=1e-4)


def test_adapt_with_zero_steps_is_a_copy():
  maml = MAML(mlp(1, 1, hidden=(8,)), "mse")
  x = _batch().support_x[0]
  np.testing.assert_allclose(maml.adapt(x, np.zeros_like(x), steps=0)(x),
                             maml.model(x), atol=1e-6)


def test_evaluate_reports_each_requested_step_and_improves_after_training():
  keras.utils.set_random_seed(0)
  maml = MAML(mlp(1, 1), "mse", inner_lr=0.01)
  test = sinusoid.sample_batch(200, 10, 50, np.random.default_rng(123))[0]
  before = maml.evaluate(test, steps=(0, 1))
  for i in range(1500):
    maml.train_step_tensors(sinusoid.sample_batch(
        25, 10, 10, np.random.default_rng([7, i]))[0])
  after = maml.evaluate(test, steps=(0, 1, 5), per_task=True)
  assert after["loss"].shape == (3, 200)
  post = after["loss"].mean(axis=1)
  assert post[1] < 0.5 * before["loss"][1], (before, post)
  assert post[1] < post[0]          # one step helps after meta-training


@pytest.mark.parametrize("field,shape,match", [
    ("support_y", (4, 6, 1), "support_x has 5 examples.*support_y has 6"),
    ("query_x", (4, 7, 2), "support and query inputs disagree"),
    ("query_y", (3, 7, 1), "number of tasks"),
])
def test_mismatched_batch_shapes_name_the_cause(field, shape, match):
  maml = MAML(mlp(1, 1, hidden=(4,)), "mse")
  batch = _batch(tasks=4)._replace(**{field: np.zeros(shape, np.float32)})
  with pytest.raises(ValueError, match=match):
    maml.train_step(batch)


@pytest.mark.parametrize("tail,match", [
    ((2,), r"support_x has examples of shape \(2,\) \(after the task and "
     r"example axes of \(4, 5, 2\)\), but model .* takes inputs of shape "
     r"\(1,\)"),
    ((), r"support_x has examples of shape \(\)")])
def test_inputs_not_of_the_models_input_shape_are_named(tail, match):
  maml = MAML(mlp(1, 1, hidden=(4,)), "mse")
  batch = _batch(tasks=4)
  batch = batch._replace(support_x=np.zeros((4, 5) + tail, np.float32),
                         query_x=np.zeros((4, 7) + tail, np.float32))
  with pytest.raises(ValueError, match=match):
    maml.train_step(batch)


@pytest.mark.parametrize("kwargs,match", [
    ({"inner_steps": 0}, "inner_steps must be an integer >= 1"),
    ({"inner_lr": float("nan")}, "inner_lr"),
    ({"vectorize": "sometimes"}, "vectorize"),
    ({"conv_impl": "im2col"}, "conv_impl must be one of"),
])
def test_bad_constructor_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MAML(mlp(1, 1, hidden=(4,)), "mse", **kwargs)


def _small_conv_net(dtype):
  return keras.Sequential([
      keras.Input((6, 6, 1), dtype=dtype),
      keras.layers.Conv2D(2, 3, dtype=dtype), keras.layers.Flatten(dtype=dtype),
      keras.layers.Dense(3, dtype=dtype)])


def _grouped_conv_gradient_runs(dtype) -> bool:
  """Whether TensorFlow here differentiates a grouped convolution."""
  x = tf.ones([1, 4, 4, 2], dtype)
  w = tf.ones([3, 3, 1, 2], dtype)
  try:
    with tf.GradientTape() as tape:
      tape.watch(w)
      y = tf.function(tf.nn.conv2d)(x, w, 1, "SAME")
    tf.function(lambda: tape.gradient(y, w))()
    return True
  except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
    return False


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grouped_gradient_missing_agrees_with_tensorflow(dtype):
  # It said "trains" wherever x86-64 had oneDNN's kernels, but TensorFlow
  # leaves oneDNN off on plain AVX2 CPUs: 'grouped' was accepted there and
  # the first inner step crashed inside TensorFlow.
  from maml_tf.core import fast_weights  # pylint: disable=g-import-not-at-top
  missing = fast_weights.grouped_gradient_missing(dtype)
  assert (missing is None) == _grouped_conv_gradient_runs(dtype), missing
  assert fast_weights.grouped_gradient_missing(dtype, gpu=True) is None


_AGREEMENT = """
import tensorflow as tf
from maml_tf.core import fast_weights
x, w = tf.ones([1, 4, 4, 2]), tf.ones([3, 3, 1, 2])
try:
  with tf.GradientTape() as tape:
    tape.watch(w)
    y = tf.function(tf.nn.conv2d)(x, w, 1, "SAME")
  tf.function(lambda: tape.gradient(y, w))()
  runs = True
except tf.errors.InvalidArgumentError:
  runs = False
print(runs, fast_weights.grouped_gradient_missing("float32") is None)
"""


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_grouped_gradient_missing_follows_tf_enable_onednn_opts(onednn):
  """TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it starts: a fresh
  process each, so both states are checked on every machine."""
  env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="3",
             CUDA_VISIBLE_DEVICES="-1")     # the CPU kernels
  out = subprocess.run([sys.executable, "-c", _AGREEMENT], env=env,
                       capture_output=True, text=True, timeout=300, check=True)
  runs, accepted = out.stdout.split()
  assert runs == accepted
  if onednn == "0":
    assert runs == "False"


def test_grouped_convolutions_are_refused_where_tf_has_no_gradient():
  # TF's CPU kernels run a float64 grouped convolution but have no gradient
  # for it: accepted, the first inner step crashed inside TensorFlow.
  from maml_tf.core import fast_weights  # pylint: disable=g-import-not-at-top
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  missing = fast_weights.grouped_gradient_missing("float64")
  if missing:
    with pytest.raises(ValueError, match="'grouped' cannot train .*: "
                       + re.escape(missing)):
      MAML(_small_conv_net("float64"), loss, conv_impl="grouped")
  if not fast_weights.grouped_gradient_missing("float32"):   # oneDNN: trains
    maml = MAML(_small_conv_net("float32"), loss, conv_impl="grouped")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 6, 6, 1)).astype("f4")
    y = np.tile(np.arange(3), (2, 1))
    assert np.isfinite(maml.train_step(TaskBatch(x, y, x, y))["loss_after"])
  # A model without convolutions never meets the kernel.
  MAML(mlp(1, 1, hidden=(4,)), "mse", conv_impl="grouped")


def test_unbuilt_model_is_rejected_with_advice():
  with pytest.raises(ValueError, match="no trainable weights yet"):
    MAML(keras.Sequential([keras.layers.Dense(1)]), "mse")


def test_nan_loss_raises_and_leaves_weights_unchanged():
  maml = MAML(mlp(1, 1, hidden=(4,)), "mse")
  batch = _batch()
  bad = batch._replace(query_y=np.full_like(batch.query_y, np.nan))
  before = _weights(maml.model)
  with pytest.raises(FloatingPointError, match="meta-loss.*NaN"):
    maml.train_step(bad)
  for a, b in zip(before, _weights(maml.model)):
    np.testing.assert_array_equal(a, b)
  maml.train_step(batch)   # still usable afterwards


class _SqrtShift(keras.layers.Layer):
  """``x + sqrt(w)``, ``w = 0``: a finite output whose gradient is not."""

  def build(self, input_shape):
    self.w = self.add_weight(shape=(), initializer="zeros", name="w")

  def call(self, x):
    return x + tf.sqrt(self.w)


def _sqrt_shift_maml(jit):
  """Only the outer loop differentiates the shift (the inner loop adapts
  the head): the loss is finite, the shift's meta-gradient is not."""
  inputs = keras.Input((1,))
  hidden = keras.layers.BatchNormalization()(keras.layers.Dense(4)(
      _SqrtShift(name="shift")(inputs)))
  outputs = keras.layers.Dense(1, name="head")(hidden)
  return MAML(keras.Model(inputs, outputs), "mse", inner_lr=0.01,
              adapt=["head"], jit_compile=jit)


@pytest.mark.filterwarnings("ignore::maml_tf.PlanWarning")  # a custom layer
@pytest.mark.parametrize("jit", [True, False])
def test_a_non_finite_meta_gradient_of_a_finite_loss_raises_naming_it(jit):
  """Only the outer loop differentiates the shift (the inner loop adapts the
  head), so the loss stays finite; every entry point, the ready step
  included, raises naming the meta-gradient and leaves every variable
  (BatchNorm's moving statistics and the iteration count included)."""
  maml = _sqrt_shift_maml(jit)
  assert maml.plan(_batch()).xla == jit
  batch = TaskBatch(*[tf.constant(a) for a in _batch()])
  before = _weights(maml.model)
  calls = [maml.train_step, maml.train_step,            # traced, then ready
           lambda b: maml.train_step(b, pre_update_metrics=False),
           maml.train_step_tensors, maml.train_step_tensors]
  for call in calls:
    with pytest.raises(FloatingPointError,
                       match=r"meta-gradient of shift/w is NaN or Inf"):
      call(batch)
  for a, b in zip(before, _weights(maml.model)):
    np.testing.assert_array_equal(a, b)
  assert int(maml.meta_optimizer.iterations) == 0


@pytest.mark.filterwarnings("ignore::maml_tf.PlanWarning")  # a custom layer
def test_meta_step_in_a_users_xla_function_skips_a_non_finite_update():
  """XLA compiles check_numerics to nothing: meta_step traced inside the
  caller's tf.function(jit_compile=True) gates its update by finite flags
  although its plan is not XLA's."""
  maml = _sqrt_shift_maml(False)
  batch = maml.prepare(TaskBatch(*_batch()))
  plan = maml.plan(batch)
  assert not plan.xla
  step = tf.function(lambda b: maml.meta_step(b, plan), jit_compile=True)
  before = _weights(maml.model)
  out = step(batch)
  flags = out.finite.numpy()
  assert flags[0] and not flags.all()     # a finite loss, a gradient not
  for a, b in zip(before, _weights(maml.model)):
    np.testing.assert_array_equal(a, b)
  assert int(maml.meta_optimizer.iterations) == 0


def test_functional_call_does_not_write_variables():
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                            keras.layers.BatchNormalization()])
  params, state = functional.read_weights(model)
  before = _weights(model)
  out, new_state = functional.functional_call(
      model, [p * 2 for p in params], state,
      np.random.default_rng(0).normal(size=(5, 3)).astype("f4"))
  assert out.shape == (5, 4)
  assert not np.allclose(new_state[0], state[0])   # moving mean moved...
  for a, b in zip(before, _weights(model)):         # ...but only functionally
    np.testing.assert_array_equal(a, b)


def test_batched_fast_weights_equal_the_per_task_loop_for_a_conv_bn_net(
    conv_bn_f64):
  batch = conv_bn_f64.batch(3, seed=5)
  runs = {}
  for mode in ("batched", "map_fn"):
    keras.utils.set_random_seed(11)
    maml = MAML(conv_bn_f64(), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, dtype="float64"), inner_lr=0.1, inner_steps=2,
                meta_optimizer=keras.optimizers.SGD(0.05), vectorize=mode)
    assert maml.execution == mode
    metrics = [maml.train_step(batch) for _ in range(2)]
    ev = maml.evaluate(batch, steps=(0, 1, 3), per_task=True)
    runs[mode] = (metrics, _weights(maml.model), ev)
  (m1, w1, e1), (m2, w2, e2) = runs["batched"], runs["map_fn"]
  for a, b in zip(m1, m2):
    for k in a:
      assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-9)
  for a, b in zip(w1, w2):   # BatchNorm moving statistics included
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(e1["loss"], e2["loss"], rtol=1e-9)
  np.testing.assert_allclose(e1["accuracy"], e2["accuracy"])


def test_auto_execution_prefers_batched_and_falls_back_for_other_layers():
  assert MAML(mlp(1, 1, hidden=(4,)), "mse").execution == "batched"
  dropping = keras.Sequential([
      keras.Input((3, 2)), keras.layers.GRU(4, recurrent_dropout=0.1,
                                            name="dropping"),
      keras.layers.Dense(1)])
  assert MAML(dropping, "mse").execution == "map_fn"
  with pytest.raises(ValueError, match="dropping"):
    MAML(dropping, "mse", vectorize="batched")


def test_options_the_plan_depends_on_are_read_only():
  maml = MAML(mlp(1, 1, hidden=(4,)), "mse", inner_lr=0.05, task_chunk=2)
  assert (maml.inner_lr, maml.task_chunk, maml.recompute) == (0.05, 2, False)
  for name, value in (("inner_lr", 0.1), ("inner_steps", 3),
                      ("recompute", True), ("task_chunk", None)):
    with pytest.raises(AttributeError, match=f"MAML.{name} is fixed"):
      setattr(maml, name, value)


def _labels_batch(sy, qy, k=2, q=3):
  rng = np.random.default_rng(0)
  return TaskBatch(rng.normal(size=(2, k, 4)).astype("f4"), sy,
                   rng.normal(size=(2, q, 4)).astype("f4"), qy)


def _classifier_maml():
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
  return MAML(model, keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), inner_lr=0.1)


def test_degenerate_batches_are_refused_naming_the_field():
  maml = _classifier_maml()
  ints = lambda n: np.zeros((2, n), "i4")
  with pytest.raises(ValueError, match="support_x has no examples"):
    maml.train_step(_labels_batch(ints(0), ints(3), k=0))
  with pytest.raises(ValueError, match="query_x has no examples"):
    maml.train_step(_labels_batch(ints(2), ints(0), q=0))
  # Float labels with a sparse loss would be truncated silently.
  with pytest.raises(ValueError, match="support_y is float32, but the loss "
                     "takes integer class indices"):
    maml.train_step(_labels_batch(np.full((2, 2), 1.7, "f4"), ints(3)))
  # A label beyond the model's 3 outputs, without a graph trace.
  bad = ints(3)
  bad[1, 2] = 3
  with pytest.raises(ValueError, match=r"query_y holds labels 0\.\.3, outside "
                     r"the model's 3 outputs \(0\.\.2\)"):
    maml.train_step(_labels_batch(ints(2), bad))
  assert np.isfinite(maml.train_step(_labels_batch(ints(2), ints(3)))[
      "loss_after"])


def test_labels_with_a_trailing_axis_of_one_train_as_plain_labels():
  """Keras' sparse losses take [N, 1] labels; so do MAML's metrics."""
  rng = np.random.default_rng(1)
  sy, qy = rng.integers(0, 3, (2, 2)), rng.integers(0, 3, (2, 3))
  results = []
  for column in (False, True):
    keras.utils.set_random_seed(0)
    maml = _classifier_maml()
    batch = _labels_batch(*(y[..., None] if column else y for y in (sy, qy)))
    results.append([maml.train_step(batch), maml.train_step(batch),
                    maml.evaluate(batch, steps=(0, 1))["accuracy"]])
  assert results[1][0] == results[0][0] and results[1][1] == results[0][1]
  np.testing.assert_array_equal(results[1][2], results[0][2])
  assert 0 < results[0][1]["accuracy_after"] < 1   # a real score, not 0 or 1


def test_a_model_with_several_outputs_is_refused():
  inputs = keras.Input((4,))
  hidden = keras.layers.Dense(4)(inputs)
  model = keras.Model(inputs, [keras.layers.Dense(1)(hidden),
                               keras.layers.Dense(2)(hidden)])
  with pytest.raises(ValueError, match="has 2 outputs; MAML adapts models "
                     "with one output"):
    MAML(model, "mse")

  class TwoHeads(keras.Model):      # subclassed: its call traced to tell
    def __init__(self):
      super().__init__()
      self.a, self.b = keras.layers.Dense(1), keras.layers.Dense(2)

    def call(self, x):
      return self.a(x), self.b(x)
  model = TwoHeads()
  model(np.zeros((1, 4), "f4"))
  with pytest.raises(ValueError, match="has 2 outputs"):
    MAML(model, "mse")


def test_a_frozen_model_is_named_frozen_not_unbuilt():
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
  model.trainable = False
  with pytest.raises(ValueError, match="all of its 2 weights are frozen"):
    MAML(model, "mse")
  with pytest.raises(ValueError, match="no trainable weights yet: build it first"):
    MAML(keras.Sequential([keras.layers.Dense(3)]), "mse")


def test_accuracy_is_reported_only_where_argmax_scores_classes():
  # Before, integer labels switched accuracy on for any loss: a binary
  # classifier's "accuracy" was the share of label 0 (argmax of one unit),
  # and integer regression targets got one too.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 3)).astype("f4")
  y = rng.integers(0, 2, size=(2, 6, 1)).astype("i4")
  batch = TaskBatch(x, y, x, y)
  for loss in (keras.losses.BinaryCrossentropy(from_logits=True), "mse"):
    metrics = MAML(mlp(3, 1, hidden=(4,)), loss, inner_lr=0.1).train_step(
        batch)
    assert set(metrics) == {"loss_before", "loss_after"}, (loss, metrics)
  with pytest.raises(ValueError, match="has one output unit"):
    MAML(mlp(3, 1, hidden=(4,)), "mse", accuracy=True)
  # Several classes: accuracy as before, also for a user's own loss.
  sparse = lambda a, b: keras.losses.sparse_categorical_crossentropy(
      a, b, from_logits=True)
  metrics = MAML(mlp(3, 2, hidden=(4,)), sparse, inner_lr=0.1).train_step(
      TaskBatch(x, y[..., 0], x, y[..., 0]))
  assert 0 <= metrics["accuracy_after"] <= 1


def test_adapt_checks_labels_as_batches_are_checked():
  # Before, adapt truncated float labels silently, crashed on a list and
  # left out-of-range labels to TensorFlow's raw error.
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  maml = MAML(mlp(3, 4, hidden=(8,)), loss, inner_lr=0.1)
  x = np.random.default_rng(2).normal(size=(6, 3)).astype("f4")
  y = np.array([0, 1, 2, 3, 0, 1], "i4")
  with pytest.raises(ValueError, match="adapt's support_y is float32"):
    maml.adapt(x, y + 0.7)
  with pytest.raises(ValueError, match="outside the model's 4 outputs"):
    maml.adapt(x, y + 2)
  from_list = maml.adapt(x, y.tolist())
  np.testing.assert_allclose(from_list(x), maml.adapt(x, y)(x), atol=1e-6)


def test_labels_of_the_loss_ignore_class_are_accepted():
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                    ignore_class=-1)
  maml = MAML(mlp(3, 4, hidden=(8,)), loss, inner_lr=0.1)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 6, 3)).astype("f4")
  y = rng.integers(0, 4, size=(2, 6)).astype("i4")
  y[:, -1] = -1
  assert np.isfinite(maml.train_step(TaskBatch(x, y, x, y))["loss_after"])
  with pytest.raises(ValueError, match="ignore_class -1 aside"):
    maml.train_step(TaskBatch(x, y, x, np.where(y == 0, 7, y)))


@pytest.mark.parametrize("options", [
    {"vectorize": "batched"}, {"vectorize": "map_fn"},
    {"vectorize": "batched", "task_chunk": 1}])
def test_accuracy_leaves_out_the_loss_ignore_class(options):
  # Before, a loss with an ignore_class turned accuracy off (ignored labels
  # would have counted as misses).
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                    ignore_class=-1)
  maml = MAML(mlp(3, 4, hidden=(8,)), loss, inner_lr=0.5, **options)
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 8, 3)).astype("f4")
  y = rng.integers(0, 4, size=(2, 8)).astype("i4")
  y[:, ::2] = -1
  got = maml.evaluate(TaskBatch(x, y, x, y), steps=(1,),
                       per_task=True)["accuracy"][0]
  want = []
  for t in range(2):
    pred = np.argmax(maml.adapt(x[t], y[t])(x[t]), -1)
    keep = y[t] != -1
    want.append(np.mean(pred[keep] == y[t][keep]))
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert len(set(want)) == 2 or 0 < want[0] < 1   # not all hits or misses
  assert 0 <= maml.train_step(TaskBatch(x, y, x, y))["accuracy_after"] <= 1


def test_freezing_a_layer_after_the_learner_is_built_is_named():
  # Before: adapt raised an empty StopIteration and evaluate "expected 4
  # params ... got 2".
  model = mlp(1, 1, hidden=(8,))
  maml = MAML(model, "mse", inner_lr=0.05)
  batch = _batch()
  maml.train_step(batch)
  model.layers[0].trainable = False
  for call in (lambda: maml.evaluate(batch, steps=(1,)),
               lambda: maml.adapt(batch.support_x[0], batch.support_y[0]),
               lambda: maml.train_step(_batch(tasks=3))):
    with pytest.raises(ValueError, match=r"changed after the learner was "
                       r"built \(frozen since: \['mlp/dense_0/kernel.*build a new MAML"):
      call()
  model.layers[0].trainable = True
  assert np.isfinite(maml.evaluate(batch, steps=(1,))["loss"][0])
