"""Adapted models round-trip through SavedModel."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML
from maml_tf.export import export_adapted
from maml_tf.tasks import sinusoid


def _bn_classifier():
  return keras.Sequential([
      keras.Input((8, 8, 1)),
      keras.layers.Conv2D(4, 3, strides=2, padding="same"),
      keras.layers.BatchNormalization(), keras.layers.Activation("relu"),
      keras.layers.Flatten(), keras.layers.Dense(3)])


def test_saved_model_serve_equals_adapted_model(tmp_path):
  maml = MAML(keras.Sequential([keras.Input((1,)), keras.layers.Dense(16,
              activation="relu"), keras.layers.Dense(1)]), "mse",
              inner_lr=0.05)
  batch = sinusoid.sample_batch(1, 10, 30, np.random.default_rng(0))[0]
  adapted = maml.adapt(batch.support_x[0], batch.support_y[0], steps=3)
  path = export_adapted(adapted, str(tmp_path / "adapted"),
                        verify_with=batch.query_x[0])
  loaded = tf.saved_model.load(path)
  got = loaded.serve(tf.constant(batch.query_x[0])).numpy()
  np.testing.assert_allclose(got, adapted(batch.query_x[0]), atol=1e-5)
  assert not np.allclose(got, maml.model(batch.query_x[0]), atol=1e-3)


@pytest.mark.filterwarnings("error::UserWarning")
def test_a_one_input_dict_model_exports_with_its_input_structure(tmp_path):
  """Served with one tensor, called as the dict it was built on (Keras
  warns about, and a future Keras may refuse, a bare tensor)."""
  a = keras.Input((3,), name="a")
  model = keras.Model({"a": a}, keras.layers.Dense(2, "tanh")(a))
  x = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")
  path = export_adapted(model, str(tmp_path / "dict"), verify_with={"a": x})
  loaded = tf.saved_model.load(path)
  got = loaded.serve(tf.constant(x)).numpy()
  np.testing.assert_allclose(got, model({"a": x}), atol=1e-6)


@pytest.mark.parametrize("as_dict", [True, False], ids=["dict", "list"])
def test_several_inputs_are_served_under_their_own_names(as_dict, tmp_path):
  # Before, the serving signature named them x0 and x1.
  ia, ib = keras.Input((3,), name="image"), keras.Input((2,), name="meta")
  out = keras.layers.Dense(2)(keras.layers.Concatenate()([ia, ib]))
  model = keras.Model({"pixels": ia, "extra": ib} if as_dict else [ia, ib],
                      out)
  rng = np.random.default_rng(2)
  xa, xb = (rng.normal(size=(4, n)).astype("float32") for n in (3, 2))
  given = {"pixels": xa, "extra": xb} if as_dict else [xa, xb]
  path = export_adapted(model, str(tmp_path / "m"), verify_with=given)
  serve = tf.saved_model.load(path).signatures["serve"]
  names = ({"pixels": "pixels", "extra": "extra"} if as_dict
           else {"pixels": "image", "extra": "meta"})
  assert set(serve.structured_input_signature[1]) == set(names.values())
  got = serve(**{names["pixels"]: tf.constant(xa),
                 names["extra"]: tf.constant(xb)})
  np.testing.assert_allclose(list(got.values())[0], model(given), atol=1e-6)


def test_saved_model_with_batchnorm_loads_without_maml_tf(tmp_path):
  maml = MAML(_bn_classifier(), keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), inner_lr=0.2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 8, 8, 1)).astype("f4")
  y = np.repeat(np.arange(3), 3).astype("i4")
  adapted = maml.adapt(x, y, steps=5)
  path = str(tmp_path / "bn")
  export_adapted(adapted, path)
  np.save(tmp_path / "x.npy", x)
  code = (
      "import sys, numpy as np, tensorflow as tf\n"
      f"m = tf.saved_model.load({path!r})\n"
      f"np.save({str(tmp_path / 'y.npy')!r}, m.serve(np.load("
      f"{str(tmp_path / 'x.npy')!r})).numpy())\n"
      "assert 'maml_tf' not in sys.modules\n")
  subprocess.run([sys.executable, "-c", code], check=True)
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"),
                             adapted(x, training=False), atol=1e-5)
  # Inference mode uses the support statistics: same as during adaptation.
  np.testing.assert_allclose(adapted(x, training=False),
                             adapted(x, training=True), atol=1e-4)


def test_subclassed_model_signature_comes_from_its_build_shape(tmp_path):
  class Net(keras.Model):
    def __init__(self, **kw):
      super().__init__(**kw)
      self.d = keras.layers.Dense(2)

    def call(self, x):
      return self.d(x)
  net = Net()
  net(np.zeros((1, 3), "f4"))
  path = export_adapted(net, str(tmp_path / "n"))   # build shape is known
  loaded = tf.saved_model.load(path)
  out = loaded.serve(tf.ones((4, 3)))
  np.testing.assert_allclose(out, net(tf.ones((4, 3))), atol=1e-6)


def test_a_subclassed_model_of_several_inputs_asks_for_a_signature(tmp_path):
  class Pair(keras.Model):
    def __init__(self, **kw):
      super().__init__(**kw)
      self.d = keras.layers.Dense(2)

    def call(self, inputs):
      a, b = inputs
      return self.d(keras.ops.concatenate([a, b], axis=-1))
  net = Pair()
  net((np.zeros((1, 3), "f4"), np.zeros((1, 2), "f4")))
  with pytest.raises(ValueError, match="pass input_signature="):
    export_adapted(net, str(tmp_path / "p"))
  spec = [(tf.TensorSpec((None, 3)), tf.TensorSpec((None, 2)))]
  path = export_adapted(net, str(tmp_path / "p"), input_signature=spec)
  assert tf.saved_model.load(path)


def test_transductive_export_uses_the_batch_statistics(tmp_path):
  maml = MAML(_bn_classifier(), keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), inner_lr=0.2)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(9, 8, 8, 1)).astype("f4")
  q = rng.normal(loc=0.5, size=(12, 8, 8, 1)).astype("f4")
  adapted = maml.adapt(x, np.repeat(np.arange(3), 3).astype("i4"), steps=3)
  before = [v.numpy().copy() for v in adapted.variables]
  path = export_adapted(adapted, str(tmp_path / "t"), verify_with=q,
                        batchnorm="transductive")
  loaded = tf.saved_model.load(path)
  got = loaded.serve(q).numpy()
  for a, b in zip(before, adapted.variables):    # nothing was written
    np.testing.assert_array_equal(a, b.numpy())
  assert not np.allclose(got, adapted(q, training=False), atol=1e-3)
  np.testing.assert_allclose(got, adapted(q, training=True), atol=1e-5)
  with pytest.raises(ValueError, match="batchnorm"):
    export_adapted(adapted, str(tmp_path / "u"), batchnorm="sometimes")


def test_what_is_not_an_adapted_model_is_named(tmp_path):
  from maml_tf.export import export_adaptable  # pylint: disable=g-import-not-at-top
  maml = MAML(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]),
              "mse", inner_lr=0.05)
  x = np.zeros((3, 1), np.float32)
  with pytest.raises(TypeError, match="takes a keras.Model .* got a MAML; "
                     "export_adaptable"):
    export_adapted(maml, str(tmp_path / "a"))
  with pytest.raises(TypeError, match="takes the learner .* got a Sequential; "
                     "export_adapted"):
    export_adaptable(maml.model, str(tmp_path / "b"), x, x)


class _PythonLayer(keras.layers.Layer):
  """Runs Python inside the graph: such a SavedModel loads nowhere else."""

  def call(self, x):
    y = tf.ensure_shape(tf.py_function(lambda t: t * 2.0, [x], x.dtype),
                        x.shape)
    return x + tf.stop_gradient(y)


def test_a_model_that_calls_python_is_not_exported(tmp_path):
  from maml_tf.export import export_adaptable  # pylint: disable=g-import-not-at-top
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1),
                            _PythonLayer(name="python_call")])
  maml = MAML(model, "mse", inner_lr=0.05, first_order=True)
  x = np.ones((3, 1), np.float32)
  with pytest.raises(ValueError, match="calls Python .*EagerPyFunc"):
    export_adapted(maml.adapt(x, x), str(tmp_path / "a"), verify_with=x)
  with pytest.raises(ValueError, match="calls Python"):
    export_adaptable(maml, str(tmp_path / "b"), x, x)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unnamed_or_nested_inputs_get_stable_names(tmp_path):
  # Keras names unnamed inputs from a process-wide counter; nested dicts
  # have more inputs than top-level keys (before, the export failed).
  ia, ib = keras.Input((3,)), keras.Input((2,))
  out = keras.layers.Dense(2)(keras.layers.Concatenate()([ia, ib]))
  path = export_adapted(keras.Model([ia, ib], out), str(tmp_path / "plain"))
  serve = tf.saved_model.load(path).signatures["serve"]
  assert set(serve.structured_input_signature[1]) == {"x0", "x1"}
  ic = keras.Input((1,), name="c")
  nested = keras.Model({"z": {"p": ia, "q": ib}, "y": ic},
                       keras.layers.Concatenate()([out, ic]))
  rng = np.random.default_rng(3)
  given = {"z": {"p": rng.normal(size=(2, 3)), "q": rng.normal(size=(2, 2))},
           "y": rng.normal(size=(2, 1))}
  path = export_adapted(nested, str(tmp_path / "nested"), verify_with=given)
  serve = tf.saved_model.load(path).signatures["serve"]
  assert set(serve.structured_input_signature[1]) == {"y", "z_p", "z_q"}
