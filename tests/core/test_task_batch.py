"""TaskBatch: validation with messages naming the field, nested inputs."""

import keras
import numpy as np
import pytest

from maml_tf import MAML, TaskBatch
from maml_tf.core.task_batch import prepare_batch


def _pair(t, n, rng):
  return rng.normal(size=(t, n, 3)), rng.normal(size=(t, n, 2))


def test_nested_inputs_validate_and_cast_every_leaf():
  rng = np.random.default_rng(0)
  batch = TaskBatch({"a": _pair(2, 4, rng)[0], "b": _pair(2, 4, rng)[1]},
                    rng.normal(size=(2, 4, 1)),
                    {"a": _pair(2, 6, rng)[0], "b": _pair(2, 6, rng)[1]},
                    rng.normal(size=(2, 6, 1)))
  prepared = prepare_batch(batch, "float32")
  assert prepared.num_tasks == 2
  assert {k: v.dtype for k, v in prepared.support_x.items()} == {
      "a": "float32", "b": "float32"}
  assert prepared.query_x["b"].shape == (2, 6, 2)


@pytest.mark.parametrize("change, message", [
    (lambda sx, qx: ((sx[0], sx[1][:, :3]), qx), "disagree on the task"),
    (lambda sx, qx: ((sx[0], sx[1][:1]), qx), "disagree on the task"),
    (lambda sx, qx: (sx, qx[0]), "same structure"),
    (lambda sx, qx: (sx, (qx[0], qx[1][..., :1])), "[1] disagree in shape"),
])
def test_nested_inputs_that_disagree_are_refused(change, message):
  rng = np.random.default_rng(0)
  sx, qx = change(_pair(2, 4, rng), _pair(2, 6, rng))
  batch = TaskBatch(sx, rng.normal(size=(2, 4, 1)), qx,
                    rng.normal(size=(2, 6, 1)))
  with pytest.raises(ValueError, match=message.replace("[", r"\[")):
    prepare_batch(batch, "float32")


@pytest.mark.parametrize("field", ["support_x", "query_y"])
def test_arrays_written_as_python_lists_are_named(field):
  # Before: "support_x[0] must have a task axis ... got shape ()", as the
  # list was read as several inputs of one number each.
  rng = np.random.default_rng(0)
  batch = TaskBatch(*_pair(2, 4, rng), *_pair(2, 6, rng))
  batch = batch._replace(**{field: getattr(batch, field).tolist()})
  with pytest.raises(ValueError, match=f"TaskBatch.{field} is a Python list "
                     "holding numbers; give each input as one array"):
    prepare_batch(batch, "float32")
  # A dict input written as lists too.
  sx = {"a": batch.support_x, "b": np.asarray(batch.support_x).tolist()}
  if field == "support_x":
    with pytest.raises(ValueError, match="is a Python dict holding numbers"):
      prepare_batch(batch._replace(support_x=sx), "float32")


def test_a_dict_input_model_meta_trains_adapts_and_exports(tmp_path):
  from maml_tf.export import export_adapted  # pylint: disable=g-import-not-at-top
  a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
  h = keras.layers.Concatenate()([a, keras.layers.Dense(4, "tanh")(b)])
  model = keras.Model({"a": a, "b": b},
                      keras.layers.Dense(1)(keras.layers.Dense(8, "tanh")(h)))
  maml = MAML(model, "mse", inner_lr=0.1,
              meta_optimizer=keras.optimizers.Adam(1e-2))
  rng = np.random.default_rng(1)

  def batch(n):
    x = {"a": rng.normal(size=(4, n, 3)), "b": rng.normal(size=(4, n, 2))}
    return x, np.sin(x["a"].sum(-1, keepdims=True) - x["b"][..., :1])
  fixed = TaskBatch(*batch(5), *batch(8))
  start = float(maml.meta_loss(fixed))
  for _ in range(20):
    maml.train_step(fixed)
  assert float(maml.meta_loss(fixed)) < 0.8 * start
  first = lambda x: {k: v[0] for k, v in x.items()}
  adapted = maml.adapt(first(fixed.support_x), fixed.support_y[0])
  export_adapted(adapted, str(tmp_path / "dict"),
                 verify_with=first(fixed.query_x))
