"""Mixed precision: float32 variables and inner steps, low-precision compute,
meta-gradients that agree with float32, loss scaling under float16."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, TaskBatch

# Relative error of the meta-gradient against float32 (norm of the
# difference over the norm): bfloat16 keeps 8 mantissa bits, float16 11.
TOLERANCE = {"mixed_bfloat16": 5e-2, "mixed_float16": 5e-3}
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@contextlib.contextmanager
def _policy(name):
  old = keras.config.dtype_policy()
  keras.mixed_precision.set_global_policy(name)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(old)


def _model():
  keras.utils.set_random_seed(0)
  return keras.Sequential([
      keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="tanh"),
      keras.layers.BatchNormalization(), keras.layers.Flatten(),
      keras.layers.Dense(5)])


def _batch():
  rng = np.random.default_rng(0)
  x = lambda: rng.normal(size=(4, 5, 8, 8, 1)).astype("float32")
  y = lambda: rng.integers(0, 5, size=(4, 5)).astype("int32")
  return TaskBatch(x(), y(), x(), y())


def _grads(maml):
  batch = maml.prepare(_batch())
  return maml.compute_gradients(batch, maml.plan(batch)).grads


@pytest.mark.parametrize("policy", sorted(TOLERANCE))
def test_meta_gradient_agrees_with_float32(policy):
  want = _grads(MAML(_model(), LOSS, inner_lr=0.1))
  with _policy(policy):
    model = _model()
    maml = MAML(model, LOSS, inner_lr=0.1, meta_optimizer=(
        keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(),
                                            initial_scale=2.0 ** 6)
        if policy == "mixed_float16" else None))
  assert model.layers[0].compute_dtype == policy.split("_")[1]
  assert {v.dtype for v in model.weights} == {"float32"}
  got = _grads(maml)
  assert {g.dtype for g in got} == {tf.float32}
  errors = [float(tf.norm(g - w) / tf.norm(w)) for g, w in zip(got, want)]
  print(policy, "relative errors", np.round(errors, 5))
  assert max(errors) < TOLERANCE[policy], errors
  assert max(errors) > 0          # it really ran in low precision
  metrics = maml.train_step(_batch())
  assert all(np.isfinite(v) for v in metrics.values())


def test_float16_scales_losses_and_steps_like_float32():
  with _policy("mixed_float16"):
    maml = MAML(_model(), LOSS, inner_lr=0.1)   # default: loss-scaled Adam
    assert isinstance(maml.meta_optimizer, keras.optimizers.LossScaleOptimizer)
    scaled = MAML(_model(), LOSS, inner_lr=0.1,
                  meta_optimizer=keras.optimizers.LossScaleOptimizer(
                      keras.optimizers.SGD(0.1), initial_scale=2.0 ** 6))
    with pytest.warns(UserWarning, match="LossScaleOptimizer"):
      plain = MAML(_model(), LOSS, inner_lr=0.1,
                   meta_optimizer=keras.optimizers.SGD(0.1))
  # The default scale (2**15) overflows the inner backward pass at first:
  # those steps are skipped and the scale halved until steps go through.
  start = maml.meta_optimizer.dynamic_scale.numpy()
  losses = [maml.train_step(_batch())["loss_after"] for _ in range(12)]
  assert maml.meta_optimizer.dynamic_scale.numpy() < start
  assert np.isnan(losses[0]) and np.all(np.isfinite(losses[-3:])), losses
  assert maml.meta_optimizer.iterations.numpy() > 0
  # A scale that fits multiplies the inner and outer losses and is divided
  # out exactly: the update is the unscaled one.
  before = [v.numpy() for v in scaled.model.trainable_variables]
  for learner in (scaled, plain):
    learner.train_step(_batch())
  for b, s, p in zip(before, scaled.model.trainable_variables,
                     plain.model.trainable_variables):
    step_s, step_p = s.numpy() - b, p.numpy() - b
    assert np.abs(step_s).max() > 0
    np.testing.assert_allclose(step_s, step_p, rtol=2e-2,
                               atol=2e-3 * np.abs(step_p).max())


def test_float16_inner_overflow_is_skipped_even_where_tanh_hides_it():
  """An inner gradient that overflows under the loss scale makes the step
  NaN (skipped, scale halved), also where a saturating tanh would keep the
  query loss finite on infinite adapted weights: training then follows
  the float32 objective, and evaluate and adapt match float32."""
  rng = np.random.default_rng(0)
  batch = TaskBatch(*[rng.normal(size=s).astype("float32") for s in
                      [(2, 5, 3), (2, 5, 1), (2, 6, 3), (2, 6, 1)]])
  results = {}
  for policy in ("float32", "mixed_float16"):
    with _policy(policy):
      keras.utils.set_random_seed(8)
      maml = MAML(keras.Sequential([
          keras.Input((3,)), keras.layers.Dense(8, activation="tanh"),
          keras.layers.Dense(1, dtype="float32")]), "mse", inner_lr=0.1)
    if policy == "mixed_float16":
      start = maml.meta_optimizer.dynamic_scale.numpy()
      # 2**15 times the first kernel's gradient (about 2.6) overflows.
      assert np.isnan(maml.evaluate(batch, steps=(1,))["loss"][0])
    for _ in range(20):
      maml.train_step(batch)
    adapted = maml.adapt(batch.support_x[0], batch.support_y[0])
    assert all(np.isfinite(v.numpy()).all() for v in adapted.weights)
    results[policy] = (maml.evaluate(batch, steps=(0, 1))["loss"],
                       adapted(batch.query_x[0]).numpy())
  assert maml.meta_optimizer.dynamic_scale.numpy() < start
  np.testing.assert_allclose(results["mixed_float16"][0],
                             results["float32"][0], rtol=2e-2)
  np.testing.assert_allclose(results["mixed_float16"][1],
                             results["float32"][1], rtol=5e-2, atol=5e-3)


def test_float16_overflow_under_xla_is_the_optimizer_s_to_skip():
  """Under XLA as in the graph executor, an overflowed loss-scaled step is
  skipped by the LossScaleOptimizer (scale halved), not reported as an
  error; train_steps keeps going past it."""
  with _policy("mixed_float16"):
    maml = MAML(_model(), LOSS, inner_lr=0.1, jit_compile=True)
  assert maml.plan(_batch()).xla
  start = maml.meta_optimizer.dynamic_scale.numpy()
  losses = [maml.train_step(_batch())["loss_after"] for _ in range(3)]
  assert np.isnan(losses[0]), losses
  assert maml.meta_optimizer.dynamic_scale.numpy() < start
  # A loop whose first step overflows goes on with the lowered scale.
  with _policy("mixed_float16"):
    looped = MAML(_model(), LOSS, inner_lr=0.1, jit_compile=True)
  batch = looped.prepare(_batch())
  looped.train_steps(lambda iteration: batch, 10)
  assert looped.meta_optimizer.dynamic_scale.numpy() < start
  assert looped.meta_optimizer.iterations.numpy() >= 5
