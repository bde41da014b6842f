"""The MAML family on one core: Meta-SGD, ANIL, MAML++ pieces, Reptile."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, Reptile, TaskBatch, adapt_params
from maml_tf.core import functional
from maml_tf.core.maml import multi_step_loss_weights

F64 = "float64"


def _mlp64():
  return keras.Sequential([
      keras.Input((2,), dtype=F64),
      keras.layers.Dense(5, activation="tanh", dtype=F64, name="body"),
      keras.layers.Dense(1, dtype=F64, name="head")])


def _batch(seed=0, tasks=3, k=4, q=5):
  rng = np.random.default_rng(seed)
  sx, qx = rng.normal(size=(tasks, k, 2)), rng.normal(size=(tasks, q, 2))
  w = rng.normal(size=(tasks, 2, 1))
  return TaskBatch(sx, np.sin(sx @ w), qx, np.sin(qx @ w))


def _mse64():
  return keras.losses.MeanSquaredError(dtype=F64)


def _grads(maml, batch, variables):
  with tf.GradientTape() as tape:
    loss = maml.meta_loss(batch)
  return [g.numpy() for g in tape.gradient(loss, variables)]


@pytest.mark.parametrize("mode", ["scalar", "per_parameter",
                                  "per_layer_per_step"])
def test_learned_inner_lr_gradients_match_finite_differences(mode,
                                                            meta_loss_fd):
  maml = MAML(_mlp64(), _mse64(), inner_lr=0.2, inner_steps=2,
              learn_inner_lr=mode)
  batch = _batch()
  lrs = maml.inner_lr_variables
  if mode == "per_parameter":
    assert [tuple(v.shape) for v in lrs] == [
        tuple(v.shape) for v in maml.model.trainable_variables]
  elif mode == "per_layer_per_step":
    assert all(tuple(v.shape) == (2,) for v in lrs)
  analytic = _grads(maml, batch, lrs)
  for var, g in zip(lrs, analytic):
    np.testing.assert_allclose(g.ravel(), meta_loss_fd(maml, batch, [var]),
                               rtol=1e-5, atol=1e-9)
  before = [v.numpy().copy() for v in lrs]
  maml.train_step(batch)
  assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, lrs))


def test_anil_adapts_only_the_head_and_its_meta_gradient_is_exact(
    meta_loss_fd):
  maml = MAML(_mlp64(), _mse64(), inner_lr=0.3, inner_steps=2, adapt="head")
  assert maml.adapt_mask == [False, False, True, True]
  batch = _batch(1)
  adapted = maml.adapt(batch.support_x[0], batch.support_y[0])
  for a, b, m in zip(adapted.trainable_variables,
                     maml.model.trainable_variables, maml.adapt_mask):
    assert np.allclose(a.numpy(), b.numpy()) != m
  variables = maml.model.trainable_variables
  analytic = _grads(maml, batch, variables)
  for var, g in zip(variables, analytic):
    np.testing.assert_allclose(g.ravel(), meta_loss_fd(maml, batch, [var]),
                               rtol=1e-5, atol=1e-9)
  same = MAML(_mlp64(), _mse64(), inner_lr=0.3, inner_steps=2,
              adapt=["head"], vectorize="map_fn")
  same.model.set_weights(maml.model.get_weights())
  for a, b in zip(_grads(same, batch, same.model.trainable_variables),
                  analytic):
    np.testing.assert_allclose(a, b, rtol=1e-10)
  with pytest.raises(ValueError, match="does not have"):
    MAML(_mlp64(), _mse64(), adapt=["nope"])


def test_multi_step_loss_weights_anneal_to_the_last_step():
  w0 = multi_step_loss_weights(0, 5, 100).numpy()
  np.testing.assert_allclose(w0, np.full(5, 0.2), rtol=1e-6)
  w_end = multi_step_loss_weights(1000, 5, 100).numpy()
  np.testing.assert_allclose(w_end[:4], 0.03 / 5, rtol=1e-6)
  assert w_end[-1] == pytest.approx(1 - 4 * 0.03 / 5)
  maml = MAML(_mlp64(), _mse64(), inner_lr=0.2, inner_steps=3,
              multi_step_loss_iterations=50)
  metrics = maml.train_step(_batch())
  assert "meta_loss" in metrics
  assert metrics["meta_loss"] != pytest.approx(metrics["loss_after"])


def test_first_order_until_switches_to_second_order():
  maml = MAML(_mlp64(), _mse64(), inner_lr=0.2, first_order_until=2,
              meta_optimizer=keras.optimizers.SGD(0.01))
  for _ in range(3):
    maml.train_step(_batch())
  orders = sorted(k[-1].first_order for k in maml.compiled if k[0] == "train")
  assert orders == [False, True]


def test_reptile_step_moves_theta_toward_the_adapted_weights():
  keras.utils.set_random_seed(0)
  reptile = Reptile(_mlp64(), _mse64(), inner_lr=0.1, inner_steps=3,
                    outer_step_size=0.5)
  batch = _batch(2)
  params, state = functional.read_weights(reptile.model)
  adapted = []
  for t in range(batch.num_tasks):
    fast, _ = adapt_params(reptile.model, reptile.loss_fn, params, state,
                           tf.constant(batch.support_x[t]),
                           tf.constant(batch.support_y[t]), 0.1, 3)
    adapted.append([f.numpy() for f in fast])
  metrics = reptile.train_step(batch)
  for i, (p, v) in enumerate(zip(params, reptile.model.trainable_variables)):
    mean = np.mean([a[i] for a in adapted], axis=0)
    np.testing.assert_allclose(v.numpy(), p.numpy() + 0.5 * (mean - p.numpy()),
                               rtol=1e-10, atol=1e-12)
  assert metrics["loss_after"] < metrics["loss_before"]
  with pytest.raises(NotImplementedError):
    reptile.meta_loss(batch)


@pytest.mark.parametrize("execution", ["batched", "map_fn"])
def test_recompute_gives_the_same_meta_gradient(execution):
  batch = _batch(4)
  grads = []
  for recompute in (False, True):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((2,), dtype=F64),
        keras.layers.Dense(5, dtype=F64),
        keras.layers.BatchNormalization(dtype=F64),
        keras.layers.Activation("tanh", dtype=F64),
        keras.layers.Dense(1, dtype=F64)])
    maml = MAML(model, _mse64(), inner_lr=0.2, inner_steps=3,
                learn_inner_lr="per_layer_per_step", recompute=recompute,
                vectorize=execution)
    variables = maml.meta_variables
    with tf.GradientTape() as tape:
      loss = maml.meta_loss(batch)
    grads.append([g.numpy() for g in tape.gradient(loss, variables)])
    maml.train_step(batch)
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_checkpointed_query_pass_is_exact(adapt):
  """recompute=True recomputes the query pass a task chunk at a time."""
  from maml_tf.core.plan import query_chunk_size  # pylint: disable=g-import-not-at-top
  assert query_chunk_size(32, 5, 75) == 2      # Omniglot 5w1s
  assert query_chunk_size(32, 5, 5) == 32      # 1 query per class
  assert query_chunk_size(4, 2, 6) == 1
  calls = []
  rng = np.random.default_rng(5)
  batch = TaskBatch(rng.normal(size=(4, 2, 3)), rng.integers(0, 3, (4, 2)),
                    rng.normal(size=(4, 6, 3)), rng.integers(0, 3, (4, 6)))
  grads, metrics = [], []
  for recompute in (False, True):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((3,), dtype=F64),
        keras.layers.Dense(6, dtype=F64),
        keras.layers.BatchNormalization(dtype=F64),
        keras.layers.Activation("relu", dtype=F64),
        keras.layers.Dense(3, dtype=F64, name="head")])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      dtype=F64)
    maml = MAML(model, loss, inner_lr=0.3, inner_steps=2, adapt=adapt,
                recompute=recompute, vectorize="batched", task_chunk=None)
    if recompute:
      calls.append(maml.plan(batch).query_chunk)
    with tf.GradientTape() as tape:
      meta = maml.meta_loss(batch)
    grads.append([g.numpy() for g in
                  tape.gradient(meta, maml.model.trainable_variables)])
    metrics.append(maml.train_step(batch))
  assert calls and set(calls) == {1}
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
  assert any(np.abs(g).max() > 1e-3 for g in grads[0])
  for key in ("loss_after", "accuracy_after"):
    np.testing.assert_allclose(metrics[0][key], metrics[1][key], rtol=1e-12)


def test_make_learner_names_the_family():
  from maml_tf.core import family  # pylint: disable=g-import-not-at-top
  kw = dict(inner_lr=0.1, inner_steps=2, meta_lr=1e-3, iterations=300)
  made = {a: family.make_learner(a, _mlp64(), _mse64(), **kw)
          for a in family.ALGORITHMS}
  assert made["fomaml"].first_order and not made["maml"].first_order
  assert made["metasgd"].learn_inner_lr == "per_parameter"
  assert made["anil"].adapt_mask == [False, False, True, True]
  pp = made["mamlpp"]
  assert (pp.learn_inner_lr, pp.multi_step_loss_iterations,
          pp.first_order_until) == ("per_layer_per_step", 30, 100)
  assert isinstance(made["reptile"], Reptile)
  for learner in made.values():
    assert np.isfinite(learner.train_step(_batch())["loss_after"])
  with pytest.raises(ValueError, match="unknown algorithm 'maml2'"):
    family.make_learner("maml2", _mlp64(), _mse64(), **kw)


def test_cosine_meta_lr_schedule_decays_through_the_fused_step():
  from maml_tf.core import family  # pylint: disable=g-import-not-at-top

  class KerasAdam(keras.optimizers.Adam):   # not fused: Keras' own update
    pass

  def mlp32():   # float32, so the fused Adam applies
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(5, "tanh"),
                             keras.layers.Dense(1)])

  kw = dict(inner_lr=0.1, inner_steps=1, meta_lr=1e-2, iterations=4)
  cosine = family.make_learner("maml", mlp32(), "mse",
                               meta_lr_schedule="cosine", **kw)
  reference = family.make_learner(
      "maml", mlp32(), "mse", meta_optimizer=KerasAdam(
          keras.optimizers.schedules.CosineDecay(1e-2, 4, alpha=0.01)), **kw)
  rates = []
  for i in range(6):
    rates.append(float(cosine.meta_optimizer.learning_rate))
    for learner in (cosine, reference):
      learner.train_step(_batch(seed=i))
  # 1e-2 * (0.99 * (1 + cos(pi * t / 4)) / 2 + 0.01), flat after t = 4.
  t = np.minimum(np.arange(6), 4)
  np.testing.assert_allclose(
      rates, 1e-2 * (0.99 * (1 + np.cos(np.pi * t / 4)) / 2 + 0.01), rtol=1e-6)
  for a, b, init in zip(cosine.model.trainable_variables,
                        reference.model.trainable_variables,
                        mlp32().trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(a.numpy() - init.numpy()).max() > 1e-3   # it trained
  assert family.resolve_meta_lr_schedule("auto", "mamlpp") == "cosine"
  assert family.resolve_meta_lr_schedule("auto", "maml") == "constant"
  with pytest.raises(ValueError, match="meta_lr_schedule must be one of"):
    family.resolve_meta_lr_schedule("linear", "maml")
  with pytest.raises(ValueError, match="not available for reptile"):
    family.make_learner("reptile", _mlp64(), _mse64(),
                        meta_lr_schedule="cosine", **kw)
