"""Second-order meta-gradients against central finite differences (float64)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, TaskBatch
from maml_tf.core import functional

F64 = "float64"


def _mlp():
  return keras.Sequential([
      keras.Input((2,), dtype=F64),
      keras.layers.Dense(6, activation="tanh", dtype=F64),
      keras.layers.Dense(5, activation="relu", dtype=F64),
      keras.layers.Dense(1, dtype=F64)])


def _batchnorm():
  return keras.Sequential([
      keras.Input((2,), dtype=F64),
      keras.layers.Dense(6, dtype=F64),
      keras.layers.BatchNormalization(dtype=F64),
      keras.layers.Activation("tanh", dtype=F64),
      keras.layers.Dense(1, dtype=F64)])


def _layernorm():
  return keras.Sequential([
      keras.Input((2,), dtype=F64),
      keras.layers.Dense(6, dtype=F64),
      keras.layers.LayerNormalization(dtype=F64),
      keras.layers.Activation("tanh", dtype=F64),
      keras.layers.Dense(1, dtype=F64)])


def _conv_bn():
  """The paper's conv block (conv, BatchNorm, ReLU, max-pool) in miniature."""
  return keras.Sequential([
      keras.Input((6, 6, 1), dtype=F64),
      keras.layers.Conv2D(3, 3, padding="same", dtype=F64),
      keras.layers.BatchNormalization(dtype=F64),
      keras.layers.Activation("tanh", dtype=F64),
      keras.layers.MaxPooling2D(2, dtype=F64),
      keras.layers.Flatten(dtype=F64),
      keras.layers.Dense(3, dtype=F64)])


def _regression_batch(rng, input_shape=(2,), tasks=3, k=5, q=6):
  sx = rng.normal(size=(tasks, k) + input_shape)
  qx = rng.normal(size=(tasks, q) + input_shape)
  w = rng.normal(size=(tasks, int(np.prod(input_shape)), 1))
  sy = np.einsum("tki,tio->tko", sx.reshape(tasks, k, -1), w)
  qy = np.einsum("tki,tio->tko", qx.reshape(tasks, q, -1), w)
  return TaskBatch(sx, np.sin(sy), qx, np.sin(qy))


def _classification_batch(rng, tasks=2, k=4, q=4):
  return TaskBatch(rng.normal(size=(tasks, k, 6, 6, 1)),
                   rng.integers(0, 3, size=(tasks, k)).astype(np.int32),
                   rng.normal(size=(tasks, q, 6, 6, 1)),
                   rng.integers(0, 3, size=(tasks, q)).astype(np.int32))


def _flat_grad(maml, batch):
  with tf.GradientTape() as tape:
    loss = maml.meta_loss(batch)
  grads = tape.gradient(loss, maml.model.trainable_variables)
  return np.concatenate([g.numpy().ravel() for g in grads])


def _rel_err(a, b):
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


CASES = {
    "mlp": (_mlp, "regression"),
    "batchnorm": (_batchnorm, "regression"),
    "layernorm": (_layernorm, "regression"),
    "conv_batchnorm_maxpool": (_conv_bn, "classification"),
}


def _maml(name, steps, first_order=False, vectorize="auto"):
  build, kind = CASES[name]
  loss = (keras.losses.MeanSquaredError(dtype=F64) if kind == "regression"
          else keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                          dtype=F64))
  return MAML(build(), loss, inner_lr=0.3, inner_steps=steps,
              first_order=first_order, vectorize=vectorize), kind


@pytest.mark.parametrize("execution", ["batched", "vectorized_map"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_second_order_meta_gradient_matches_finite_differences(name, steps,
                                                                execution,
                                                                meta_loss_fd):
  """Both the task-batched kernels and Keras' own layers (generic path)."""
  rng = np.random.default_rng(0)
  maml, kind = _maml(name, steps, vectorize=execution)
  assert maml.execution in (execution, "map_fn")
  batch = (_regression_batch(rng) if kind == "regression"
           else _classification_batch(rng))
  analytic = _flat_grad(maml, batch)
  numeric = meta_loss_fd(maml, batch, maml.model.trainable_variables)
  assert _rel_err(analytic, numeric) < 1e-4, (name, steps)


def test_finite_difference_check_detects_tf_moments_second_order_bug(
    monkeypatch, meta_loss_fd):
  """Without exact moments, TF's BatchNorm second derivatives are wrong."""
  import contextlib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(functional, "exact_moments", contextlib.nullcontext)
  rng = np.random.default_rng(0)
  maml, _ = _maml("batchnorm", 1, vectorize="vectorized_map")
  batch = _regression_batch(rng)
  err = _rel_err(_flat_grad(maml, batch),
                 meta_loss_fd(maml, batch, maml.model.trainable_variables))
  assert err > 1e-3   # the check has teeth: the stock gradient is off


def test_first_order_gradient_is_query_gradient_at_adapted_weights():
  rng = np.random.default_rng(1)
  maml, _ = _maml("batchnorm", 2, first_order=True)
  batch = _regression_batch(rng)
  fomaml = _flat_grad(maml, batch)
  # Definition: mean over tasks of grad L_query(theta'_i), evaluated at theta'_i.
  params, state = functional.read_weights(maml.model)
  expected = 0
  for i in range(batch.num_tasks):
    fast = params
    for _ in range(2):
      with tf.GradientTape() as t:
        t.watch(fast)
        pred, _ = functional.functional_call(maml.model, fast, state,
                                             batch.support_x[i])
        loss = maml.loss_fn(batch.support_y[i], pred)
      fast = [p - 0.3 * g for p, g in zip(fast, t.gradient(loss, fast))]
    fast = [tf.constant(f.numpy()) for f in fast]
    with tf.GradientTape() as t:
      t.watch(fast)
      pred, _ = functional.functional_call(maml.model, fast, state,
                                           batch.query_x[i])
      loss = maml.loss_fn(batch.query_y[i], pred)
    g = t.gradient(loss, fast)
    expected = expected + np.concatenate([x.numpy().ravel() for x in g])
  expected = expected / batch.num_tasks
  assert _rel_err(fomaml, expected) < 1e-10
  second, _ = _maml("batchnorm", 2, first_order=False)
  second.model.set_weights(maml.model.get_weights())
  assert _rel_err(_flat_grad(second, batch), fomaml) > 1e-3
