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


def _batched_steps_equal_task_by_task(build, batch, loss, steps=2,
                                      **options):
  """``steps`` meta-steps of ``build()`` run task-batched (no PlanWarning)
  and task by task (``map_fn``) give the same weights; returns the plan."""
  import warnings  # pylint: disable=g-import-not-at-top
  weights, plans = {}, {}
  for vectorize in ("auto", "map_fn"):
    keras.utils.set_random_seed(0)
    with warnings.catch_warnings():
      warnings.simplefilter("error")        # no PlanWarning: batched
      maml = MAML(build(), loss, inner_lr=0.1, vectorize=vectorize,
                  meta_optimizer=keras.optimizers.SGD(0.1), **options)
    plans[vectorize] = maml.plan(batch)
    for _ in range(steps):
      maml.train_step(batch)
    weights[vectorize] = maml.model.get_weights()
  assert plans["auto"].execution == "batched"
  assert plans["map_fn"].execution == "map_fn"
  for a, b in zip(weights["auto"], weights["map_fn"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  return plans["auto"]


def _classes_batch(inputs, tasks=4, support=3, query=5, seed=0):
  from maml_tf import TaskBatch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  draw = lambda n, shape: rng.normal(size=(tasks, n) + shape).astype("f4")
  x = lambda n: ({k: draw(n, v) for k, v in inputs.items()}
                 if isinstance(inputs, dict) else draw(n, inputs))
  return TaskBatch(x(support), rng.integers(0, 3, (tasks, support)),
                   x(query), rng.integers(0, 3, (tasks, query)))


CLASSES = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _operations_model():
  """A functional model written with keras.ops and operators between
  layers (a residual ``h + ...``, ``keras.ops.tanh``, indexing)."""
  x = keras.Input((1,))
  h = keras.layers.Dense(16)(x)
  h = keras.ops.tanh(h + keras.layers.Dense(16)(h) * 0.5)
  return keras.Model(x, keras.layers.Dense(1)(h[:, 2:]), name="ops")


def test_a_functional_model_with_keras_operations_runs_task_batched():
  batch = sinusoid.sample_batch(4, 5, 5, np.random.default_rng(3))[0]
  _batched_steps_equal_task_by_task(_operations_model, batch, "mse", steps=3)
  # An operation across a task's examples keeps the model off the batched
  # path, with the reason, and it still trains.
  from maml_tf.core.plan import PlanWarning  # pylint: disable=g-import-not-at-top
  x = keras.Input((1,))
  h = keras.layers.Dense(8)(x)
  across = keras.Model(x, keras.layers.Dense(1)(h - keras.ops.mean(h, 0)))
  with pytest.warns(PlanWarning, match=r"operation 'mean\w*' \(Mean\): its "
                    "inputs and output must keep the batch axis"):
    maml = MAML(across, "mse", inner_lr=0.05)
  assert maml.plan(batch).execution == "vectorized_map"
  assert np.isfinite(maml.train_step(batch)["loss_after"])


def _image_and_vector():
  image = keras.Input((6, 6, 1), name="image")
  vector = keras.Input((3,), name="vector")
  h = keras.layers.Conv2D(3, 3, activation="tanh")(image)
  h = keras.layers.Flatten()(keras.layers.MaxPooling2D()(h))
  h = keras.layers.Concatenate()(
      [h, keras.layers.Dense(4, activation="tanh")(vector)])
  return keras.Model({"image": image, "vector": vector},
                     keras.layers.Dense(3)(h), name="image_and_vector")


@pytest.mark.parametrize("options", [{}, {"task_chunk": 2},
                                     {"recompute": True}],
                         ids=["all_tasks", "task_chunks", "recompute"])
def test_a_model_with_several_inputs_runs_task_batched(options):
  batch = _classes_batch({"image": (6, 6, 1), "vector": (3,)})
  plan = _batched_steps_equal_task_by_task(_image_and_vector, batch, CLASSES,
                                           **options)
  assert plan.split_gradients == ("task_chunk" in options)
  assert (plan.query_chunk is not None) == ("recompute" in options)


def _transformer():
  inp = keras.Input((5, 4))
  x = keras.layers.Dense(8)(inp)
  a = keras.layers.MultiHeadAttention(2, 4, dropout=0.2)(x, x)
  x = keras.layers.LayerNormalization()(x + keras.layers.Dropout(0.1)(a))
  x = keras.layers.GlobalAveragePooling1D()(x)
  return keras.Model(inp, keras.layers.Dense(3)(x), name="transformer")


def test_a_transformer_with_dropout_runs_task_batched():
  """Attention and its dropout on the batched path: the steps of the task
  by task path, masks included (per-task seeds)."""
  _batched_steps_equal_task_by_task(_transformer, _classes_batch((5, 4)),
                                    CLASSES)


class NoTraining(keras.Model):
  """The most common research style: ``call(self, x)``, no get_config."""

  def __init__(self):
    super().__init__()
    self.hidden = keras.layers.Dense(16, activation="tanh")
    self.drop = keras.layers.Dropout(0.0)
    self.norm = keras.layers.BatchNormalization()
    self.out = keras.layers.Dense(1)

  def call(self, x):
    return self.out(self.drop(self.norm(self.hidden(x))))


class NoConfig(keras.Model):
  """``call(self, x, training=None)`` but no get_config: cannot be cloned."""

  def __init__(self, width):
    super().__init__()
    self.hidden = keras.layers.Dense(width, activation="tanh")
    self.norm = keras.layers.BatchNormalization()
    self.out = keras.layers.Dense(1)

  def call(self, x, training=None):
    return self.out(self.norm(self.hidden(x), training=training))


@pytest.mark.parametrize("cls", [NoTraining, lambda: NoConfig(12)],
                         ids=["no_training_arg", "no_get_config"])
def test_models_without_training_or_config_work_end_to_end(cls, tmp_path):
  """Meta-train, adapt, export, reload in a process without maml_tf."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from maml_tf.core import functional  # pylint: disable=g-import-not-at-top
  from maml_tf.export import export_adaptable, export_adapted  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  model = cls()
  model(np.zeros((2, 1), np.float32))
  maml = MAML(model, "mse", inner_lr=0.05, inner_steps=2,
              meta_optimizer=keras.optimizers.Adam(3e-3))
  test = sinusoid.sample_batch(20, 10, 20, np.random.default_rng(99))[0]
  start = maml.evaluate(test, steps=(2,))["loss"][0]
  for i in range(150):
    maml.train_step_tensors(sinusoid.sample_batch(
        10, 10, 10, np.random.default_rng([2, i]))[0])
  assert maml.evaluate(test, steps=(2,))["loss"][0] < 0.8 * start
  assert np.isfinite(float(maml.meta_loss(test)))
  # Training-mode behaviour reaches the layers: BatchNorm moving statistics
  # are written by the meta-steps.
  assert not np.allclose(model.norm.moving_mean.numpy(), 0.0)
  before = [v.numpy().copy() for v in model.weights]
  sx, sy = test.support_x[0], test.support_y[0]
  adapted = maml.adapt(sx, sy)
  for b, v in zip(before, model.weights):
    np.testing.assert_array_equal(b, v.numpy())   # meta-model untouched
  qx = test.query_x[0]
  want = np.asarray(adapted(qx, training=False))
  # The adapted model predicts with the adapted weights.
  fast = adapted.trainable_variables
  got, _ = functional.functional_call(
      adapted, fast, adapted.non_trainable_variables, tf.constant(qx), False)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  assert not np.allclose(want, np.asarray(model(qx, training=False)),
                         atol=1e-4)
  export_adapted(adapted, str(tmp_path / "adapted"), verify_with=qx)
  export_adaptable(maml, str(tmp_path / "adaptable"), sx, sy)
  np.save(tmp_path / "sx.npy", np.asarray(sx, "f4"))
  np.save(tmp_path / "sy.npy", np.asarray(sy, "f4"))
  np.save(tmp_path / "qx.npy", np.asarray(qx, "f4"))
  code = f"""
import sys, numpy as np, tensorflow as tf
d = {str(tmp_path)!r}
sx, sy, qx = (np.load(f"{{d}}/{{n}}.npy") for n in ("sx", "sy", "qx"))
a = tf.saved_model.load(d + "/adapted")
b = tf.saved_model.load(d + "/adaptable")
np.save(d + "/served.npy", a.serve(qx).numpy())
np.save(d + "/adapted_in_graph.npy", b.adapt_and_predict(sx, sy, qx).numpy())
assert "maml_tf" not in sys.modules
"""
  subprocess.run([sys.executable, "-c", code], check=True)
  np.testing.assert_allclose(np.load(tmp_path / "served.npy"), want,
                             atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / "adapted_in_graph.npy"), want,
                             atol=1e-5)


class _Frozen(keras.Model):
  """Subclassed, its body frozen after __init__ (the clone's is not)."""

  def __init__(self, units=1, **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.body = keras.layers.Dense(6, activation="tanh")
    self.head = keras.layers.Dense(units)

  def call(self, x):
    return self.head(self.body(x))

  def get_config(self):
    return {**super().get_config(), "units": self.units}


class _BuiltLate(keras.Model):
  """Subclassed, its layers made in build() (the clone comes back unbuilt
  or otherwise built)."""

  def build(self, shape):
    self.body = keras.layers.Dense(5, activation="tanh")
    self.head = keras.layers.Dense(1)

  def call(self, x):
    return self.head(self.body(x))


def _frozen():
  model = _Frozen()
  model(np.zeros((2, 1), np.float32))
  model.body.trainable = False
  return model


def _replaced_head():
  """Its head swapped after __init__ for one of the same shapes but
  another activation: a clone from the config would compute otherwise."""
  model = _Frozen()
  model.head = keras.layers.Dense(1, activation="softplus")
  model(np.zeros((2, 1), np.float32))
  return model


def _built_late():
  model = _BuiltLate()
  model(np.zeros((2, 1), np.float32))
  return model


@pytest.mark.parametrize("build", [_frozen, _replaced_head, _built_late])
def test_adapt_returns_what_the_adapted_weights_compute(build):
  """Where Keras' clone differs from the model (frozen or replaced layers,
  layers made in build), adapt returns an AdaptedModel instead: its
  predictions are the adapted weights' through the model."""
  from maml_tf.core import functional  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(1)
  model = build()
  maml = MAML(model, "mse", inner_lr=0.1)
  batch = sinusoid.sample_batch(2, 5, 5, np.random.default_rng(0))[0]
  maml.train_step(batch)
  sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
  adapted = maml.adapt(sx, sy, steps=2)
  params, state, lrs = maml.meta_values()
  fast, _ = maml.inner_loop.adapt(params, state, sx, sy, 2, lrs)
  want, _ = functional.functional_call(model, fast, state, qx, False)
  np.testing.assert_allclose(np.asarray(adapted(qx, training=False)),
                             np.asarray(want), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(want), np.asarray(model(qx)), atol=1e-4)


class _Classifier(keras.Model):
  """A subclassed classifier with 4 classes and no graph outputs."""

  def __init__(self):
    super().__init__()
    self.hidden = keras.layers.Dense(8, activation="tanh")
    self.out = keras.layers.Dense(4)

  def call(self, x):
    return self.out(self.hidden(x))


def test_subclassed_classifiers_name_labels_outside_their_outputs():
  # Before, a subclassed model had no known class count, and a label of 4
  # reached TensorFlow's raw sparse cross-entropy error.
  model = _Classifier()
  model(np.zeros((1, 3), np.float32))
  maml = MAML(model, keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), inner_lr=0.1)
  batch = _classes_batch((3,), tasks=2, support=4, query=4)
  maml.train_step(batch)
  with pytest.raises(ValueError, match="outside the model's 4 outputs"):
    maml.train_step(batch._replace(query_y=np.asarray(batch.query_y) + 4))
