"""The fused Adam outer step gives the same numbers as Keras Adam."""

import keras
import numpy as np
import pytest

from maml_tf import MAML
from maml_tf.core import fused_adam
from maml_tf.models.mlp import mlp
from maml_tf.tasks import sinusoid


def _weights(model):
  return [v.numpy().copy() for v in model.weights]


def test_fused_adam_equals_keras_adam():
  runs = []
  for fused in (True, False):
    keras.utils.set_random_seed(2)
    maml = MAML(mlp(1, 1, hidden=(8, 8)), "mse", inner_lr=0.01,
                meta_optimizer=keras.optimizers.Adam(3e-3), closed_form=False)
    rng = np.random.default_rng(0)
    batches = [sinusoid.sample_batch(5, 4, 4, rng)[0] for _ in range(4)]
    plan = maml.plan(batches[0])
    assert plan.fused_update is True
    plan = plan.replace(fused_update=fused)
    metrics = [{k: float(v) for k, v in
                maml.train_step_tensors(b, plan=plan).items()}
               for b in batches]
    runs.append((metrics, _weights(maml.model),
                 [v.numpy() for v in maml.meta_optimizer.variables]))
  (m1, w1, o1), (m2, w2, o2) = runs
  assert w1[0].shape == w2[0].shape
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(o1, o2):         # iterations, m and v slots (float32)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
  assert int(o1[0]) == 4
  assert m1[-1]["loss_after"] == pytest.approx(m2[-1]["loss_after"], rel=1e-5)


def test_fused_adam_declines_what_it_does_not_implement():
  variables = [keras.Variable(np.zeros(3, "f4"))]
  for opt in (keras.optimizers.Adam(amsgrad=True),
              keras.optimizers.Adam(clipnorm=1.0),
              keras.optimizers.Adam(weight_decay=0.1),
              keras.optimizers.AdamW(), keras.optimizers.SGD()):
    opt.build(variables)
    assert fused_adam.fused_adam_update(opt, variables) is None
  opt = keras.optimizers.Adam()
  opt.build(variables)
  assert fused_adam.fused_adam_update(opt, variables) is not None
