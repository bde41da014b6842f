"""MAML.train_steps: several meta-steps in one compiled call.

With in-graph sampling they equal single steps; the pre-update metrics are
optional and classification steps report accuracy.
"""

import keras
import numpy as np
import pytest

from maml_tf import MAML, TaskBatch
from maml_tf.models.mlp import mlp
from maml_tf.tasks import sinusoid


def _weights(model):
  return [v.numpy().copy() for v in model.weights]


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


def test_a_new_sampler_per_call_warns_and_ids_are_never_reused():
  from maml_tf.core import learner as learner_lib  # pylint: disable=g-import-not-at-top
  maml = MAML(mlp(1, 1, hidden=(4,)), "mse", jit_compile=False)
  batch = sinusoid.sample_batch(2, 3, 3, np.random.default_rng(0))[0]
  with pytest.warns(UserWarning, match="same function"):
    for _ in range(learner_lib.MANY_SAMPLERS):
      maml.train_steps(lambda iteration: batch, 1)
  # Every sampler stayed alive, so none took a compiled one's id: one loop
  # each.
  assert len([k for k in maml.compiled if k[0] == "train_steps"]) == (
      learner_lib.MANY_SAMPLERS)
  assert int(maml.meta_optimizer.iterations.numpy()) == learner_lib.MANY_SAMPLERS


def _tensor_batch(batch, dtype="float32"):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return TaskBatch(*(tf.constant(np.asarray(x).astype(dtype))
                     for x in batch))


def test_repeated_calls_equal_the_compiled_function_and_respect_tapes():
  """Three ways to call train_step give the same numbers: NumPy batches
  (prepared every call, the traced function called directly), the same
  under a recording tape (the tf.function itself), and eager tensors
  (prepared once per signature, then the ready step)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  batches = [sinusoid.sample_batch(3, 4, 4, rng)[0] for _ in range(4)]
  runs = {}
  for mode in ("direct", "tape", "tensors"):
    keras.utils.set_random_seed(2)
    maml = MAML(mlp(1, 1, hidden=(8,)), "mse", inner_lr=0.01)
    prepared = []
    real = maml.prepare
    maml.prepare = lambda b, real=real: prepared.append(1) or real(b)
    losses = []
    for b in batches:
      if mode == "tape":
        with tf.GradientTape():
          losses.append(float(maml.train_step(b)["loss_after"]))
      else:
        b = _tensor_batch(b) if mode == "tensors" else b
        losses.append(float(maml.train_step(b)["loss_after"]))
    runs[mode] = (losses, _weights(maml.model), len(prepared))
    # One compiled function served all calls (same shapes).
    assert len([k for k in maml.compiled if k[0] == "train"]) == 1
  (l1, w1, n1), (l2, w2, n2), (l3, w3, n3) = runs.values()
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  # Tensors of a seen signature skip preparation; NumPy batches never do;
  # the same compiled function gives the same bits.
  assert (n1, n2, n3) == (4, 4, 1)
  assert l3 == l1
  for a, b in zip(w3, w1):
    np.testing.assert_array_equal(a, b)


def test_train_step_runs_the_closed_form_under_xla_with_the_same_numbers():
  rng = np.random.default_rng(8)
  batches = [_tensor_batch(sinusoid.sample_batch(4, 5, 5, rng)[0])
             for _ in range(3)]
  runs = []
  for jit in (None, False):
    keras.utils.set_random_seed(3)
    maml = MAML(mlp(1, 1, hidden=(8, 8)), "mse", inner_lr=0.01,
                jit_compile=jit)
    assert maml.plan(batches[0]).xla == (jit is None)
    losses = [maml.train_step(b, pre_update_metrics=False)["loss_after"]
              for b in batches]
    runs.append((losses, _weights(maml.model)))
    assert [k[-1].xla for k in maml.compiled if k[0] == "train"] == [
        jit is None]
  (l1, w1), (l2, w2) = runs
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("jit", [None, False])
def test_a_known_signature_still_refuses_bad_values(jit):
  rng = np.random.default_rng(9)
  maml = MAML(mlp(1, 1, hidden=(4,)), "mse", inner_lr=0.01, jit_compile=jit)
  batch = sinusoid.sample_batch(3, 4, 4, rng)[0]
  for _ in range(2):
    maml.train_step(_tensor_batch(batch))
  before = _weights(maml.model)
  bad = list(batch)
  bad[2] = np.array(bad[2])
  bad[2][0, 0, 0] = np.nan
  with pytest.raises(FloatingPointError, match="NaN or Inf"):
    maml.train_step(_tensor_batch(bad))
  for a, b in zip(before, _weights(maml.model)):
    np.testing.assert_array_equal(a, b)
  # A new signature is validated again.
  with pytest.raises(ValueError, match="examples per task"):
    maml.train_step(_tensor_batch(batch)._replace(
        support_y=_tensor_batch(batch).support_y[:, :2]))


def test_a_known_signature_still_checks_class_labels():
  rng = np.random.default_rng(10)
  maml = MAML(mlp(3, 4, hidden=(8,)),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              inner_lr=0.1)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  labels = tf.constant(rng.integers(0, 4, size=(2, 6)), tf.int32)
  x = tf.constant(rng.normal(size=(2, 6, 3)), tf.float32)
  good = TaskBatch(x, labels, x, labels)
  for _ in range(2):
    maml.train_step(good)
  bad = good._replace(query_y=labels + 4)
  with pytest.raises(ValueError, match="outside the model's 4 outputs"):
    maml.train_step(bad)


@pytest.mark.filterwarnings("ignore::maml_tf.PlanWarning")  # runs task by task
def test_nested_eager_inputs_reach_the_ready_step_with_the_same_numbers():
  """A dict-input model's batches of eager tensors are prepared once per
  signature, then served by the ready step; the numbers equal NumPy's."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(11)

  def batch(n):
    x = {"a": rng.normal(size=(3, n, 3)), "b": rng.normal(size=(3, n, 2))}
    return x, np.sin(x["a"].sum(-1, keepdims=True))
  batches = [TaskBatch(*batch(4), *batch(5)) for _ in range(3)]
  runs = []
  for as_tensors in (False, True):
    keras.utils.set_random_seed(4)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([a, b])
    maml = MAML(keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(
        keras.layers.Dense(8, "tanh")(h))), "mse", inner_lr=0.1)
    prepared = []
    real = maml.prepare
    maml.prepare = lambda x, real=real: prepared.append(1) or real(x)
    to_tensors = lambda x: tf.nest.map_structure(
        lambda v: tf.constant(v, tf.float32), x)
    losses = [maml.train_step(to_tensors(x) if as_tensors else x)[
        "loss_after"] for x in batches]
    runs.append((losses, _weights(maml.model), len(prepared)))
  (l1, w1, n1), (l2, w2, n2) = runs
  assert (n1, n2) == (3, 1)
  assert l1 == l2
  for u, v in zip(w1, w2):
    np.testing.assert_array_equal(u, v)


def test_a_one_input_dict_model_trains_task_batched_and_structure_is_kept():
  """A model built on ``{"a": input}`` meta-trains on the task-batched path
  with the numbers of the same model on a plain input; leaves of a seen
  signature in another structure (query a plain tensor) are validated
  again, not served by the dict batch's step."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(12)
  x = [tf.constant(rng.normal(size=(2, n, 3)), tf.float32) for n in (4, 5)]
  y = [tf.constant(rng.normal(size=(2, n, 1)), tf.float32) for n in (4, 5)]
  runs = []
  for as_dict in (True, False):
    keras.utils.set_random_seed(5)
    a = keras.Input((3,), name="a")
    maml = MAML(keras.Model({"a": a} if as_dict else a,
                            keras.layers.Dense(1, "tanh")(a)), "mse",
                inner_lr=0.1)
    wrap = (lambda t: {"a": t}) if as_dict else (lambda t: t)
    batch = TaskBatch(wrap(x[0]), y[0], wrap(x[1]), y[1])
    assert maml.plan(batch).execution == "batched"
    runs.append([maml.train_step(batch)["loss_after"] for _ in range(3)])
    if as_dict:
      with pytest.raises(ValueError, match="same structure"):
        maml.train_step(batch._replace(query_x=x[1]))
  np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6)


def test_train_step_tensors_inside_a_callers_function():
  """Inside another graph nothing can be read: the metrics come back as
  tensors, NaN where the XLA step skipped a non-finite update."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(12)
  maml = MAML(mlp(1, 1, hidden=(4,)), "mse", inner_lr=0.01)
  batch = sinusoid.sample_batch(3, 4, 4, rng)[0]
  assert maml.plan(batch).xla
  step = tf.function(maml.train_step_tensors)
  assert np.isfinite(float(step(_tensor_batch(batch))["loss_after"]))
  bad = list(batch)
  bad[3] = np.full_like(bad[3], np.nan)
  before = _weights(maml.model)
  assert np.isnan(float(step(_tensor_batch(bad))["loss_after"]))
  for a, b in zip(before, _weights(maml.model)):
    np.testing.assert_array_equal(a, b)
