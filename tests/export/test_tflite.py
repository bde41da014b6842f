"""An adapted model deploys to TFLite (built-in ops only) with its numbers."""

import keras
import numpy as np
import tensorflow as tf

from maml_tf import MAML
from maml_tf.export import export_adapted


def test_adapted_model_converts_to_tflite_and_predicts_the_same(tmp_path):
  keras.utils.set_random_seed(0)
  model = keras.Sequential([
      keras.Input((12, 12, 1)), keras.layers.Conv2D(8, 3, padding="same"),
      keras.layers.BatchNormalization(), keras.layers.ReLU(),
      keras.layers.MaxPooling2D(2), keras.layers.Flatten(),
      keras.layers.Dense(5)])
  maml = MAML(model, keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), inner_lr=0.4)
  rng = np.random.default_rng(0)
  sx = rng.random((5, 12, 12, 1), dtype=np.float32)
  sy = np.arange(5, dtype=np.int32)
  qx = rng.random((15, 12, 12, 1), dtype=np.float32)
  adapted = maml.adapt(sx, sy, steps=3)
  path = export_adapted(adapted, str(tmp_path / "adapted"), verify_with=qx)
  converter = tf.lite.TFLiteConverter.from_saved_model(
      path, signature_keys=["serve"])
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  flatbuffer = converter.convert()
  interpreter = tf.lite.Interpreter(model_content=flatbuffer)
  runner = interpreter.get_signature_runner("serve")
  got = list(runner(x=qx).values())[0]
  want = np.asarray(adapted(qx, training=False))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert (got.argmax(-1) == want.argmax(-1)).all()
  assert not np.allclose(want, np.asarray(model(qx, training=False)),
                         atol=1e-3)      # the adapted weights, not theta
