"""Every execution strategy x option equals the mapped reference (float64).

The reference is ``tf.map_fn`` of the per-task function (``vectorize=False``,
all tasks at once). Each case takes two meta-steps and compares the metrics,
every weight (BatchNorm moving statistics included) and the learned step
sizes, and checks the plan really ran the strategy named.
"""

import keras
import numpy as np
import pytest

from maml_tf import MAML, TaskBatch

F64 = "float64"
STRATEGIES = {
    # name: (MAML options, plan fields that must hold)
    "batched": ({"vectorize": "batched", "task_chunk": None},
                {"execution": "batched", "task_chunk": None}),
    "vectorized_map": ({"vectorize": True, "task_chunk": None},
                       {"execution": "vectorized_map", "task_chunk": None}),
    "split_chunks": ({"vectorize": "batched", "task_chunk": 2},
                     {"execution": "batched", "task_chunk": 2}),
    "chunked": ({"vectorize": True, "task_chunk": 2},
                {"execution": "vectorized_map", "task_chunk": 2,
                 "split_gradients": False}),
}
OPTIONS = {
    "maml": {},
    "first_order": {"first_order": True},
    "recompute": {"recompute": True},
    "anil": {"adapt": "head"},
    "metasgd": {"learn_inner_lr": "per_parameter"},
    "mamlpp": {"learn_inner_lr": "per_layer_per_step",
               "multi_step_loss_iterations": 10},
}


def _classifier():
  return keras.Sequential([
      keras.Input((5,), dtype=F64),
      keras.layers.Dense(6, activation="tanh", dtype=F64),
      keras.layers.BatchNormalization(dtype=F64),
      keras.layers.Dense(3, dtype=F64, name="head")])


def _class_batch():
  rng = np.random.default_rng(2)
  labels = lambda n: np.tile(np.repeat(np.arange(3), n), (4, 1)).astype("i4")
  return TaskBatch(rng.normal(size=(4, 6, 5)), labels(2),
                   rng.normal(size=(4, 9, 5)), labels(3))


def _run(model_fn, loss, batch, **kwargs):
  keras.utils.set_random_seed(21)
  maml = MAML(model_fn(), loss, inner_lr=0.3, inner_steps=2,
              meta_optimizer=keras.optimizers.SGD(0.1), **kwargs)
  metrics = [maml.train_step(batch) for _ in range(2)]
  return maml, metrics, ([v.numpy() for v in maml.model.weights]
                         + [v.numpy() for v in maml.inner_lr_variables])


def _assert_same(got, want):
  (m1, w1), (m2, w2) = got, want
  for a, b in zip(m1, m2):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k
  assert len(w1) == len(w2)
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


_REFERENCES = {}


def _reference(option):
  if option not in _REFERENCES:
    maml, metrics, weights = _run(
        _classifier, keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, dtype=F64), _class_batch(), vectorize=False,
        task_chunk=None, **OPTIONS[option])
    assert maml.plan(_class_batch()).execution == "map_fn"
    _REFERENCES[option] = (metrics, weights)
  return _REFERENCES[option]


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_strategy_equals_the_mapped_reference(strategy, option):
  kwargs, fields = STRATEGIES[strategy]
  batch = _class_batch()
  maml, metrics, weights = _run(
      _classifier, keras.losses.SparseCategoricalCrossentropy(
          from_logits=True, dtype=F64), batch, **kwargs, **OPTIONS[option])
  plan = maml.plan(batch)
  for k, v in fields.items():
    assert getattr(plan, k) == v, (k, plan)
  if strategy == "split_chunks":
    # The query-side split runs unless recompute or the multi-step loss
    # ask for the whole meta-gradient chunk by chunk.
    assert plan.split_gradients == (option not in ("recompute", "mamlpp"))
  assert plan.recompute == (option == "recompute")
  metrics_ref, weights_ref = _reference(option)
  assert metrics[1]["loss_after"] != pytest.approx(metrics[0]["loss_after"])
  _assert_same((metrics, weights), (metrics_ref, weights_ref))


def _regressor():
  return keras.Sequential([
      keras.Input((2,), dtype=F64),
      keras.layers.Dense(6, activation="relu", dtype=F64),
      keras.layers.Dense(6, activation="relu", dtype=F64),
      keras.layers.Dense(2, dtype=F64)])


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("chunk", [None, 2])
def test_closed_form_equals_the_mapped_reference(first_order, chunk):
  rng = np.random.default_rng(4)
  batch = TaskBatch(*(rng.normal(size=s) for s in
                      ((4, 5, 2), (4, 5, 2), (4, 7, 2), (4, 7, 2))))
  loss = keras.losses.MeanSquaredError(dtype=F64)
  maml, metrics, weights = _run(_regressor, loss, batch, closed_form=True,
                                task_chunk=chunk, first_order=first_order)
  plan = maml.plan(batch)
  assert plan.closed_form and plan.task_chunk == chunk
  ref = _run(_regressor, loss, batch, closed_form=False, vectorize=False,
             task_chunk=None, first_order=first_order)
  _assert_same((metrics, weights), ref[1:])


def _weights(model):
  return [v.numpy().copy() for v in model.weights]


@pytest.mark.parametrize("kwargs", [{}, {"learn_inner_lr": "per_parameter"},
                                    {"adapt": "head"}, {"recompute": True}])
def test_task_chunks_give_the_same_update_as_all_tasks_at_once(
    kwargs, conv_bn_f64):
  """Task chunks, on the query side only or whole, are exact."""
  split_calls = []
  batch = conv_bn_f64.batch(4, seed=3)
  runs = {}
  for chunk in (None, 1, 3):         # 3 does not divide 4: chunks of 2
    keras.utils.set_random_seed(11)
    maml = MAML(conv_bn_f64(), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, dtype="float64"), inner_lr=0.1, inner_steps=2,
                meta_optimizer=keras.optimizers.SGD(0.05), task_chunk=chunk,
                **kwargs)
    plan = maml.plan(batch)
    assert plan.task_chunk == {None: None, 1: 1, 3: 2}[chunk]
    if plan.split_gradients:
      split_calls.append(plan.task_chunk)
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


def _dropout_classifier():
  return keras.Sequential([
      keras.Input((5,), dtype=F64),
      keras.layers.Dense(6, activation="tanh", dtype=F64),
      keras.layers.Dropout(0.3, dtype=F64),
      keras.layers.GaussianNoise(0.2, dtype=F64),
      keras.layers.BatchNormalization(dtype=F64),
      keras.layers.Dense(3, dtype=F64, name="head")])


@pytest.mark.parametrize("option", ["maml", "recompute", "mamlpp"])
@pytest.mark.parametrize("strategy", ["batched", "split_chunks"])
def test_random_layers_draw_the_mapped_masks_on_the_batched_path(strategy,
                                                                 option):
  """Dropout and GaussianNoise on the task-batched path: each task's masks
  and noise are the ones the per-task reference draws (support steps, query passes, task chunks,
  recomputed query chunks), so every number is the reference's."""
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                    dtype=F64)
  batch = _class_batch()
  kwargs, fields = STRATEGIES[strategy]
  options = OPTIONS[option]
  maml, metrics, weights = _run(_dropout_classifier, loss, batch, **kwargs,
                                **options)
  plan = maml.plan(batch)
  for k, v in fields.items():
    assert getattr(plan, k) == v, (k, plan)
  if strategy == "batched" and option == "recompute":
    assert plan.query_chunk == 2            # recomputed query chunks
  ref, ref_metrics, ref_weights = _run(
      _dropout_classifier, loss, batch, vectorize=False, task_chunk=None,
      **options)
  assert ref.plan(batch).execution == "map_fn"
  assert metrics[1]["loss_after"] != pytest.approx(metrics[0]["loss_after"])
  _assert_same((metrics, weights), (ref_metrics, ref_weights))
  # Masks matter: without Dropout the numbers differ.
  _, plain, _ = _run(_classifier, loss, batch, **kwargs, **OPTIONS[option])
  assert plain[0]["loss_after"] != pytest.approx(metrics[0]["loss_after"])


def test_recomputed_per_task_steps_with_a_frozen_body():
  """map_fn + recompute + ANIL: the body passes through the checkpointed
  inner step unchanged (it failed with tf.custom_gradient's 'outputs
  should be from the same graph'); the numbers are the plain step's."""
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                    dtype=F64)
  maml, metrics, weights = _run(_classifier, loss, _class_batch(),
                                vectorize=False, task_chunk=None,
                                recompute=True, adapt="head")
  assert maml.plan(_class_batch()).recompute
  _assert_same((metrics, weights), _reference("anil"))
