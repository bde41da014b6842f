"""The closed-form meta-gradient of Dense/MSE models, and XLA train_steps.

The closed form (:mod:`maml_tf.core.dense_chain`) must equal autodiff to
float64 round-off in every configuration it accepts, decline every model or
loss it does not implement, and the XLA-compiled ``train_steps`` must give
the graph executor's numbers and still stop at a NaN.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, TaskBatch
from maml_tf.core import dense_chain
from maml_tf.models.mlp import mlp
from maml_tf.tasks import sinusoid

F64_MSE = keras.losses.MeanSquaredError(dtype="float64")


def _net(in_dim, out_dim, widths, activations, use_bias=True):
  layers = [keras.Input((in_dim,), dtype="float64")]
  for width, act in zip(list(widths) + [out_dim], activations):
    layers.append(keras.layers.Dense(width, activation=act, dtype="float64",
                                     use_bias=use_bias))
  return keras.Sequential(layers)


def _batch(tasks, k, q, in_dim, out_dim, seed, flat_targets=False):
  rng = np.random.default_rng(seed)
  y_shape = (lambda n: (tasks, n)) if flat_targets else (
      lambda n: (tasks, n, out_dim))
  return TaskBatch(*(tf.constant(t) for t in (
      rng.normal(size=(tasks, k, in_dim)), rng.normal(size=y_shape(k)),
      rng.normal(size=(tasks, q, in_dim)), rng.normal(size=y_shape(q)))))


CASES = {
    # name: (in, out, widths, activations, steps, first_order, low_rank,
    #        use_bias, flat_targets)
    "paper_1_40_40_1": (1, 1, (40, 40), ("relu", "relu", None), 1, False,
                        True, True, True),
    "three_steps": (2, 3, (8, 6), ("relu", "relu", None), 3, False, True,
                    True, False),
    "per_task_kernels": (2, 3, (8, 6), ("relu", "relu", None), 2, False,
                         False, True, False),
    "first_order": (2, 3, (8,), ("relu", None), 2, True, True, True, False),
    "linear_hidden_relu_output": (3, 2, (7, 9), (None, "relu", "relu"), 2,
                                  False, True, True, False),
    "no_bias": (2, 2, (9, 9), ("relu", "relu", None), 2, False, True, False,
                False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_closed_form_equals_autodiff(case):
  (in_dim, out_dim, widths, acts, steps, first_order, low_rank, use_bias,
   flat) = CASES[case]
  keras.utils.set_random_seed(3)
  model = _net(in_dim, out_dim, widths, acts, use_bias)
  # 5 support examples: below the widths, so the kernels stay factored.
  batch = _batch(4, 5, 6, in_dim, out_dim, seed=7, flat_targets=flat)
  maml = MAML(model, F64_MSE, inner_lr=0.25, inner_steps=steps,
              first_order=first_order, vectorize="map_fn", closed_form=False)
  with tf.GradientTape() as tape:
    loss = maml.meta_loss(batch)
  expected = tape.gradient(loss, model.trainable_variables)
  before = maml.evaluate(batch, steps=(0,))["loss"]

  chain = dense_chain.analyse(model, F64_MSE)
  assert chain is not None and len(chain.relu) == len(widths) + 1
  params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
  grads, losses = dense_chain.meta_gradients(
      chain, params, batch, 0.25, steps, first_order, (0, steps),
      low_rank=low_rank)
  assert losses.shape == (4, 2)
  assert float(tf.reduce_mean(losses[:, 0])) == pytest.approx(
      float(np.ravel(before)[0]), rel=1e-12)
  assert float(tf.reduce_mean(losses[:, 1])) == pytest.approx(float(loss),
                                                              rel=1e-12)
  assert len(grads) == len(expected)
  for g, e in zip(grads, expected):
    assert g.shape == e.shape
    np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)
  # The XLA flavour (plain matmuls) gives the same numbers.
  xla_grads, _ = dense_chain.meta_gradients(
      chain, params, batch, 0.25, steps, first_order, (steps,), xla=True,
      low_rank=low_rank)
  for g, e in zip(xla_grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)


def test_what_the_closed_form_declines():
  ok = _net(2, 1, (4,), ("relu", None))
  assert dense_chain.analyse(ok, F64_MSE) is not None
  assert dense_chain.analyse(mlp(1, 1), "mse") is not None
  declined = {
      "tanh": (_net(2, 1, (4,), ("tanh", None)), F64_MSE),
      "mae loss": (ok, keras.losses.MeanAbsoluteError(dtype="float64")),
      "sum reduction": (ok, keras.losses.MeanSquaredError(
          reduction="sum", dtype="float64")),
      "float32 loss on a float64 model": (ok,
                                          keras.losses.MeanSquaredError()),
      "dropout": (keras.Sequential([keras.Input((2,)), keras.layers.Dense(4),
                                    keras.layers.Dropout(0.5),
                                    keras.layers.Dense(1)]), "mse"),
      "batch norm": (keras.Sequential([
          keras.Input((2,)), keras.layers.Dense(4),
          keras.layers.BatchNormalization(), keras.layers.Dense(1)]), "mse"),
      "regulariser": (keras.Sequential([
          keras.Input((2,)), keras.layers.Dense(
              1, kernel_regularizer="l2")]), "mse"),
      "image input": (keras.Sequential([keras.Input((3, 2)),
                                        keras.layers.Dense(1)]), "mse"),
  }
  x = keras.Input((2,))
  declined["functional"] = (keras.Model(x, keras.layers.Dense(1)(x)), "mse")
  for name, (model, loss) in declined.items():
    assert dense_chain.analyse(model, loss) is None, name


def test_maml_picks_the_closed_form_and_says_why_not():
  batch = _batch(3, 5, 5, 1, 1, seed=0)
  maml = MAML(mlp(1, 1, hidden=(8,)), "mse")
  assert maml.plan(batch).closed_form and maml.jit_compile
  for kwargs in ({"learn_inner_lr": "scalar"}, {"adapt": "head"},
                 {"multi_step_loss_iterations": 10}, {"recompute": True},
                 {"closed_form": False}):
    other = MAML(mlp(1, 1, hidden=(8,)), "mse", **kwargs)
    assert not other.plan(batch).closed_form and not other.jit_compile, kwargs
  with pytest.raises(ValueError, match="closed_form=True is not possible: "
                     "learned inner step sizes"):
    MAML(mlp(1, 1, hidden=(8,)), "mse", learn_inner_lr="scalar",
         closed_form=True)
  with pytest.raises(ValueError, match="Sequential of Dense layers"):
    MAML(mlp(1, 1, hidden=(8,), activation="tanh"), "mse", closed_form=True)
  with pytest.raises(ValueError, match="closed_form must be"):
    MAML(mlp(1, 1, hidden=(8,)), "mse", closed_form="yes")
  with pytest.raises(ValueError, match="jit_compile must be"):
    MAML(mlp(1, 1, hidden=(8,)), "mse", jit_compile="auto")


def test_train_step_with_the_closed_form_equals_autodiff():
  batch = _batch(3, 4, 5, 2, 2, seed=1)
  runs = []
  # Autodiff; the closed form; the closed form one task chunk at a time.
  for closed_form, chunk in ((False, None), (True, None), (True, 1)):
    keras.utils.set_random_seed(9)
    maml = MAML(_net(2, 2, (6, 6), ("relu", "relu", None)), F64_MSE,
                inner_lr=0.1, inner_steps=2, closed_form=closed_form,
                task_chunk=chunk, meta_optimizer=keras.optimizers.SGD(0.05))
    assert maml.plan(batch).closed_form == closed_form
    metrics = [maml.train_step(batch) for _ in range(3)]
    runs.append((metrics, [v.numpy() for v in maml.model.weights]))
  (m0, w0) = runs[0]
  for m1, w1 in runs[1:]:
    for a, b in zip(m1, m0):
      assert a.keys() == b.keys() == {"loss_before", "loss_after"}
      for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-12)
    for a, b in zip(w1, w0):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
  keras.utils.set_random_seed(9)
  initial = _net(2, 2, (6, 6), ("relu", "relu", None)).weights[0].numpy()
  assert np.abs(w0[0] - initial).max() > 1e-3     # the steps did something


def _pool_sampler(nan_from=None):
  """``iteration -> TaskBatch`` from a fixed pool (no random ops, so the
  graph executor and XLA see the same tasks); NaN targets from
  ``nan_from`` on."""
  pool = sinusoid.sample_batch(6 * 5, 5, 5, np.random.default_rng(0))[0]
  pool = [tf.reshape(tf.constant(t, tf.float32), (5, 6) + t.shape[1:])
          for t in pool]

  def sample(iteration):
    i = tf.cast(iteration, tf.int32) % 5
    sx, sy, qx, qy = (tf.gather(t, i) for t in pool)
    if nan_from is not None:
      qy = qy * tf.where(iteration >= nan_from, np.nan, 1.0)
    return TaskBatch(sx, sy, qx, qy)
  return sample


def test_xla_train_steps_equal_the_graph_and_stop_at_nan():
  sample = _pool_sampler()
  runs = []
  for jit in (True, False):
    keras.utils.set_random_seed(4)
    maml = MAML(mlp(1, 1, hidden=(8, 8)), "mse", inner_lr=0.01,
                jit_compile=None if jit else False)
    assert maml.jit_compile == jit
    metrics = {k: float(v) for k, v in maml.train_steps(sample, 6).items()}
    runs.append((metrics, [v.numpy() for v in maml.model.weights],
                 int(maml.meta_optimizer.iterations)))
  (m1, w1, i1), (m2, w2, i2) = runs
  assert i1 == i2 == 6
  assert m1["loss_after"] == pytest.approx(m2["loss_after"], rel=1e-5)
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  # Under XLA check_numerics does nothing: the loop's own test stops it
  # before the first non-finite update, with the graph path's error.
  bad = _pool_sampler(nan_from=9)
  keras.utils.set_random_seed(4)
  maml = MAML(mlp(1, 1, hidden=(8, 8)), "mse", inner_lr=0.01)
  maml.train_steps(sample, 6)
  with pytest.raises(FloatingPointError,
                     match=r"meta-loss \(query loss after adaptation\) is "
                     "NaN or Inf. The meta-parameters were not updated"):
    maml.train_steps(bad, 6)
  assert int(maml.meta_optimizer.iterations) == 9
  assert all(np.isfinite(v.numpy()).all() for v in maml.model.weights)


def test_xla_that_cannot_compile_falls_back_with_a_warning():
  good = _pool_sampler()

  def sample(iteration):    # tf.py_function: not compilable by XLA
    shifted = tf.py_function(lambda i: i + 0, [iteration], tf.int64)
    return good(tf.reshape(shifted, []))
  keras.utils.set_random_seed(4)
  maml = MAML(mlp(1, 1, hidden=(8, 8)), "mse", inner_lr=0.01)
  assert maml.jit_compile
  with pytest.warns(UserWarning, match="XLA could not compile train_steps"):
    metrics = maml.train_steps(sample, 3)
  assert not maml.jit_compile and np.isfinite(float(metrics["loss_after"]))
  assert int(maml.meta_optimizer.iterations) == 3
