"""The adaptable SavedModel reproduces MAML.adapt + predict without maml_tf."""

import subprocess
import sys

import keras
import numpy as np
import pytest

from maml_tf import MAML
from maml_tf.export import export_adaptable


def _bn_classifier():
  return keras.Sequential([
      keras.Input((8, 8, 1)),
      keras.layers.Conv2D(4, 3, strides=2, padding="same"),
      keras.layers.BatchNormalization(), keras.layers.Activation("relu"),
      keras.layers.Flatten(), keras.layers.Dense(3)])


def test_adaptable_savedmodel_matches_adapt_then_predict(tmp_path):
  maml = MAML(_bn_classifier(), keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), inner_lr=0.3, inner_steps=3)
  rng = np.random.default_rng(0)
  sx = rng.normal(size=(6, 8, 8, 1)).astype("f4")
  sy = np.repeat(np.arange(3), 2).astype("i4")
  qx = rng.normal(size=(9, 8, 8, 1)).astype("f4")
  path = export_adaptable(maml, str(tmp_path / "adaptable"), sx, sy)
  want3 = np.asarray(maml.adapt(sx, sy)(qx, training=False))
  want5 = np.asarray(maml.adapt(sx, sy, steps=5, inner_lr=0.1)(qx,
                                                               training=False))
  want_w = {v.path.replace("/", "|"): a.numpy() for v, a in zip(
      maml.model.trainable_variables, maml.adapt(sx, sy).trainable_variables)}
  for name, value in (("sx", sx), ("sy", sy), ("qx", qx)):
    np.save(tmp_path / f"{name}.npy", value)
  code = f"""
import sys, numpy as np, tensorflow as tf
d = {str(tmp_path)!r}
sx, sy, qx = (np.load(f"{{d}}/{{n}}.npy") for n in ("sx", "sy", "qx"))
m = tf.saved_model.load(d + "/adaptable")
np.save(d + "/out3.npy", m.adapt_and_predict(sx, sy, qx).numpy())
np.save(d + "/out5.npy", m.adapt_and_predict_with(sx, sy, qx, 5, 0.1).numpy())
w = m.adapt(sx, sy)
np.savez(d + "/w.npz", **{{k.replace("/", "|"): v.numpy() for k, v in w.items()}})
sig = m.signatures["adapt_and_predict"]
np.save(d + "/sig.npy", list(sig(support_x=tf.constant(sx), support_y=tf.constant(sy), query_x=tf.constant(qx)).values())[0].numpy())
assert "maml_tf" not in sys.modules
"""
  subprocess.run([sys.executable, "-c", code], check=True)
  np.testing.assert_allclose(np.load(tmp_path / "out3.npy"), want3, atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / "out5.npy"), want5, atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / "sig.npy"), want3, atol=1e-5)
  assert not np.allclose(want3, want5, atol=1e-3)   # steps/lr really matter
  got_w = dict(np.load(tmp_path / "w.npz"))
  assert sorted(got_w) == sorted(want_w)
  for k, v in want_w.items():
    np.testing.assert_allclose(got_w[k], v, atol=1e-6)


def _family_model(batchnorm: bool):
  layers = [keras.Input((4,)), keras.layers.Dense(16, activation="tanh")]
  if batchnorm:
    layers.append(keras.layers.BatchNormalization())
  return keras.Sequential(layers + [keras.layers.Dense(3)])


def test_adaptable_savedmodel_matches_adapt_for_the_whole_family(tmp_path):
  """maml, fomaml, anil, metasgd, mamlpp (learned step sizes moved), with and
  without BatchNorm: the SavedModel adapts as MAML.adapt does, in a process
  that never imports maml_tf."""
  from maml_tf.core.family import make_learner  # pylint: disable=g-import-not-at-top
  from maml_tf import TaskBatch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  labels = lambda t, n: np.tile(np.repeat(np.arange(3), n), (t, 1)).astype("i4")
  batch = TaskBatch(rng.normal(size=(4, 6, 4)).astype("f4"), labels(4, 2),
                    rng.normal(size=(4, 9, 4)).astype("f4"), labels(4, 3))
  sx, sy = batch.support_x[0], batch.support_y[0]
  qx = rng.normal(size=(7, 4)).astype("f4")
  np.save(tmp_path / "sx.npy", sx)
  np.save(tmp_path / "sy.npy", sy)
  np.save(tmp_path / "qx.npy", qx)
  cases, want = [], {}
  for algorithm in ("maml", "fomaml", "anil", "metasgd", "mamlpp"):
    for bn in (False, True):
      keras.utils.set_random_seed(5)
      learner = make_learner(
          algorithm, _family_model(bn),
          keras.losses.SparseCategoricalCrossentropy(from_logits=True),
          inner_lr=0.5, inner_steps=2, meta_lr=0.05, iterations=6,
          meta_optimizer=keras.optimizers.SGD(0.5))
      for _ in range(3):
        learner.train_step(batch)
      moved = [float(np.abs(v.numpy() - 0.5).max())
               for v in learner.inner_lr_variables]
      assert all(m > 1e-3 for m in moved), (algorithm, moved)
      name = f"{algorithm}_bn{int(bn)}"
      export_adaptable(learner, str(tmp_path / name), sx, sy)
      want[name] = np.asarray(learner.adapt(sx, sy)(qx, training=False))
      want[name + "_3"] = np.asarray(
          learner.adapt(sx, sy, steps=3, inner_lr=0.2)(qx, training=False))
      cases.append(name)
  code = f"""
import sys, numpy as np, tensorflow as tf
d = {str(tmp_path)!r}
sx, sy, qx = (np.load(f"{{d}}/{{n}}.npy") for n in ("sx", "sy", "qx"))
out = {{}}
for name in {cases!r}:
  m = tf.saved_model.load(d + "/" + name)
  out[name] = m.adapt_and_predict(sx, sy, qx).numpy()
  out[name + "_3"] = m.adapt_and_predict_with(sx, sy, qx, 3, 0.2).numpy()
np.savez(d + "/family.npz", **out)
assert "maml_tf" not in sys.modules
"""
  subprocess.run([sys.executable, "-c", code], check=True)
  got = dict(np.load(tmp_path / "family.npz"))
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)
  # The family members really adapt differently.
  assert not np.allclose(want["maml_bn0"], want["anil_bn0"], atol=1e-3)
  assert not np.allclose(want["maml_bn0"], want["metasgd_bn0"], atol=1e-3)


def test_a_dict_input_model_is_refused_naming_the_alternative(tmp_path):
  a = keras.Input((3,), name="a")
  maml = MAML(keras.Model({"a": a}, keras.layers.Dense(1)(a)), "mse",
              inner_lr=0.1)
  x = {"a": np.zeros((5, 3), np.float32)}
  with pytest.raises(ValueError, match="one input tensor.*export_adapted"):
    export_adaptable(maml, str(tmp_path / "m"), x, np.zeros((5, 1)))


def test_a_model_with_random_layers_exports_and_adapts_as_maml_adapt(
    tmp_path):
  """Dropout and GaussianNoise draw in the inner loop from the seed states,
  which the SavedModel must carry (Keras does not hand them to TF's
  tracking: the export failed with an 'untracked resource')."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(4)
  net = keras.Sequential([
      keras.Input((3,)), keras.layers.Dense(8, activation="tanh"),
      keras.layers.Dropout(0.3), keras.layers.GaussianNoise(0.2),
      keras.layers.Dense(1)])
  maml = MAML(net, "mse", inner_lr=0.1, inner_steps=2)
  rng = np.random.default_rng(4)
  sx, sy, qx = (rng.normal(size=s).astype("f4")
                for s in ((5, 3), (5, 1), (4, 3)))
  path = export_adaptable(maml, str(tmp_path / "adaptable"), sx, sy)
  loaded = tf.saved_model.load(path)
  got = loaded.adapt_and_predict(sx, sy, qx).numpy()
  np.testing.assert_allclose(got, maml.adapt(sx, sy)(qx, training=False),
                             atol=1e-5)
  np.testing.assert_array_equal(got, loaded.adapt_and_predict(sx, sy, qx))
  # The masks were drawn: without them adaptation gives other numbers.
  twin = keras.Sequential([keras.Input((3,)),
                           keras.layers.Dense(8, activation="tanh"),
                           keras.layers.Dense(1)])
  twin.set_weights(net.get_weights())
  plain = MAML(twin, "mse", inner_lr=0.1, inner_steps=2)
  assert not np.allclose(plain.adapt(sx, sy)(qx, training=False), got,
                         atol=1e-4)
