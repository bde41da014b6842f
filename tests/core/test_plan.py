"""resolve_plan: every "auto" resolved in one place, table-driven.

Config x batch shape x device -> the plan's fields; then MAML.plan() agrees
with the pure function, and a runtime fallback produces a new plan.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import PlanWarning, MAML, ExecutionPlan, TaskBatch
from maml_tf.core.plan import (BatchShape, Device, ModelFacts, Options,
                               query_chunk_size, resolve_execution,
                               resolve_plan)
from maml_tf.models.mlp import mlp
from maml_tf.tasks import sinusoid

CPU1, CPU2 = Device(cpus=1), Device(cpus=2)
GPU = Device(gpu=True, cpus=8)
DIST = Device(cpus=2, distributed=True)
CONV = ModelFacts("batched", has_conv=True, fused_update=True)
MLP = ModelFacts("batched", closed_form=True, fused_update=True)
MAPPED = ModelFacts("vectorized_map", fused_update=True)
# Omniglot 5-way 1-shot: 5 support + 75 query (large) or 5 query (small).
LARGE = BatchShape(32, 5, 75, 784, True)
SMALL = BatchShape(32, 5, 5, 784, True)
SINE = BatchShape(25, 10, 10, 1, False)

# (name, options, facts, shape, device, first_order, expected fields)
TABLE = [
    ("conv large cpu: one task at a time, query side", Options(), CONV, LARGE,
     CPU1, False, dict(execution="batched", conv_impl="map",
                       support_conv_impl="patches", task_chunk=1,
                       split_gradients=True, chunks_in_flight=1,
                       closed_form=False, xla=False, accuracy=True)),
    ("two cpus: two chunks in flight", Options(), CONV, LARGE, CPU2, False,
     dict(task_chunk=1, chunks_in_flight=2)),
    ("20-way 1-shot: support sets too large for im2col", Options(), CONV,
     BatchShape(16, 20, 300, 784, True), CPU1, False,
     dict(conv_impl="map", support_conv_impl="map", task_chunk=1,
          split_gradients=True)),
    ("conv small cpu: im2col, all at once", Options(), CONV, SMALL, CPU2,
     False, dict(conv_impl="patches", task_chunk=None, split_gradients=False,
                 chunks_in_flight=1)),
    ("gpu: grouped, all at once", Options(), CONV, LARGE, GPU, False,
     dict(conv_impl="grouped", support_conv_impl="grouped", task_chunk=None)),
    ("explicit conv_impl is kept", Options(conv_impl="map"), CONV, LARGE,
     CPU1, False, dict(conv_impl="map", support_conv_impl="map",
                       task_chunk=1)),
    ("explicit chunk: largest divisor", Options(task_chunk=5), CONV, LARGE,
     CPU1, False, dict(task_chunk=4, split_gradients=True)),
    ("chunk of the whole batch is no chunk", Options(task_chunk=40), CONV,
     LARGE, CPU1, False, dict(task_chunk=None, split_gradients=False)),
    ("recompute: whole meta-gradient chunked; one task needs no query "
     "chunks", Options(recompute=True), CONV, LARGE, CPU1, False,
     dict(recompute=True, task_chunk=1, split_gradients=False,
          query_chunk=None)),
    ("recompute, all tasks at once: query checkpointed in chunks",
     Options(recompute=True, task_chunk=None), CONV, LARGE, CPU1, False,
     dict(recompute=True, task_chunk=None,
          query_chunk=query_chunk_size(32, 5, 75))),
    ("recompute, chunks of 8: query chunks sized for one chunk",
     Options(recompute=True, task_chunk=8), CONV, LARGE, CPU1, False,
     dict(task_chunk=8, query_chunk=query_chunk_size(8, 5, 75))),
    ("recompute off in first order", Options(recompute=True), CONV, LARGE,
     CPU1, True, dict(recompute=False, query_chunk=None, split_gradients=True,
                      first_order=True)),
    ("multi-step loss: no split", Options(multi_step=True), CONV, LARGE, CPU1,
     False, dict(task_chunk=1, split_gradients=False)),
    ("sinusoid: closed form under XLA", Options(), MLP, SINE, CPU2, False,
     dict(conv_impl=None, task_chunk=None, closed_form=True, xla=True,
          fused_update=True, accuracy=False)),
    ("jit_compile=False", Options(jit_compile=False), MLP, SINE, CPU2, False,
     dict(closed_form=True, xla=False)),
    ("jit_compile=True without closed form", Options(jit_compile=True),
     MAPPED, SINE, CPU1, False, dict(closed_form=False, xla=True)),
    ("accuracy forced: no closed form, no XLA", Options(accuracy=True), MLP,
     SINE, CPU1, False, dict(closed_form=False, xla=False, accuracy=True)),
    ("distributed: no XLA, no fused Adam", Options(), MLP, SINE, DIST, False,
     dict(closed_form=True, xla=False, fused_update=False)),
    ("mapped conv model: no conv_impl, no auto chunk", Options(),
     ModelFacts("vectorized_map", has_conv=True), LARGE, CPU1, False,
     dict(execution="vectorized_map", conv_impl=None, task_chunk=None,
          split_gradients=False)),
    ("mapped with explicit chunk: whole meta-gradient", Options(task_chunk=8),
     MAPPED, LARGE, CPU1, False, dict(task_chunk=8, split_gradients=False)),
    ("unknown task count: no chunk", Options(task_chunk=2), CONV,
     BatchShape(None, 5, 75, 784, True), CPU1, False,
     dict(task_chunk=None, num_tasks=None)),
]


@pytest.mark.parametrize("name,options,facts,shape,device,first_order,want",
                         TABLE, ids=[row[0] for row in TABLE])
def test_resolve_plan_table(name, options, facts, shape, device, first_order,
                            want):
  plan = resolve_plan(options, facts, shape, device, first_order)
  assert isinstance(plan, ExecutionPlan)
  got = {k: getattr(plan, k) for k in want}
  assert got == want, name
  hash(plan)                               # a compile-cache key


def test_every_automatic_choice_has_a_reason():
  reasons = lambda *args: dict(resolve_plan(*args, False).reasons)
  assert reasons(Options(task_chunk=5), CONV, LARGE, CPU1)["task_chunk"] == (
      "5 lowered to 4, the largest divisor of the 32 tasks not above it")
  assert "task_chunk" not in reasons(Options(task_chunk=8), CONV, LARGE, CPU1)
  sine = reasons(Options(), MLP, SINE, CPU1)
  assert "Dense layers under mean squared error" in sine["closed_form"]
  assert "XLA" in sine["xla"]
  assert "closed_form" not in reasons(Options(accuracy=True), MLP, SINE, CPU1)


def test_resolve_execution_rules():
  assert resolve_execution("auto", None) == "batched"
  assert resolve_execution("auto", "LSTM is not supported") == "vectorized_map"
  assert resolve_execution(True, None) == "vectorized_map"
  assert resolve_execution(False, None) == "map_fn"
  with pytest.raises(ValueError, match="vectorize='batched' is not possible: "
                     "LSTM"):
    resolve_execution("batched", "LSTM is not supported")
  with pytest.raises(ValueError, match="vectorize must be"):
    resolve_execution("fast", None)


def test_small_tasks_threshold():
  assert BatchShape(4, 5, 5, 784, True).small            # 7,840 values
  assert not BatchShape(4, 5, 75, 784, True).small       # 62,720 values


def _conv_model():
  return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(2, 3),
                           keras.layers.BatchNormalization(),
                           keras.layers.Flatten(), keras.layers.Dense(5)])


def test_maml_plan_is_the_pure_resolution_and_keys_the_compiled_step():
  maml = MAML(_conv_model(), keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), inner_lr=0.4)
  rng = np.random.default_rng(0)
  batch = TaskBatch(rng.random((4, 5, 28, 28, 1), dtype=np.float32),
                    np.tile(np.arange(5), (4, 1)).astype("i4"),
                    rng.random((4, 5, 28, 28, 1), dtype=np.float32),
                    np.tile(np.arange(5), (4, 1)).astype("i4"))
  plan = maml.plan(batch)
  want = resolve_plan(Options(), CONV, BatchShape.of(batch),
                      Device.local(), False)
  assert plan == want
  assert plan.describe().startswith("batched")
  maml.train_step(batch)
  assert [k[-1] for k in maml.compiled if k[0] == "train"] == [plan]


def test_a_runtime_fallback_is_a_new_plan_not_a_changed_learner():
  gru = keras.Sequential([keras.Input((3, 2)), keras.layers.GRU(4),
                          keras.layers.Dense(1)])
  # Asked for explicitly: "auto" would pick the task-batched path.
  maml = MAML(gru, "mse", inner_lr=0.01, vectorize="vectorized_map")
  rng = np.random.default_rng(0)
  batch = TaskBatch(rng.normal(size=(2, 4, 3, 2)).astype("f4"),
                    rng.normal(size=(2, 4, 1)).astype("f4"),
                    rng.normal(size=(2, 4, 3, 2)).astype("f4"),
                    rng.normal(size=(2, 4, 1)).astype("f4"))
  before = maml.plan(batch)
  assert before.execution == "vectorized_map"
  with pytest.warns(PlanWarning, match="could not vectorise"):
    maml.train_step(batch)
  after = maml.plan(batch)
  assert before.execution == "vectorized_map"      # the old plan is unchanged
  assert after.execution == "map_fn" and after != before
  assert dict(after.reasons)["execution"]
  assert maml.fallbacks["execution"][0] == "map_fn"
  assert maml.execution == "map_fn"


class _Subclassed(keras.Model):

  def __init__(self):
    super().__init__()
    self.hidden = keras.layers.Dense(4, activation="tanh")
    self.out = keras.layers.Dense(1)

  def call(self, x):
    return self.out(self.hidden(x))


def test_a_bad_batch_is_its_own_error_not_a_fallback():
  """A batch the model cannot take (5 features for 3) fails task by task
  too: its error is raised and no map_fn fallback is recorded (nor a Keras
  name scope left open: later variables would be named under it)."""
  model = _Subclassed()
  model(np.zeros((1, 3), "f4"))
  maml = MAML(model, "mse", inner_lr=0.01, vectorize="vectorized_map")
  rng = np.random.default_rng(0)
  batch = lambda d: TaskBatch(*[rng.normal(size=s).astype("f4") for s in (
      (2, 4, d), (2, 4, 1), (2, 4, d), (2, 4, 1))])
  with warnings.catch_warnings():
    warnings.simplefilter("error", PlanWarning)   # no fallback warning
    with pytest.raises((ValueError, TypeError, tf.errors.OpError)):
      maml.train_step(batch(5))
    assert "execution" not in maml.fallbacks
    # The failed trace left no Keras name scope open behind it.
    fresh = keras.layers.Dense(2)
    fresh.build((None, 3))
    assert fresh.kernel.path == f"{fresh.name}/kernel"
    good = batch(3)
    assert maml.plan(good).execution == "vectorized_map"
    assert np.isfinite(maml.train_step(good)["loss_after"])


class _MinimalCell(keras.layers.Layer):
  """A user's RNN cell (``h' = x W + h``): not task-batched."""

  def __init__(self, units, **kwargs):
    super().__init__(**kwargs)
    self.units = self.state_size = units

  def build(self, input_shape):
    self.kernel = self.add_weight(shape=(input_shape[-1], self.units))

  def call(self, inputs, states):
    h = keras.ops.matmul(inputs, self.kernel) + states[0]
    return h, [h]


@pytest.mark.parametrize("layer, why", [
    # A user's cell in an RNN layer is not task-batched.
    (lambda: keras.layers.RNN(_MinimalCell(4), return_sequences=True),
     "recurrent"),
    # Off the task-batched path: channels_first, dropout inside a cell.
    (lambda: keras.layers.Conv1D(2, 2, data_format="channels_first"),
     "convolutions"),
    (lambda: keras.layers.GRU(4, dropout=0.1, return_sequences=True),
     "random layers"),
])
def test_auto_runs_what_vectorized_map_cannot_trace_under_map_fn(layer, why):
  model = keras.Sequential([keras.Input((3, 2)), layer(),
                            keras.layers.Flatten(), keras.layers.Dense(1)])
  with pytest.warns(PlanWarning, match="task-batched"):
    maml = MAML(model, "mse", inner_lr=0.01)
  rng = np.random.default_rng(0)
  x = lambda: rng.normal(size=(2, 4, 3, 2)).astype("f4")
  y = lambda: rng.normal(size=(2, 4, 1)).astype("f4")
  plan = maml.plan(TaskBatch(x(), y(), x(), y()))
  assert plan.execution == "map_fn"
  assert why in " ".join(w for f, w in plan.reasons if f == "execution")


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
  small = _images(4, 5, 28)       # 10 x 784 values per task
  large = _images(4, 40, 28)      # 80 x 784
  if tf.config.list_physical_devices("GPU"):
    assert maml.plan(large).task_chunk is None
  else:
    assert maml.plan(small).task_chunk is None
    assert maml.plan(small).conv_impl == "patches"
    assert maml.plan(large).task_chunk == 1
    assert maml.plan(large).conv_impl == "map"
  assert MAML(mlp(1, 1, hidden=(4,)), "mse").plan(
      sinusoid.sample_batch(4, 5, 5,
                            np.random.default_rng(0))[0]).task_chunk is None
  for bad in (0, -2, 1.5, "all", True):
    with pytest.raises(ValueError, match="task_chunk"):
      MAML(mlp(1, 1, hidden=(4,)), "mse", task_chunk=bad)
