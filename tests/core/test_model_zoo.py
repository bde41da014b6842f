"""A zoo of the models users bring: each meta-trains, has exact second-order
meta-gradients, adapts without touching the meta-model and exports.

Every case is built in float64 (smooth activations where the model is ours;
keras.applications as they are, with a finite-difference step far below any
ReLU kink's reach) and checked for:

* its execution plan (the path it runs on is the one the rules promise, and a
  model that cannot run task-batched says why in a ``PlanWarning``);
* the second-order meta-gradient of ``MAML.compute_gradients`` against a
  central finite difference of ``MAML.meta_loss`` along a random direction;
* a short meta-training run on a fixed meta-batch lowering its post-update
  query loss, with finite steps;
* ``MAML.adapt`` leaving every meta-model weight as it was and returning a
  model whose weights moved;
* ``export_adapted`` reloading to the same predictions.
"""

import contextlib
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, PlanWarning, TaskBatch
from maml_tf.export import export_adapted

T, K, Q = 2, 5, 5
WAYS = 5


@contextlib.contextmanager
def _floatx(dtype):
  """Layers made inside get ``dtype`` (floatx and the global policy)."""
  old, old_policy = keras.config.floatx(), keras.config.dtype_policy()
  keras.config.set_floatx(dtype)
  keras.config.set_dtype_policy(dtype)
  try:
    yield
  finally:
    keras.config.set_floatx(old)
    keras.config.set_dtype_policy(old_policy)


# ----------------------------------------------------------------- models
def _mobilenet_v2():
  # 64x64 (not 32x32): see STEP_SIZES.
  return keras.applications.MobileNetV2(
      input_shape=(64, 64, 3), alpha=0.35, weights=None, classes=WAYS,
      classifier_activation=None)


def _mobilenet_v3_small():
  # Its head holds Dropout(0.2): a random layer inside the inner loop.
  return keras.applications.MobileNetV3Small(
      input_shape=(32, 32, 3), alpha=0.75, minimalistic=True, weights=None,
      classes=WAYS, include_preprocessing=False, classifier_activation=None)


def _resnet_block():
  x = keras.Input((8, 8, 2))
  h = keras.layers.Conv2D(4, 3, padding="same")(x)
  h = keras.layers.BatchNormalization()(h)
  h = keras.layers.Activation("tanh")(h)
  r = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(h)
  h = keras.layers.Add()([h, r])
  h = keras.layers.AveragePooling2D(2)(h)
  h = keras.layers.Flatten()(h)
  return keras.Model(x, keras.layers.Dense(WAYS)(h), name="resnet_block")


def _convnext_block():
  x = keras.Input((8, 8, 4))
  h = keras.layers.DepthwiseConv2D(3, padding="same")(x)
  h = keras.layers.LayerNormalization(epsilon=1e-6)(h)
  h = keras.layers.Dense(16, activation="gelu")(h)
  h = keras.layers.Dense(4)(h)
  h = keras.layers.Add()([x, h])
  h = keras.layers.GlobalAveragePooling2D()(h)
  return keras.Model(x, keras.layers.Dense(WAYS)(h), name="convnext_block")


def _text_rnn(cell):
  def build():
    x = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(20, 8)(x)
    h = cell(8)(h)
    return keras.Model(x, keras.layers.Dense(WAYS)(h),
                       name=f"embedding_{cell.__name__.lower()}")
  return build


def _bidirectional():
  x = keras.Input((6,), dtype="int32")
  h = keras.layers.Embedding(20, 6, mask_zero=True)(x)    # ids 0: padding
  h = keras.layers.Bidirectional(
      keras.layers.LSTM(4, return_sequences=True))(h)
  h = keras.layers.TimeDistributed(keras.layers.Dense(3, activation="tanh"))(h)
  h = keras.layers.GRU(4, reset_after=False, go_backwards=True)(h)
  return keras.Model(x, keras.layers.Dense(WAYS)(h), name="bidirectional")


def _unet():
  """A small U-Net-style encoder-decoder: a strided convolution down,
  Conv2DTranspose up, a skip Concatenate, SeparableConv2D, BatchNorm."""
  x = keras.Input((8, 8, 2))
  c1 = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(x)
  c2 = keras.layers.Conv2D(6, 3, strides=2, padding="same",
                           activation="tanh")(c1)
  u = keras.layers.Conv2DTranspose(4, 2, strides=2, padding="same")(c2)
  h = keras.layers.Concatenate()([u, c1])
  h = keras.layers.SeparableConv2D(4, 3, padding="same")(h)
  h = keras.layers.Activation("tanh")(keras.layers.BatchNormalization()(h))
  h = keras.layers.GlobalAveragePooling2D()(h)
  return keras.Model(x, keras.layers.Dense(WAYS)(h), name="unet")


def _conv1d():
  x = keras.Input((10, 3))
  h = keras.layers.Conv1D(6, 3, activation="tanh")(x)
  h = keras.layers.LayerNormalization()(h)
  h = keras.layers.GlobalAveragePooling1D()(h)
  return keras.Model(x, keras.layers.Dense(WAYS)(h), name="conv1d")


def _transformer():
  x = keras.Input((6, 8))
  a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(x, x)
  h = keras.layers.LayerNormalization()(keras.layers.Add()([x, a]))
  f = keras.layers.Dense(16, activation="gelu")(h)
  h = keras.layers.LayerNormalization()(
      keras.layers.Add()([h, keras.layers.Dense(8)(f)]))
  h = keras.layers.GlobalAveragePooling1D()(h)
  return keras.Model(x, keras.layers.Dense(WAYS)(h), name="transformer")


def _masked_transformer():
  """A text transformer on padded ids: Embedding(mask_zero=True), attention
  over the masked tokens, mean over the unmasked ones."""
  x = keras.Input((6,), dtype="int32")
  e = keras.layers.Embedding(20, 8, mask_zero=True)(x)    # ids 0: padding
  a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(e, e)
  h = keras.layers.LayerNormalization()(keras.layers.Add()([e, a]))
  h = keras.layers.GlobalAveragePooling1D()(h)
  return keras.Model(x, keras.layers.Dense(WAYS)(h), name="masked_transformer")


class Scale(keras.layers.Layer):
  """A custom layer with its own ``add_weight``."""

  def build(self, input_shape):
    self.gain = self.add_weight(shape=(input_shape[-1],), initializer="ones")
    self.shift = self.add_weight(shape=(input_shape[-1],),
                                 initializer="zeros")

  def call(self, x):
    return keras.ops.tanh(x * self.gain + self.shift)


def _custom_layer():
  return keras.Sequential([keras.Input((3,)), keras.layers.Dense(8), Scale(),
                           keras.layers.Dense(1)], name="custom_add_weight")


def _group_norm():
  return keras.Sequential([
      keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, groups=2),
      keras.layers.GroupNormalization(groups=2),
      keras.layers.Activation("tanh"), keras.layers.Flatten(),
      keras.layers.Dense(WAYS)], name="group_norm")


def _dropout_mlp():
  return keras.Sequential([
      keras.Input((3,)), keras.layers.Dense(12, activation="tanh"),
      keras.layers.Dropout(0.3), keras.layers.Dense(1)], name="dropout_mlp")


class WithTraining(keras.Model):
  """Subclassed, ``call(x, training)``, with ``get_config``."""

  def __init__(self, width=8, **kwargs):
    super().__init__(**kwargs)
    self.width = width
    self.hidden = keras.layers.Dense(width, activation="tanh")
    self.norm = keras.layers.BatchNormalization()
    self.out = keras.layers.Dense(1)

  def call(self, x, training=None):
    return self.out(self.norm(self.hidden(x), training=training))

  def get_config(self):
    return {**super().get_config(), "width": self.width}


class NoTrainingArg(keras.Model):
  """Subclassed, ``call(x)`` only, with ``get_config``."""

  def __init__(self, width=8, **kwargs):
    super().__init__(**kwargs)
    self.width = width
    self.hidden = keras.layers.Dense(width, activation="softplus")
    self.out = keras.layers.Dense(1)

  def call(self, x):
    return self.out(self.hidden(x))

  def get_config(self):
    return {**super().get_config(), "width": self.width}


class Bare(keras.Model):
  """Subclassed, ``call(x)`` only, no ``get_config`` (a research model)."""

  def __init__(self, width):
    super().__init__()
    self.hidden = keras.layers.Dense(width, activation="gelu")
    self.out = keras.layers.Dense(1)

  def call(self, x):
    return self.out(self.hidden(x))


class BareWithTraining(Bare):
  """Subclassed, ``call(x, training)``, no ``get_config``."""

  def __init__(self, width):
    super().__init__(width)
    self.drop = keras.layers.Dropout(0.0)

  def call(self, x, training=None):
    return self.out(self.drop(self.hidden(x), training=training))


def _subclassed(cls, *args):
  def build():
    model = cls(*args)
    model(np.zeros((1, 3)))
    return model
  build.__name__ = cls.__name__
  return build


class ConvNet(keras.Model):
  """Subclassed, the common research shape: conv, BatchNorm, dropout."""

  def __init__(self):
    super().__init__()
    self.conv = keras.layers.Conv2D(4, 3, strides=2, padding="same",
                                    activation="tanh")
    self.norm = keras.layers.BatchNormalization()
    self.drop = keras.layers.Dropout(0.2)
    self.head = keras.layers.Dense(WAYS)

  def call(self, x, training=False):
    h = self.norm(self.conv(x), training=training)
    h = self.drop(keras.ops.reshape(h, (-1, 36)), training=training)
    return self.head(h)


class ResidualBlock(keras.layers.Layer):
  """A user's block: a Layer made of Keras layers (traced, batched)."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.conv = keras.layers.Conv2D(2, 3, padding="same")
    self.norm = keras.layers.BatchNormalization()

  def call(self, x, training=None):
    return keras.ops.tanh(x + self.norm(self.conv(x), training=training))


def _user_blocks():
  x = keras.Input((6, 6, 2))
  h = ResidualBlock()(ResidualBlock()(x))
  h = keras.layers.GlobalAveragePooling2D()(h)
  return keras.Model(x, keras.layers.Dense(WAYS)(h), name="user_blocks")


def _subclassed_conv():
  model = ConvNet()
  model(np.zeros((1, 6, 6, 1)))
  return model


def _two_inputs():
  a = keras.Input((3,), name="a")
  b = keras.Input((2,), name="b")
  h = keras.layers.Concatenate()([keras.layers.Dense(8, activation="tanh")(a),
                                  keras.layers.Dense(4, activation="tanh")(b)])
  return keras.Model([a, b], keras.layers.Dense(1)(h), name="two_inputs")


# ----------------------------------------------------------------- data
def _images(shape):
  def make(rng):
    x = lambda n: rng.normal(size=(T, n) + shape)
    y = lambda n: np.stack([rng.permutation(np.arange(n) % WAYS)
                            for _ in range(T)]).astype(np.int32)
    return TaskBatch(x(K), y(K), x(Q), y(Q))
  return make


def _tokens(rng):
  """Ids 1-19, the last two steps of half the sequences 0 (padding)."""
  def x(n):
    ids = rng.integers(1, 20, size=(T, n, 6)).astype(np.int32)
    ids[:, ::2, 4:] = 0
    return ids
  y = lambda n: rng.integers(0, WAYS, size=(T, n)).astype(np.int32)
  return TaskBatch(x(K), y(K), x(Q), y(Q))


def _regression(rng, inputs=((3,),)):
  def x(n):
    parts = tuple(rng.normal(size=(T, n) + s) for s in inputs)
    return parts if len(parts) > 1 else parts[0]
  sx, qx = x(K), x(Q)
  target = lambda v: np.sin(sum(p.sum(-1, keepdims=True)
                                for p in tf.nest.flatten(v)))
  return TaskBatch(sx, target(sx), qx, target(qx))


CLASSES = "classes"      # sparse cross-entropy on logits, in float64
# name: (build, batch, loss, executions the plan may take)
CASES = {
    "mobilenet_v2": (_mobilenet_v2, _images((64, 64, 3)), CLASSES,
                     ("batched",)),
    "mobilenet_v3_small": (_mobilenet_v3_small, _images((32, 32, 3)),
                           CLASSES, ("batched",)),
    "resnet_block": (_resnet_block, _images((8, 8, 2)), CLASSES,
                     ("batched",)),
    "convnext_block": (_convnext_block, _images((8, 8, 4)), CLASSES,
                       ("batched",)),
    "embedding_gru": (_text_rnn(keras.layers.GRU), _tokens, CLASSES,
                      ("batched",)),
    "embedding_lstm": (_text_rnn(keras.layers.LSTM), _tokens, CLASSES,
                       ("batched",)),
    # Padded token ids masked (mask_zero) for the recurrent layers.
    "bidirectional_lstm": (_bidirectional, _tokens, CLASSES, ("batched",)),
    "unet": (_unet, _images((8, 8, 2)), CLASSES, ("batched",)),
    "conv1d": (_conv1d, _images((10, 3)), CLASSES,
               ("batched",)),
    "transformer": (_transformer, _images((6, 8)), CLASSES,
                    ("batched",)),
    "masked_transformer": (_masked_transformer, _tokens, CLASSES,
                           ("batched",)),
    "custom_add_weight": (_custom_layer, _regression, "mse",
                          ("vectorized_map",)),
    "group_norm": (_group_norm, _images((6, 6, 2)), CLASSES,
                   ("batched",)),
    "dropout": (_dropout_mlp, _regression, "mse", ("batched",)),
    # Subclassed models run task-batched: their call traced into layers.
    "subclassed_training_config": (_subclassed(WithTraining), _regression,
                                   "mse", ("batched",)),
    "subclassed_no_training": (_subclassed(NoTrainingArg), _regression, "mse",
                               ("batched",)),
    "subclassed_no_config": (_subclassed(Bare, 8), _regression, "mse",
                             ("batched",)),
    "subclassed_training_no_config": (_subclassed(BareWithTraining, 8),
                                      _regression, "mse", ("batched",)),
    "subclassed_conv_dropout": (_subclassed_conv, _images((6, 6, 1)),
                                CLASSES, ("batched",)),
    "user_block_layers": (_user_blocks, _images((6, 6, 2)), CLASSES,
                          ("batched",)),
    "two_inputs": (_two_inputs,
                   lambda rng: _regression(rng, ((3,), (2,))), "mse",
                   ("batched",)),
}


# (inner_lr, meta learning rate); default (0.05, 1e-3). keras.applications
# end in maps of (side / 32)^2 positions, and an untrained one's BatchNorm
# over 5 images of so few positions gives inner gradients of norm ~1e4:
# steps that large make the meta-loss rough, so these cases take small ones.
# MobileNetV2 at 32x32 (1x1 maps) stays too rough at any step size (its
# meta-gradient norm ~1e5; a 6-step run went up or down with the machine's
# rounding), so it runs at 64x64 (2x2 maps).
STEP_SIZES = {"mobilenet_v2": (1e-4, 1e-4), "mobilenet_v3_small": (1e-4, 1e-4)}


def _meta_loss_along(maml, batch, direction, eps):
  """Central difference of the meta-loss along ``direction``."""
  variables = maml.model.trainable_variables
  base = [v.numpy() for v in variables]
  values = []
  for sign in (1, -1):
    for v, b, d in zip(variables, base, direction):
      v.assign(b + sign * eps * d)
    values.append(float(maml.meta_loss(batch)))
  for v, b in zip(variables, base):
    v.assign(b)
  return (values[0] - values[1]) / (2 * eps)


@pytest.mark.parametrize("name", sorted(CASES))
def test_model(name, tmp_path):
  build, make_batch, loss, executions = CASES[name]
  keras.utils.set_random_seed(7)
  with _floatx("float64"):
    model = build()
  assert model.trainable_variables[0].dtype == "float64"
  if loss == CLASSES:
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      dtype="float64")
  else:
    loss = keras.losses.MeanSquaredError(dtype="float64")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    inner_lr, meta_lr = STEP_SIZES.get(name, (0.05, 1e-3))
    maml = MAML(model, loss, inner_lr=inner_lr, inner_steps=1,
                meta_optimizer=keras.optimizers.Adam(meta_lr))
  rng = np.random.default_rng(3)
  batch = maml.prepare(make_batch(rng))
  # (First: a runtime fallback is then part of the plan.)
  # A short run on this meta-batch lowers its post-update query loss (with
  # the same random-layer masks throughout: each meta-step advances seeds).
  seeds = [v for v, kind in zip(model.non_trainable_variables,
                                maml.state_kinds) if kind == "seed"]
  start_seeds = [v.numpy() for v in seeds]
  start = float(maml.meta_loss(batch))
  for _ in range(6):
    for v, value in zip(seeds, start_seeds):
      v.assign(value)
    metrics = maml.train_step(batch)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    for v, value in zip(seeds, start_seeds):
      assert not np.array_equal(v.numpy(), value)   # a step advances seeds
  for v, value in zip(seeds, start_seeds):
    v.assign(value)
  end = float(maml.meta_loss(batch))
  assert end < start, (start, end)

  plan = maml.plan(batch)
  print(f"{name}: {plan.describe()}", dict(plan.reasons))
  assert plan.execution in executions, (plan.execution, plan.reasons)
  fell_back = [w for w in caught if issubclass(w.category, PlanWarning)]
  if plan.execution != "batched":
    assert fell_back and "task-batched" in str(fell_back[0].message)
    assert dict(plan.reasons)["execution"]

  # Second order against a finite difference along a random direction.
  direction = [rng.normal(size=v.shape) for v in model.trainable_variables]
  norm = np.sqrt(sum(np.sum(d * d) for d in direction))
  direction = [d / norm for d in direction]
  grads = maml.compute_gradients(batch, plan).grads
  analytic = sum(float(np.sum(g.numpy() * d))
                 for g, d in zip(grads, direction))
  # Strongly curved nets (BatchNorm over a few 1x1 maps) need small steps.
  err, numeric = min(
      (abs(analytic - n) / max(abs(n), 1e-3), n) for n in
      (_meta_loss_along(maml, batch, direction, eps)
       for eps in (1e-6, 1e-7, 1e-8)))
  print(f"{name}: directional derivative {analytic:.8g} vs {numeric:.8g}, "
        f"relative error {err:.2e}")
  assert err < 1e-5, (analytic, numeric)

  # adapt leaves the meta-model untouched and moves the adapted weights.
  before = [v.numpy().copy() for v in model.weights]
  sx = tf.nest.map_structure(lambda t: t[0], batch.support_x)
  qx = tf.nest.map_structure(lambda t: t[0], batch.query_x)
  adapted = maml.adapt(sx, batch.support_y[0])
  for b, v in zip(before, model.weights):
    np.testing.assert_array_equal(b, v.numpy())
  moved = max(float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in
              zip(adapted.trainable_variables, model.trainable_variables))
  assert moved > 0

  # The export reloads to the adapted model's predictions.
  export_adapted(adapted, str(tmp_path / "adapted"), verify_with=qx,
                 atol=1e-8)
