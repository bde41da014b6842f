"""Shared test setup: quiet TF logs, deterministic seeds, data locations."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # pylint: disable=g-import-not-at-top

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(1234)
  yield


def central_differences(loss_fn, variable, eps=1e-6):
  """d loss_fn() / d variable by central differences (restores the value)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  base = variable.numpy()
  flat = base.ravel()
  out = []
  for i in range(flat.size):
    vals = []
    for sign in (1, -1):
      pert = flat.copy()
      pert[i] += sign * eps
      variable.assign(pert.reshape(base.shape))
      vals.append(float(loss_fn()))
    out.append((vals[0] - vals[1]) / (2 * eps))
  variable.assign(base)
  return np.asarray(out).reshape(base.shape)


@pytest.fixture(name="meta_loss_fd")
def fixture_meta_loss_fd():
  """``f(maml, batch, variables) -> flat array``: finite-difference meta-gradient."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  def fd(maml, batch, variables, eps=1e-6):
    return np.concatenate([
        central_differences(lambda: maml.meta_loss(batch), v, eps).ravel()
        for v in variables])
  return fd


@pytest.fixture(name="conv_bn_f64")
def fixture_conv_bn_f64():
  """A factory of a small float64 conv + BatchNorm classifier (7x7x1 -> 3).

  ``build.batch(tasks, seed)`` is a matching float64 3-way batch: 2 support
  and 3 query images per class.
  """
  def batch(tasks, seed):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from maml_tf import TaskBatch  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(seed)
    labels = lambda n: np.tile(np.repeat(np.arange(3), n), (tasks, 1))
    return TaskBatch(rng.normal(size=(tasks, 6, 7, 7, 1)),
                     labels(2).astype("i4"),
                     rng.normal(size=(tasks, 9, 7, 7, 1)),
                     labels(3).astype("i4"))

  def build():
    import keras  # pylint: disable=g-import-not-at-top
    f = "float64"
    return keras.Sequential([
        keras.Input((7, 7, 1), dtype=f),
        keras.layers.Conv2D(3, 3, strides=2, padding="same", dtype=f),
        keras.layers.BatchNormalization(dtype=f),
        keras.layers.Activation("relu", dtype=f),
        keras.layers.Conv2D(3, 3, padding="same", dtype=f),
        keras.layers.BatchNormalization(dtype=f),
        keras.layers.Activation("relu", dtype=f),
        keras.layers.MaxPooling2D(2, dtype=f),
        keras.layers.Flatten(dtype=f), keras.layers.Dense(3, dtype=f)])
  build.batch = batch
  return build
