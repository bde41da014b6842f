"""Tests for maml_tf.tasks.episodes (tf.data N-way K-shot episode sampling)."""

import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from maml_tf import TaskBatch
from maml_tf.core.task_batch import validate_task_batch
from maml_tf.tasks import episodes
from maml_tf.tasks import omniglot

N_CLASSES, N_PER_CLASS = 12, 7


def _tagged(n_classes=N_CLASSES, n_per_class=N_PER_CLASS):
  """Examples [c, d] carry their own indices: pixel 0 = c, pixel 1 = d."""
  x = np.zeros((n_classes, n_per_class, 2, 1, 1), np.float32)
  x[:, :, 0, 0, 0] = np.arange(n_classes)[:, None]
  x[:, :, 1, 0, 0] = np.arange(n_per_class)[None, :]
  return x


def _tags(x):
  x = np.asarray(x)
  return x[..., 0, 0, 0].astype(int), x[..., 1, 0, 0].astype(int)


def _batches(ds, n):
  return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(n)]


def _check_task(sx, sy, qx, qy, way, shot, query):
  s_cls, s_draw = _tags(sx)
  q_cls, q_draw = _tags(qx)
  # Every label appears `shot` times in the support set, `query` in the query.
  np.testing.assert_array_equal(np.bincount(sy, minlength=way), [shot] * way)
  np.testing.assert_array_equal(np.bincount(qy, minlength=way), [query] * way)
  # A label means one class, in support and query alike; classes distinct.
  label_to_class = {}
  for cls, lab in list(zip(s_cls, sy)) + list(zip(q_cls, qy)):
    assert label_to_class.setdefault(int(lab), int(cls)) == cls
  assert len(set(label_to_class.values())) == way
  # No example twice, and none in both support and query.
  support = set(zip(s_cls.tolist(), s_draw.tolist()))
  queries = set(zip(q_cls.tolist(), q_draw.tolist()))
  assert len(support) == way * shot and len(queries) == way * query
  assert not support & queries
  return label_to_class


@pytest.mark.parametrize("way,shot,query", [(5, 1, 3), (3, 2, 5), (12, 1, 1)])
def test_shapes_labels_and_disjointness(way, shot, query):
  ds = episodes.episode_dataset(_tagged(), way, shot, query, meta_batch=4,
                                seed=3)
  assert isinstance(ds.element_spec, TaskBatch)
  for batch in _batches(ds, 3):
    assert batch.support_x.shape == (4, way * shot, 2, 1, 1)
    assert batch.support_y.shape == (4, way * shot)
    assert batch.query_x.shape == (4, way * query, 2, 1, 1)
    assert batch.query_y.shape == (4, way * query)
    assert batch.support_x.dtype == np.float32
    assert batch.support_y.dtype == np.int32 and batch.query_y.dtype == np.int32
    assert batch.support_y.min() >= 0 and batch.support_y.max() < way
    for t in range(4):
      _check_task(batch.support_x[t], batch.support_y[t], batch.query_x[t],
                  batch.query_y[t], way, shot, query)
    validate_task_batch(TaskBatch(*batch))


def test_static_shapes_for_tracing():
  ds = episodes.episode_dataset(_tagged(), 5, 1, 2, meta_batch=8, seed=0)
  spec = ds.element_spec
  assert spec.support_x.shape == (8, 5, 2, 1, 1)
  assert spec.query_y.shape == (8, 10)


def test_labels_are_shuffled_and_examples_mixed():
  ds = episodes.episode_dataset(_tagged(), 5, 2, 3, meta_batch=16, seed=1)
  batch = _batches(ds, 1)[0]
  mappings = [
      _check_task(batch.support_x[t], batch.support_y[t], batch.query_x[t],
                  batch.query_y[t], 5, 2, 3) for t in range(16)]
  # Label 0 is not always the smallest class id of the task.
  assert any(m[0] != min(m.values()) for m in mappings)
  # Support examples are not grouped by label.
  assert any(not np.all(np.diff(batch.support_y[t]) >= 0) for t in range(16))
  grouped = episodes.episode_dataset(_tagged(), 5, 2, 3, meta_batch=2, seed=1,
                                     shuffle_examples=False)
  b = _batches(grouped, 1)[0]
  np.testing.assert_array_equal(b.support_y[0], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])


def test_determinism_and_resume():
  make = lambda seed, **kw: episodes.episode_dataset(  # noqa: E731
      _tagged(), 5, 1, 2, meta_batch=4, seed=seed, **kw)
  a, b, c = _batches(make(7), 3), _batches(make(7), 3), _batches(make(8), 1)
  for x, y in zip(a, b):
    for f, g in zip(x, y):
      np.testing.assert_array_equal(f, g)
  assert not np.array_equal(a[0].support_x, c[0].support_x)
  # Iterating the same dataset again gives the same tasks.
  ds = make(7)
  np.testing.assert_array_equal(_batches(ds, 1)[0].query_x, a[0].query_x)
  # start_batch resumes mid-stream; num_batches bounds it.
  resumed = _batches(make(7, start_batch=2, num_batches=1), 5)
  assert len(resumed) == 1
  np.testing.assert_array_equal(resumed[0].support_x, a[2].support_x)
  # seed=None is random but fixed per dataset.
  ds = episodes.episode_dataset(_tagged(), 5, 1, 2, meta_batch=4)
  np.testing.assert_array_equal(_batches(ds, 1)[0].support_x,
                                _batches(ds, 1)[0].support_x)


def test_uint8_is_scaled_and_dtype_option():
  x = np.full((6, 5, 3, 3, 1), 255, np.uint8)
  x[:, :, 0] = 51
  b = _batches(episodes.episode_dataset(x, 2, 1, 1, meta_batch=2, seed=0),
               1)[0]
  assert b.support_x.dtype == np.float32
  np.testing.assert_allclose(np.unique(b.support_x), [0.2, 1.0], rtol=1e-6)
  b64 = _batches(episodes.episode_dataset(x, 2, 1, 1, meta_batch=2, seed=0,
                                          dtype=tf.float64), 1)[0]
  assert b64.query_x.dtype == np.float64


def test_evaluation_batches_are_fixed():
  x = _tagged()
  ev = lambda mb: episodes.evaluation_batches(  # noqa: E731
      x, 5, 1, 3, num_tasks=10, meta_batch=mb, seed=0)
  first = _batches(ev(4), 10)
  assert [b.support_x.shape[0] for b in first] == [4, 4, 2]
  second = _batches(ev(4), 10)
  by_one = _batches(ev(1), 10)
  cat = lambda bs, f: np.concatenate([getattr(b, f) for b in bs])  # noqa: E731
  for field in TaskBatch._fields:
    np.testing.assert_array_equal(cat(first, field), cat(second, field))
    np.testing.assert_array_equal(cat(first, field), cat(by_one, field))
  for t in range(10):
    _check_task(*(cat(first, f)[t] for f in TaskBatch._fields), 5, 1, 3)
  other = _batches(episodes.evaluation_batches(x, 5, 1, 3, num_tasks=10,
                                               meta_batch=4, seed=1), 1)
  assert not np.array_equal(other[0].support_x, first[0].support_x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(way=13), r"way=13 .*12"),
    (dict(shot=5, query=3), r"shot \+ query .*7"),
    (dict(way=0), r"^way"),
    (dict(shot=-1), r"^shot"),
    (dict(query=0), r"^query"),
    (dict(meta_batch=0), r"^meta_batch"),
    (dict(way=2.5), r"^way"),
])
def test_argument_validation(kwargs, match):
  args = dict(way=5, shot=1, query=2, meta_batch=4)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    episodes.episode_dataset(_tagged(), seed=0, **args)
  if "meta_batch" not in kwargs:
    args.pop("meta_batch")
    with pytest.raises(ValueError, match=match):
      episodes.evaluation_batches(_tagged(), **args)


def test_other_validation():
  with pytest.raises(ValueError, match="num_tasks"):
    episodes.evaluation_batches(_tagged(), 5, 1, 2, num_tasks=0)
  with pytest.raises(ValueError, match="class_images"):
    episodes.episode_dataset(np.zeros((5, 3)), 2, 1, 1, meta_batch=1)
  with pytest.raises(ValueError, match="class_images"):
    episodes.episode_dataset(np.zeros((5, 3, 2), np.int32), 2, 1, 1, 1)


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_real_omniglot_episodes():
  d = os.environ.get(omniglot.ENV_VAR) or str(
      REPO_ROOT.parent / "shared" / "data" / "omniglot")
  if not os.path.isfile(os.path.join(d, "images_evaluation.zip")):
    pytest.skip(f"real Omniglot not found (set {omniglot.ENV_VAR})")
  # The evaluation zip alone (659 characters -> 2636 rotated classes).
  chars = omniglot.read_omniglot_zip(os.path.join(d, "images_evaluation.zip"))
  classes = omniglot.omniglot_splits(chars.images, num_train=500,
                                     num_val=59)["train"]
  assert classes.shape == (2000, 20, 28, 28, 1)
  b = _batches(episodes.episode_dataset(classes, 5, 1, 15, meta_batch=32,
                                        seed=0), 1)[0]
  assert b.support_x.shape == (32, 5, 28, 28, 1)
  assert b.query_x.shape == (32, 75, 28, 28, 1)
  assert set(np.unique(b.support_x)) <= {0.0, 1.0}
  assert 0.03 < b.query_x.mean() < 0.15  # About 8% ink.
