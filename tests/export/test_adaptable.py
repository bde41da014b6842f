"""The adaptable SavedModel reproduces MAML.adapt + predict without maml_tf."""

import subprocess
import sys

import keras
import numpy as np

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
