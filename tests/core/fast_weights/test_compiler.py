"""Task-batched fast weights against a per-task functional_call loop."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf.core import fast_weights
from maml_tf.core.fast_weights import Unsupported, compile_batched
from maml_tf.core.functional import functional_call

T = 3
CONV_IMPLS = ("patches", "grouped", "map")
L = keras.layers


# ------------------------------------------------------------------ models
def _omniglot(dtype, size=9, first_filters=4, name="omniglot_mini"):
  """The Omniglot net in miniature: strided 'same' convs on odd sizes."""
  return keras.Sequential([
      keras.Input((size, size, 1), dtype=dtype),
      L.Conv2D(first_filters, 3, strides=2, padding="same", dtype=dtype),
      L.BatchNormalization(dtype=dtype),
      L.ReLU(dtype=dtype),
      L.Conv2D(4, 3, strides=2, padding="same", dtype=dtype),
      L.BatchNormalization(dtype=dtype),
      L.ReLU(dtype=dtype),
      L.Flatten(dtype=dtype),
      L.Dense(3, dtype=dtype)], name=name)


def _miniimagenet(dtype):
  return keras.Sequential([
      keras.Input((8, 8, 3), dtype=dtype),
      L.Conv2D(4, 3, padding="same", dtype=dtype),
      L.BatchNormalization(dtype=dtype),
      L.ReLU(dtype=dtype),
      L.MaxPooling2D(2, dtype=dtype),
      L.Flatten(dtype=dtype),
      L.Dense(3, dtype=dtype)], name="miniimagenet_mini")


def _mlp_layernorm(dtype):
  return keras.Sequential([
      keras.Input((5,), dtype=dtype),
      L.Dense(8, dtype=dtype),
      L.LayerNormalization(dtype=dtype),
      L.Activation("tanh", dtype=dtype),
      L.Dropout(0.0, dtype=dtype),
      L.Dense(3, dtype=dtype)], name="mlp_layernorm")


def _skip(dtype):
  """Functional: Add skip connection, Concatenate, 'same' average pooling."""
  inp = keras.Input((5, 5, 2), dtype=dtype)
  a = L.Conv2D(3, 3, padding="same", activation="relu", dtype=dtype)(inp)
  b = L.Conv2D(3, 1, dtype=dtype)(a)
  b = L.BatchNormalization(center=False, dtype=dtype)(b)
  c = L.Add(dtype=dtype)([a, b])
  d = L.Concatenate(dtype=dtype)([c, inp])
  e = L.AveragePooling2D(2, padding="same", dtype=dtype)(d)
  f = L.Flatten(dtype=dtype)(e)
  out = L.Dense(3, activation="tanh", dtype=dtype)(f)
  return keras.Model(inp, out, name="skip")


def _odd(dtype):
  """'valid' convolution with a non-square kernel, 'same' max-pooling."""
  return keras.Sequential([
      keras.Input((7, 7, 2), dtype=dtype),
      L.Conv2D(3, (3, 2), strides=2, padding="valid", dtype=dtype),
      L.BatchNormalization(scale=False, dtype=dtype),
      L.Activation("elu", dtype=dtype),
      L.MaxPooling2D(2, padding="same", dtype=dtype),
      L.Flatten(dtype=dtype),
      L.Dense(3, dtype=dtype)], name="odd")


def _sequence(dtype):
  """Dense on ``[N, S, D]`` inputs (extra middle axis)."""
  return keras.Sequential([
      keras.Input((4, 5), dtype=dtype),
      L.Dense(6, activation="relu", dtype=dtype),
      L.LayerNormalization(center=False, dtype=dtype),
      L.Flatten(dtype=dtype),
      L.Dense(3, use_bias=False, dtype=dtype)], name="sequence")


def _omniglot_fold(dtype):
  """First layer folded into its BatchNorm (9 inputs per pixel, 12 filters)."""
  return _omniglot(dtype, first_filters=12, name="omniglot_fold")


def _odd_fold(dtype):
  """Folded: 'valid', non-square kernel, no bias, BatchNorm without beta."""
  return keras.Sequential([
      keras.Input((7, 7, 2), dtype=dtype),
      L.Conv2D(12, (3, 2), strides=2, padding="valid", use_bias=False,
               dtype=dtype),
      L.BatchNormalization(center=False, dtype=dtype),
      L.Activation("elu", dtype=dtype),
      L.Flatten(dtype=dtype),
      L.Dense(3, dtype=dtype)], name="odd_fold")


def _conv1d(dtype):
  """Conv1D ('same' strided, 'valid' without bias), SeparableConv1D
  ('same' with a depth multiplier, 'valid' dilated without bias, 'same'
  strided),
  LayerNorm, BatchNorm on sequences, global pooling."""
  return keras.Sequential([
      keras.Input((9, 2), dtype=dtype),
      L.Conv1D(3, 3, strides=2, padding="same", activation="tanh",
               dtype=dtype),
      L.SeparableConv1D(3, 3, padding="same", depth_multiplier=2,
                        activation="tanh", dtype=dtype),
      L.SeparableConv1D(3, 2, padding="valid", dilation_rate=2,
                        use_bias=False, dtype=dtype),
      L.SeparableConv1D(3, 2, strides=2, padding="same", dtype=dtype),
      L.LayerNormalization(dtype=dtype),
      L.Conv1D(4, 2, padding="valid", use_bias=False, dtype=dtype),
      L.BatchNormalization(dtype=dtype),
      L.Activation("elu", dtype=dtype),
      L.GlobalAveragePooling1D(dtype=dtype),
      L.Dense(3, dtype=dtype)], name="conv1d")


def _depthwise(dtype):
  """DepthwiseConv2D (multiplier 2, strided 'same'; 'valid' without bias)
  with BatchNorm, as in MobileNets."""
  return keras.Sequential([
      keras.Input((7, 7, 3), dtype=dtype),
      L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2,
                        activation="tanh", dtype=dtype),
      L.BatchNormalization(dtype=dtype),
      L.DepthwiseConv2D((2, 3), padding="valid", use_bias=False,
                        dtype=dtype),
      L.Activation("elu", dtype=dtype),
      L.GlobalAveragePooling2D(dtype=dtype),
      L.Dense(3, dtype=dtype)], name="depthwise")


def _dilated(dtype):
  """A TCN-style stack: causal dilated Conv1D (1, 2, 4), a dilated
  'same' Conv2D on the sequence as an image and a dilated depthwise
  convolution; a 1x1-fan-in dilated Conv2D before BatchNorm (not folded)."""
  inp = keras.Input((12, 2), dtype=dtype)
  h = inp
  for rate in (1, 2, 4):
    h = L.Conv1D(3, 2, padding="causal", dilation_rate=rate,
                 activation="tanh", dtype=dtype)(h)
  img = L.Reshape((12, 3, 1), dtype=dtype)(h)
  img = L.Conv2D(4, (3, 2), padding="same", dilation_rate=(2, 1),
                 dtype=dtype)(img)
  img = L.BatchNormalization(dtype=dtype)(img)
  img = L.DepthwiseConv2D(2, dilation_rate=2, activation="tanh",
                          dtype=dtype)(img)
  out = L.Dense(3, dtype=dtype)(L.GlobalAveragePooling2D(dtype=dtype)(img))
  return keras.Model(inp, out, name="dilated")


def _text(dtype):
  """Token ids: Embedding, Conv1D, global pooling (fastText-like)."""
  return keras.Sequential([
      keras.Input((6,), dtype="int32"),
      L.Embedding(20, 4, dtype=dtype),
      L.Conv1D(5, 3, activation="tanh", dtype=dtype),
      L.GlobalAveragePooling1D(dtype=dtype),
      L.Dense(3, dtype=dtype)], name="text")


def _preprocessed(dtype):
  """Weightless per-example layers: Normalization (adapted), Rescaling,
  padding and cropping, elementwise merges, reshapes and global pooling."""
  inp = keras.Input((6, 6, 2), dtype=dtype)
  norm = L.Normalization(dtype=dtype)
  norm.adapt(np.random.default_rng(5).normal(2.0, 3.0, (20, 6, 6, 2)).astype(
      dtype))
  a = L.Rescaling(0.5, offset=0.1, dtype=dtype)(norm(inp))
  a = L.Conv2D(3, 3, activation="tanh", dtype=dtype)(
      L.ZeroPadding2D(1, dtype=dtype)(a))                       # 6x6x3
  b = L.ZeroPadding2D(1, dtype=dtype)(L.Cropping2D(1, dtype=dtype)(a))
  c = L.Subtract(dtype=dtype)([a, L.Multiply(dtype=dtype)([a, b])])
  d = L.Maximum(dtype=dtype)([L.Average(dtype=dtype)([a, c]),
                              L.Minimum(dtype=dtype)([b, c])])
  e = L.Concatenate(dtype=dtype)([L.GlobalAveragePooling2D(dtype=dtype)(d),
                                  L.GlobalMaxPooling2D(dtype=dtype)(d)])
  f = L.Permute((2, 1), dtype=dtype)(L.Reshape((3, 2), dtype=dtype)(e))
  g = L.Concatenate(dtype=dtype)([L.GlobalAveragePooling1D(dtype=dtype)(f),
                                  L.GlobalMaxPooling1D(dtype=dtype)(f)])
  out = L.Dense(3, activation="tanh", dtype=dtype)(L.Identity(dtype=dtype)(g))
  return keras.Model(inp, out, name="preprocessed")


def _operations(dtype):
  """Keras operations between layers, as functional models write them:
  ``x * c + x``, self-attention by ``matmul``/``transpose``/``softmax``,
  indexing, concatenation, reshape, reductions over feature axes."""
  ops = keras.ops
  inp = keras.Input((4, 3), dtype=dtype)
  a = L.Dense(5, dtype=dtype)(inp)
  b = ops.tanh(a) * 0.5 + a
  scores = ops.softmax(ops.matmul(b, ops.transpose(b, (0, 2, 1))), axis=-1)
  c = ops.concatenate([ops.matmul(scores, b), b[:, :, :2]], axis=-1)
  d = ops.reshape(c, (-1, 28))
  e = ops.concatenate([d, b[:, 0], ops.mean(ops.square(b), axis=1)], axis=-1)
  out = L.Dense(3, dtype=dtype)(ops.gelu(ops.expand_dims(e, 1))[:, 0])
  return keras.Model(inp, out, name="operations")


def _attention(dtype):
  """Self-attention with a residual and LayerNorm; gated causal
  cross-attention (query shorter than key and value, its own key); a
  standalone EinsumDense."""
  inp = keras.Input((5, 4), dtype=dtype)
  h = L.Dense(6, dtype=dtype)(inp)
  a = L.MultiHeadAttention(2, 3, dtype=dtype)(h, h)
  x = L.LayerNormalization(dtype=dtype)(h + a)
  c = L.MultiHeadAttention(2, 2, value_dim=3, output_shape=4, use_gate=True,
                           dtype=dtype)(
                               x[:, :3], x, key=L.Dense(6, dtype=dtype)(x),
                               use_causal_mask=True)
  e = L.EinsumDense("abc,cd->abd", output_shape=(3, 5), bias_axes="d",
                    activation="tanh", dtype=dtype)(c)
  return keras.Model(inp, L.Dense(3, dtype=dtype)(L.Flatten(dtype=dtype)(e)),
                     name="attention")


def _scored_attention(dtype):
  """Attention (dot with and without a learned scale, concat scores with
  its own key) and AdditiveAttention with a learned scale."""
  inp = keras.Input((5, 4), dtype=dtype)
  h = L.Dense(6, activation="tanh", dtype=dtype)(inp)
  a = L.Attention(use_scale=True, dtype=dtype)([h, h])
  b = L.Attention(dtype=dtype)([h[:, :3], h], use_causal_mask=False)
  k = L.Dense(6, dtype=dtype)(h)
  c = L.Attention(use_scale=True, score_mode="concat", dtype=dtype)(
      [h[:, :2], h, k])
  d = L.AdditiveAttention(dtype=dtype)([h, a])
  e = L.AdditiveAttention(use_scale=False, dtype=dtype)([a, h])
  out = L.Concatenate(axis=1, dtype=dtype)([a, b, c, d, e])
  return keras.Model(inp, L.Dense(3, dtype=dtype)(L.Flatten(dtype=dtype)(out)),
                     name="scored_attention")


def _recurrent(dtype):
  """LSTM, GRU (both reset modes, backwards), SimpleRNN, RNN over a cell and
  over stacked cells, Bidirectional (concat and sum) and TimeDistributed."""
  inp = keras.Input((5, 3), dtype=dtype)
  a = L.LSTM(4, return_sequences=True, dtype=dtype)(inp)
  b = L.GRU(4, return_sequences=True, go_backwards=True, dtype=dtype)(a)
  c = L.GRU(3, reset_after=False, dtype=dtype)(b)
  d = L.SimpleRNN(3, go_backwards=True, dtype=dtype)(a)
  e = L.Bidirectional(L.LSTM(2, return_sequences=True, dtype=dtype),
                      dtype=dtype)(inp)
  e = L.TimeDistributed(L.Dense(3, activation="tanh", dtype=dtype),
                        dtype=dtype)(e)
  f = L.Bidirectional(L.GRU(2, dtype=dtype), merge_mode="sum",
                      dtype=dtype)(e)
  g = L.RNN(L.LSTMCell(2, use_bias=False, dtype=dtype), dtype=dtype)(inp)
  s = L.RNN(L.StackedRNNCells([L.GRUCell(3, dtype=dtype),
                               L.LSTMCell(2, dtype=dtype)], dtype=dtype),
            go_backwards=True, return_sequences=True, dtype=dtype)(inp)
  out = L.Dense(3, dtype=dtype)(L.Concatenate(dtype=dtype)(
      [c, d, f, g, L.Flatten(dtype=dtype)(s)]))
  return keras.Model(inp, out, name="recurrent")


def _resampled(dtype):
  """1-D pooling, upsampling, padding and cropping, UnitNormalization,
  RepeatVector, UpSampling2D (nearest), 3-D padding, cropping and global
  pooling."""
  inp = keras.Input((8, 3), dtype=dtype)
  h = L.Conv1D(4, 3, activation="tanh", dtype=dtype)(inp)          # 6 x 4
  h = L.UpSampling1D(2, dtype=dtype)(L.MaxPooling1D(2, dtype=dtype)(h))
  h = L.Cropping1D((2, 1), dtype=dtype)(L.ZeroPadding1D(1, dtype=dtype)(h))
  h = L.AveragePooling1D(2, padding="same", dtype=dtype)(h)        # 3 x 4
  h = L.UnitNormalization(dtype=dtype)(h)
  v = L.RepeatVector(2, dtype=dtype)(L.Flatten(dtype=dtype)(h))     # 2 x 12
  img = L.UpSampling2D(2, dtype=dtype)(L.Reshape((3, 4, 2), dtype=dtype)(
      L.Dense(24, activation="tanh", dtype=dtype)(L.Flatten(dtype=dtype)(v))))
  vol = L.Reshape((6, 8, 2, 1), dtype=dtype)(img)
  vol = L.ZeroPadding3D(1, dtype=dtype)(
      L.Cropping3D(((1, 1), (0, 0), (0, 0)), dtype=dtype)(
          L.UpSampling3D((1, 1, 2), dtype=dtype)(vol)))
  out = L.Concatenate(dtype=dtype)([L.GlobalAveragePooling3D(dtype=dtype)(vol),
                                    L.GlobalMaxPooling3D(dtype=dtype)(vol)])
  return keras.Model(inp, L.Dense(3, dtype=dtype)(out), name="resampled")


def _transposed(dtype):
  """Conv2DTranspose (strides, output_padding, 'valid'), Conv1DTranspose,
  Conv3DTranspose: a decoder's upsampling; a Conv3D."""
  inp = keras.Input((3, 3, 2), dtype=dtype)
  h = L.Conv2DTranspose(3, 3, strides=2, padding="same", activation="tanh",
                        dtype=dtype)(inp)                              # 6x6
  h = L.Conv2DTranspose(2, 2, strides=2, output_padding=1,
                        use_bias=False, dtype=dtype)(h)                # 13x13
  s = L.Conv1DTranspose(2, 3, strides=2, activation="tanh", dtype=dtype)(
      L.Reshape((9, 2), dtype=dtype)(inp))
  v = L.Conv3DTranspose(1, 2, strides=(1, 2, 2), activation="tanh",
                        dtype=dtype)(L.Reshape((1, 3, 3, 2), dtype=dtype)(inp))
  v = L.Conv3D(2, 2, padding="same", activation="tanh", dtype=dtype)(v)
  out = L.Concatenate(dtype=dtype)([L.GlobalAveragePooling2D(dtype=dtype)(h),
                                    L.Flatten(dtype=dtype)(s),
                                    L.GlobalAveragePooling3D(dtype=dtype)(v)])
  return keras.Model(inp, L.Dense(3, dtype=dtype)(out), name="transposed")


def _grouped(dtype):
  """Grouped Conv2D and Conv1D (ResNeXt-style), GroupNormalization on
  images and on vectors, SeparableConv2D (Xception-style; strides,
  dilation, depth multiplier)."""
  inp = keras.Input((6, 6, 4), dtype=dtype)
  a = L.Conv2D(6, 3, groups=2, padding="same", dtype=dtype)(inp)
  a = L.GroupNormalization(3, dtype=dtype)(a)
  a = L.Conv2D(4, 3, groups=2, strides=2, activation="tanh",
               dtype=dtype)(a)
  b = L.Conv1D(4, 2, groups=4, activation="tanh", dtype=dtype)(
      L.Reshape((4, 4), dtype=dtype)(a))
  b = L.GroupNormalization(2, scale=False, dtype=dtype)(
      L.Flatten(dtype=dtype)(b))
  s = L.SeparableConv2D(3, 3, depth_multiplier=2, padding="same",
                        activation="tanh", dtype=dtype)(inp)
  s = L.SeparableConv2D(2, 2, strides=2, use_bias=False, dtype=dtype)(s)
  s = L.SeparableConv2D(2, 2, dilation_rate=2, dtype=dtype)(s)
  b = L.Concatenate(dtype=dtype)([b, L.Flatten(dtype=dtype)(s)])
  return keras.Model(inp, L.Dense(3, dtype=dtype)(b), name="grouped")


MODELS = {"sequence": _sequence, "omniglot": _omniglot, "miniimagenet": _miniimagenet,
          "mlp_layernorm": _mlp_layernorm, "skip": _skip, "odd": _odd,
          "omniglot_fold": _omniglot_fold, "odd_fold": _odd_fold,
          "preprocessed": _preprocessed, "conv1d": _conv1d,
          "depthwise": _depthwise, "text": _text, "operations": _operations,
          "attention": _attention, "scored_attention": _scored_attention,
          "dilated": _dilated,
          "recurrent": _recurrent, "grouped": _grouped,
          "resampled": _resampled, "transposed": _transposed}
CONV_MODELS = ("omniglot", "miniimagenet", "skip", "odd", "omniglot_fold",
               "odd_fold", "preprocessed", "conv1d", "depthwise", "dilated",
               "grouped")


def _cases():
  for name in MODELS:
    for impl in (CONV_IMPLS if name in CONV_MODELS else ("patches",)):
      yield name, impl


# ------------------------------------------------------------------ helpers
def _per_task(model, rng, dtype):
  """Different params and state per task: tiled weights, perturbed."""
  def perturb(v, positive=False):
    if "int" in str(v.dtype):     # a counter (Normalization's): tiled
      return tf.constant(np.stack([v.numpy()] * T))
    base = np.asarray(v.numpy(), dtype)
    noise = 0.3 * rng.normal(size=(T,) + base.shape)
    out = base[None] + noise
    return tf.constant(np.abs(out) + 0.1 if positive else out, dtype)
  params = [perturb(v) for v in model.trainable_variables]
  state = [perturb(v, "variance" in v.path) for v in model.non_trainable_variables]
  return params, state


def _inputs(model, rng, dtype, n=4):
  shape = tuple(model.inputs[0].shape[1:])
  if "int" in model.inputs[0].dtype:      # token ids, negative ones too
    return tf.constant(rng.integers(-20, 20, size=(T, n) + shape), "int32")
  return tf.constant(rng.normal(size=(T, n) + shape), dtype)


def _loop(model, params, state, x, training):
  ys, states = [], []
  for t in range(T):
    y, s = functional_call(model, [p[t] for p in params],
                           [s[t] for s in state], x[t], training)
    ys.append(y)
    states.append(s)
  return tf.stack(ys), [tf.stack(s) for s in zip(*states)]


# --------------------------------------------------------------- 1. values
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-10)])
@pytest.mark.parametrize("name,impl", list(_cases()))
def test_matches_per_task_loop(name, impl, dtype, tol):
  rng = np.random.default_rng(0)
  model = MODELS[name](dtype)
  params, state = _per_task(model, rng, dtype)
  x = _inputs(model, rng, dtype)
  batched = compile_batched(model, conv_impl=impl)
  for training in (True, False):
    y, new_state = batched(params, state, x, training=training)
    y_ref, state_ref = _loop(model, params, state, x, training)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    assert len(new_state) == len(state_ref)
    for a, b in zip(new_state, state_ref):
      np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    if not training:
      for a, b in zip(new_state, state):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["omniglot", "recurrent", "grouped",
                                  "transposed", "attention"])
def test_shared_params_equal_tiled(name):
  """Parameters without the task axis (shared, as an adapt mask leaves
  them): the same outputs as tiled ones, gradients summed over tasks."""
  rng = np.random.default_rng(1)
  model = MODELS[name]("float64")
  x = _inputs(model, rng, "float64")
  shared = [v.value for v in model.trainable_variables]
  state = [v.value for v in model.non_trainable_variables]
  tiled = [tf.tile(p[None], [T] + [1] * p.shape.rank) for p in shared]
  batched = compile_batched(model, conv_impl="patches")
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(shared + tiled)
    y_shared, s_shared = batched(shared, state, x)
    y_tiled, s_tiled = batched(tiled, state, x)
    loss_shared = tf.reduce_sum(tf.sin(y_shared))
    loss_tiled = tf.reduce_sum(tf.sin(y_tiled))
  np.testing.assert_allclose(y_shared, y_tiled, rtol=1e-10, atol=1e-10)
  for a, b in zip(s_shared, s_tiled):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
  g_shared = tape.gradient(loss_shared, shared)
  g_tiled = tape.gradient(loss_tiled, tiled)
  for a, b in zip(g_shared, g_tiled):
    np.testing.assert_allclose(a, tf.reduce_sum(b, 0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", ["map", "patches"])
def test_unknown_task_and_example_counts(impl):
  rng = np.random.default_rng(4)
  model = _omniglot("float64")
  params, state = _per_task(model, rng, "float64")
  x = _inputs(model, rng, "float64")
  batched = compile_batched(model, conv_impl=impl)
  spec = lambda t: tf.TensorSpec([None] + t.shape[1:], t.dtype)
  fn = tf.function(lambda p, s, x: batched(p, s, x), input_signature=[
      [spec(p) for p in params], [spec(v) for v in state],
      tf.TensorSpec([None, None, 9, 9, 1], tf.float64)])
  y, new_state = fn(params, state, x)
  y_ref, state_ref = _loop(model, params, state, x, True)
  np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
  for a, b in zip(new_state, state_ref):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_transposed_convolutions_with_unknown_task_count():
  """Per-task transposed convolutions under tf.map_fn when T is unknown."""
  rng = np.random.default_rng(9)
  model = _transposed("float64")
  params, state = _per_task(model, rng, "float64")
  x = _inputs(model, rng, "float64")
  batched = compile_batched(model)
  spec = lambda t: tf.TensorSpec([None] + t.shape[1:], t.dtype)
  fn = tf.function(lambda p, x: batched(p, state, x)[0], input_signature=[
      [spec(p) for p in params], tf.TensorSpec([None, None, 3, 3, 2],
                                               tf.float64)])
  np.testing.assert_allclose(fn(params, x), _loop(model, params, state, x,
                                                  True)[0],
                             rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------ 2. gradients
def _ce(y, logits):
  """Per-task mean cross-entropy: ``[T, N]`` labels -> ``[T]``."""
  return tf.reduce_mean(
      tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits), axis=-1)


def _meta_loss_batched(batched, theta, state, sx, sy, qx, qy, alpha=0.5):
  """sum_t query loss after one inner SGD step, all tasks batched."""
  fast = [tf.tile(p[None], [T] + [1] * p.shape.rank) for p in theta]
  with tf.GradientTape() as inner:
    inner.watch(fast)
    pred, st = batched(fast, state, sx)
    support = tf.reduce_sum(_ce(sy, pred))
  grads = [tf.convert_to_tensor(g) for g in inner.gradient(support, fast)]
  fast = [p - alpha * g for p, g in zip(fast, grads)]
  pred, _ = batched(fast, st, qx)
  return tf.reduce_sum(_ce(qy, pred))


def _batched_and_loop_meta_gradients(model, batched, theta, state, sx, sy,
                                     qx, qy):
  """The meta-gradients of :func:`_meta_loss_batched` and
  :func:`_meta_loss_loop` at ``theta``."""
  grads = []
  for loss in (lambda th: _meta_loss_batched(batched, th, state, sx, sy, qx,
                                             qy),
               lambda th: _meta_loss_loop(model, th, state, sx, sy, qx, qy)):
    with tf.GradientTape() as tape:
      tape.watch(theta)
      value = loss(theta)
    grads.append(tape.gradient(value, theta))
  return grads


def _meta_loss_loop(model, theta, state, sx, sy, qx, qy, alpha=0.5):
  total = 0.0
  for t in range(T):
    with tf.GradientTape() as inner:
      inner.watch(theta)
      pred, st = functional_call(model, theta, [s[t] for s in state], sx[t])
      support = _ce(sy[t][None], pred[None])[0]
    grads = [tf.convert_to_tensor(g) for g in inner.gradient(support, theta)]
    fast = [p - alpha * g for p, g in zip(theta, grads)]
    pred, _ = functional_call(model, fast, st, qx[t])
    total += _ce(qy[t][None], pred[None])[0]
  return total


def _check_second_order(model, batched, state, sx, sy, qx, qy, rng,
                        directions):
  """The batched meta-gradient (one inner SGD step, second order) against
  the per-task loop's, then against central finite differences along
  ``directions`` random directions (a smaller step where curvature, e.g.
  GroupNorm over few values, shows the first one's truncation error)."""
  theta = [tf.constant(v.numpy()) for v in model.trainable_variables]
  loss_b = lambda th: _meta_loss_batched(batched, th, state, sx, sy, qx, qy)
  with tf.GradientTape() as tape:
    tape.watch(theta)
    lb = loss_b(theta)
  gb = [tf.convert_to_tensor(g) for g in tape.gradient(lb, theta)]
  with tf.GradientTape() as tape:
    tape.watch(theta)
    ll = _meta_loss_loop(model, theta, state, sx, sy, qx, qy)
  gl = [tf.convert_to_tensor(g) for g in tape.gradient(ll, theta)]
  np.testing.assert_allclose(lb, ll, rtol=1e-10)
  for a, b in zip(gb, gl):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)
  for _ in range(directions):
    d = [tf.constant(rng.normal(size=p.shape)) for p in theta]
    an = float(sum(tf.reduce_sum(g * v) for g, v in zip(gb, d)))
    for eps in (1e-5, 1e-6):
      fd = float((loss_b([p + eps * v for p, v in zip(theta, d)])
                  - loss_b([p - eps * v for p, v in zip(theta, d)]))
                 / (2 * eps))
      if abs(fd - an) <= 1e-5 * max(abs(an), 1e-3):
        break
    assert abs(fd - an) <= 1e-5 * max(abs(an), 1e-3), (fd, an)


def test_3d_pooling_matches_the_per_task_loop_to_second_order():
  # TF's 3-D pooling kernels take no float64, so this one runs in float32.
  # Before, MaxPooling3D and AveragePooling3D ran task by task.
  rng = np.random.default_rng(5)
  inp = keras.Input((4, 6, 6, 1))
  h = L.Conv3D(2, 2, padding="same", activation="tanh")(inp)
  h = L.AveragePooling3D(2, padding="same")(L.MaxPooling3D((1, 2, 2))(h))
  model = keras.Model(inp, L.Dense(3)(L.Flatten()(h)))
  batched = compile_batched(model, conv_impl="map")
  params, state = _per_task(model, rng, "float32")
  x = _inputs(model, rng, "float32")
  got, _ = batched(params, state, x)
  want, _ = _loop(model, params, state, x, True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  sx, qx = _inputs(model, rng, "float32", 5), _inputs(model, rng, "float32", 6)
  sy = tf.constant(rng.integers(0, 3, size=(T, 5)))
  qy = tf.constant(rng.integers(0, 3, size=(T, 6)))
  theta = [tf.constant(v.numpy()) for v in model.trainable_variables]
  grads = _batched_and_loop_meta_gradients(model, batched, theta, state,
                                           sx, sy, qx, qy)
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert max(float(tf.reduce_max(tf.abs(g))) for g in grads[0]) > 1e-3


@pytest.mark.parametrize("name,impl", [
    ("omniglot", "patches"), ("omniglot", "grouped"),
    ("omniglot_fold", "map"), ("odd_fold", "patches"),
    ("miniimagenet", "patches"), ("mlp_layernorm", "patches"),
    ("skip", "patches"), ("odd", "map"), ("preprocessed", "patches"),
    ("conv1d", "patches"), ("conv1d", "map"), ("depthwise", "map"),
    ("text", "patches"), ("operations", "patches"),
    ("attention", "patches"), ("scored_attention", "patches"),
    ("dilated", "patches"), ("dilated", "map"),
    ("recurrent", "patches"), ("grouped", "patches"), ("grouped", "map"),
    ("resampled", "patches"), ("transposed", "patches")])
def test_second_order_gradients(name, impl):
  if impl == "grouped" and fast_weights.grouped_gradient_missing("float64"):
    pytest.skip("TF has no float64 gradient for grouped convolutions here")
  rng = np.random.default_rng(2)
  dtype = "float64"
  model = MODELS[name](dtype)
  _, state = _per_task(model, rng, dtype)
  sx, qx = _inputs(model, rng, dtype, 5), _inputs(model, rng, dtype, 6)
  sy = tf.constant(rng.integers(0, 3, size=(T, 5)))
  qy = tf.constant(rng.integers(0, 3, size=(T, 6)))
  batched = compile_batched(model, conv_impl=impl)
  with_fd = name in ("omniglot", "skip", "omniglot_fold", "conv1d",
                     "depthwise", "text", "operations", "attention",
                     "scored_attention",
                     "dilated", "recurrent", "grouped", "resampled",
                     "transposed")
  _check_second_order(model, batched, state, sx, sy, qx, qy, rng,
                      2 if with_fd else 0)


def test_conv_batchnorm_fold_applies_to_small_fan_in_only():
  """Folded where kh*kw*C <= filters; the same numbers as unfolded."""
  steps = lambda m, fold: [type(op).__name__ for op, _, _ in
                           compile_batched(m, "map", fold).program.steps]
  fold_model = _omniglot_fold("float64")
  assert steps(fold_model, True)[:2] == ["_ConvBatchNorm", "_Elementwise"]
  assert "_ConvBatchNorm" not in steps(fold_model, False)
  assert steps(_odd_fold("float64"), True)[0] == "_ConvBatchNorm"
  assert "_ConvBatchNorm" not in steps(_omniglot("float64"), True)  # 9 > 4
  from maml_tf.models import paper_nets  # pylint: disable=g-import-not-at-top
  assert steps(paper_nets.omniglot_conv(5), True).count("_ConvBatchNorm") == 1
  assert steps(paper_nets.miniimagenet_conv(5), True).count(
      "_ConvBatchNorm") == 1                                  # 27 <= 32
  rng = np.random.default_rng(4)
  params, state = _per_task(fold_model, rng, "float64")
  x = _inputs(fold_model, rng, "float64", n=5)
  outs = [compile_batched(fold_model, "patches", fold)(params, state, x)
          for fold in (True, False)]
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12)
  for a, b in zip(outs[0][1], outs[1][1]):   # moving statistics
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  inference = [compile_batched(fold_model, "map", fold)(params, state, x,
                                                       training=False)[0]
               for fold in (True, False)]
  np.testing.assert_allclose(inference[0], inference[1], rtol=1e-12)


def _two_inputs(dtype, as_dict):
  """An image and a vector (a dict or a list of inputs); a nested
  two-input model inside."""
  img = keras.Input((5, 5, 1), dtype=dtype, name="image")
  vec = keras.Input((3,), dtype=dtype, name="vector")
  a, b = keras.Input((4,), dtype=dtype), keras.Input((3,), dtype=dtype)
  merge = keras.Model([a, b], L.Concatenate(dtype=dtype)(
      [a, L.Dense(2, activation="tanh", dtype=dtype)(b)]), name="merge")
  h = L.Conv2D(2, 3, activation="tanh", dtype=dtype)(img)
  h = L.Dense(4, activation="tanh", dtype=dtype)(L.Flatten(dtype=dtype)(h))
  out = L.Dense(3, dtype=dtype)(merge([h, vec]))
  inputs = {"image": img, "vector": vec} if as_dict else [img, vec]
  return keras.Model(inputs, out, name="two_inputs")


@pytest.mark.parametrize("as_dict", [True, False], ids=["dict", "list"])
def test_several_inputs_match_the_per_task_loop(as_dict):
  rng = np.random.default_rng(6)
  dtype = "float64"
  model = _two_inputs(dtype, as_dict)
  params, state = _per_task(model, rng, dtype)

  def inputs(n):
    image = tf.constant(rng.normal(size=(T, n, 5, 5, 1)), dtype)
    vector = tf.constant(rng.normal(size=(T, n, 3)), dtype)
    return {"image": image, "vector": vector} if as_dict else [image, vector]

  def task(x, t):
    return tf.nest.map_structure(lambda v: v[t], x)

  batched = compile_batched(model, conv_impl="patches")
  x = inputs(4)
  y, _ = batched(params, state, x)
  ref = tf.stack([functional_call(model, [p[t] for p in params],
                                  [s[t] for s in state], task(x, t))[0]
                  for t in range(T)])
  np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
  # Second-order meta-gradients, as for one input.
  theta = [tf.constant(v.numpy()) for v in model.trainable_variables]
  sx, qx = inputs(5), inputs(6)
  sy = tf.constant(rng.integers(0, 3, size=(T, 5)))
  qy = tf.constant(rng.integers(0, 3, size=(T, 6)))

  def loss_loop(th):
    total = 0.0
    for t in range(T):
      with tf.GradientTape() as inner:
        inner.watch(th)
        pred, _ = functional_call(model, th, [], task(sx, t))
        support = _ce(sy[t][None], pred[None])[0]
      fast = [p - 0.5 * g for p, g in zip(th, inner.gradient(support, th))]
      pred, _ = functional_call(model, fast, [], task(qx, t))
      total += _ce(qy[t][None], pred[None])[0]
    return total

  grads = []
  for loss in (lambda th: _meta_loss_batched(batched, th, [], sx, sy, qx, qy),
               loss_loop):
    with tf.GradientTape() as tape:
      tape.watch(theta)
      value = loss(theta)
    grads.append([tf.convert_to_tensor(g) for g in tape.gradient(value,
                                                                 theta)])
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)
  with pytest.raises(ValueError, match="takes 2 inputs, got 1"):
    batched(params, state, tf.nest.flatten(x)[0])


# ---------------------------------------------------------- 3. unsupported
def _one_attention(layer, shape=(4, 3), **kwargs):
  inp = keras.Input(shape)
  return keras.Model(inp, layer([inp, inp], **kwargs))


class _Flagged(keras.layers.Layer):

  def call(self, x, use_causal_mask=True):
    return -x if use_causal_mask else x


def _one_flag(layer):
  inp = keras.Input((4,))
  return keras.Model(inp, layer(inp, use_causal_mask=False))


@pytest.mark.parametrize("make,name,why", [
    (lambda: keras.Sequential([keras.Input((4, 2)),
                               L.LSTM(3, dropout=0.1, name="rnn")]),
     "rnn", "dropout inside the cell"),
    (lambda: keras.Sequential([keras.Input((4, 2), batch_size=2),
                               L.GRU(3, stateful=True, name="st")]),
     "st", "stateful"),
    (lambda: keras.Sequential([keras.Input((4, 2)), L.Bidirectional(
        L.SimpleRNN(3), merge_mode=None, name="bi")]), "bi", "merge_mode"),
    (lambda: keras.Sequential([keras.Input((4, 3, 2)), L.UpSampling2D(
        interpolation="bilinear", name="bil")]), "bil", "second derivative"),
    (lambda: keras.Sequential([keras.Input((4, 3, 2)), L.ConvLSTM1D(
        2, 1, name="clstm")]), "clstm", "not supported"),
    # Keras calls a TimeDistributed layer per step: statistics and draws
    # per step.
    (lambda: keras.Sequential([keras.Input((4, 3)), L.TimeDistributed(
        L.BatchNormalization(), name="tdbn")]), "tdbn", "once per time step"),
    (lambda: keras.Sequential([keras.Input((4, 3)), L.TimeDistributed(
        keras.Sequential([L.Dense(2), L.Dropout(0.5)]), name="tdd")]), "tdd",
     "once per time step"),
    (lambda: keras.Sequential([keras.Input((4, 3), dtype="float64"), L.RNN(
        L.GRUCell(3, dtype="float32"), dtype="float64", name="cd")]), "cd",
     "its cell computes in float32"),
    (lambda: keras.Sequential([keras.Input((4, 3), dtype="float64"), L.RNN(
        [L.GRUCell(3, dtype="float64")], dtype="float64", name="sd")]), "sd",
     "computes in float32"),
    (lambda: keras.Sequential([keras.Input((4, 3)), L.LSTM(
        2, activation=L.PReLU(), name="act")]), "act", "activation is a layer"),
    (lambda: keras.Sequential([keras.Input((4, 3), dtype="float64"),
                               L.Bidirectional(L.GRU(2, dtype="float64"),
                                               name="bd")]), "bd",
     "another dtype"),
    (lambda: keras.Sequential([keras.Input((4,)), L.AlphaDropout(
        1.0, name="a1")]), "a1", "rate=1"),
    (lambda: keras.Sequential([keras.Input((4, 3)), L.UnitNormalization(
        axis=0, name="un0")]), "un0", "axis"),
    (lambda: keras.Sequential([keras.Input((4,)),
                               L.Lambda(lambda x: 2 * x, name="double")]),
     "double", "not supported"),
    (lambda: keras.Sequential([keras.Input((4,)), L.Dense(
        2, dtype="mixed_float16", name="half")]), "half", "mixed precision"),
    (lambda: keras.Sequential([keras.Input((4, 5, 5)), L.MaxPooling2D(
        2, data_format="channels_first", name="cf")]), "cf", "channels_last"),
    (lambda: keras.Sequential([keras.Input((4, 3)), L.BatchNormalization(
        axis=1, name="bn1")]), "bn1", "axis"),
    # Keras decomposes strides and dilation above 1 together; before, the
    # batched op gave other numbers.
    (lambda: keras.Sequential([keras.Input((9, 9, 2)), L.SeparableConv2D(
        2, 2, strides=2, dilation_rate=2, name="sd2")]), "sd2",
     r"strides=\(2, 2\) with dilation_rate=\(2, 2\)"),
    (lambda: keras.Sequential([keras.Input((9, 2)), L.SeparableConv1D(
        2, 2, strides=2, dilation_rate=2, name="sd1")]), "sd1", "dilation"),
    (lambda: keras.Sequential([keras.Input((9, 9, 2)), L.DepthwiseConv2D(
        2, strides=2, dilation_rate=2, name="dd")]), "dd", "dilation"),
    (lambda: _one_attention(L.Attention(dropout=0.1, name="ad")), "ad",
     r"dropout=0\.1"),
    (lambda: _one_attention(L.Attention(name="ac"), use_causal_mask=True),
     "ac", "use_causal_mask"),
    (lambda: _one_attention(L.Attention(use_scale=True, name="a4"),
                            shape=(2, 4, 3)), "a4", r"\[batch, length"),
    # Only Attention's own False arguments are dropped: a user's layer
    # called with use_causal_mask=False is traced with its call's default.
    (lambda: _one_flag(_Flagged(name="uf")), "uf", "keyword arguments"),
])
def test_unsupported_layers_are_named(make, name, why):
  with pytest.raises(Unsupported, match=why) as info:
    compile_batched(make())
  assert repr(name) in str(info.value)


def test_recurrent_layers_take_sequences_of_unknown_length():
  rng = np.random.default_rng(6)
  model = keras.Sequential([keras.Input((None, 3), dtype="float64"),
                            L.GRU(3, return_sequences=True, dtype="float64"),
                            L.LSTM(2, dtype="float64")])
  params, state = _per_task(model, rng, "float64")
  batched = compile_batched(model)
  fn = tf.function(lambda x: batched(params, state, x)[0], input_signature=[
      tf.TensorSpec([T, None, None, 3], tf.float64)])
  for length in (2, 7):
    x = tf.constant(rng.normal(size=(T, 4, length, 3)))
    np.testing.assert_allclose(fn(x), _loop(model, params, state, x, True)[0],
                               rtol=1e-10, atol=1e-10)


def _masked_text(dtype):
  """Padded token ids: Embedding(mask_zero=True) -> Dense (passes the
  mask) -> LSTM, Bidirectional GRU, a backwards GRU, SimpleRNN with
  zero_output_for_mask, and a masked GlobalAveragePooling1D."""
  x = keras.Input((6,), dtype="int32")
  e = L.Embedding(10, 4, mask_zero=True, dtype=dtype)(x)
  d = L.Dense(4, activation="tanh", dtype=dtype)(e)
  a = L.LSTM(3, return_sequences=True, dtype=dtype)(d)
  b = L.Bidirectional(L.GRU(2, return_sequences=True, dtype=dtype),
                      dtype=dtype)(a)
  c = L.GRU(2, go_backwards=True, dtype=dtype)(b)
  g = L.GlobalAveragePooling1D(dtype=dtype)(b)
  h = L.SimpleRNN(2, zero_output_for_mask=True, dtype=dtype)(a)
  s = L.RNN(L.StackedRNNCells([L.SimpleRNNCell(2, dtype=dtype),
                               L.GRUCell(2, dtype=dtype)], dtype=dtype),
            go_backwards=True, return_sequences=True,
            zero_output_for_mask=True, dtype=dtype)(d)
  out = L.Concatenate(dtype=dtype)([c, g, h, L.GlobalAveragePooling1D(
      dtype=dtype)(s)])
  return keras.Model(x, L.Dense(3, dtype=dtype)(out), name="masked_text")


def _masked_sequence(dtype):
  """Masking (a step of zeros is skipped) in a Sequential."""
  return keras.Sequential([
      keras.Input((5, 3), dtype=dtype), L.Masking(0.0, dtype=dtype),
      L.LSTM(3, return_sequences=True, dtype=dtype),
      L.TimeDistributed(L.Dense(2, dtype=dtype), dtype=dtype),
      L.GRU(2, dtype=dtype), L.Dense(3, dtype=dtype)], name="masked_seq")


def _masked_attention(dtype):
  """Embedding(mask_zero=True) into attention: a transformer block (the
  masks of the query and the value; Add's mask to the pooling), then a
  causal cross-attention with a key and an attention_mask of id pairs on
  unmasked inputs (Keras' first attention removes its inputs' masks when
  it runs: one attention reads Keras masks)."""
  x = keras.Input((6,), dtype="int32")
  e = L.Embedding(10, 4, mask_zero=True, dtype=dtype)(x)
  a = L.MultiHeadAttention(2, 3, dtype=dtype)(e, e)
  h = L.LayerNormalization(dtype=dtype)(L.Add(dtype=dtype)([e, a]))
  g = L.GlobalAveragePooling1D(dtype=dtype)(h)
  u = L.Embedding(10, 4, dtype=dtype)(x)
  d = L.Dense(4, activation="tanh", dtype=dtype)(u)
  ids = keras.ops.not_equal(x, 0)
  pairs = keras.ops.logical_and(keras.ops.expand_dims(ids, 1),
                                keras.ops.expand_dims(ids, 2))
  b = L.MultiHeadAttention(2, 3, use_bias=False, dtype=dtype)(
      d, u, key=d, attention_mask=pairs, use_causal_mask=True)
  out = L.Concatenate(dtype=dtype)([g, L.Flatten(dtype=dtype)(b)])
  return keras.Model(x, L.Dense(3, dtype=dtype)(out), name="masked_attention")


def _padded(rng, n, masked_text=True):
  """Token ids with trailing padding and holes (0), or sequences with
  steps of zeros; no sequence entirely masked."""
  if masked_text:
    ids = rng.integers(1, 10, size=(T, n, 6))
    ids[:, ::2, 4:] = 0
    ids[:, 1::3, 1] = 0
    return tf.constant(ids, "int32")
  v = rng.normal(size=(T, n, 5, 3))
  v[:, ::2, 3:] = 0
  v[:, 1, 0] = 0
  return tf.constant(v)


def _users_mask(dtype):
  """A user's layer making a mask (compute_mask) for an LSTM."""
  return keras.Sequential([keras.Input((5, 3), dtype=dtype),
                           _PadMask(dtype=dtype), L.LSTM(3, dtype=dtype),
                           L.Dense(3, dtype=dtype)], name="users_mask")


@pytest.mark.parametrize("make", [_masked_text, _masked_sequence,
                                  _users_mask, _masked_attention])
def test_keras_masks_match_the_per_task_loop(make):
  """Masks from Embedding(mask_zero=True) and Masking reach the recurrent
  layers, attention and the pooling as Keras passes them (the loop
  applies them, so ignoring them would differ): values, and second-order
  meta-gradients against the loop and finite differences."""
  rng = np.random.default_rng(8)
  model = make("float64")
  text = make in (_masked_text, _masked_attention)
  params, state = _per_task(model, rng, "float64")
  batched = compile_batched(model)
  x = _padded(rng, 4, text)
  for training in (True, False):
    y, _ = batched(params, state, x, training=training)
    y_ref, _ = _loop(model, params, state, x, training)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
  sx, qx = _padded(rng, 5, text), _padded(rng, 6, text)
  sy = tf.constant(rng.integers(0, 3, size=(T, 5)))
  qy = tf.constant(rng.integers(0, 3, size=(T, 6)))
  _check_second_order(model, batched, state, sx, sy, qx, qy, rng, 1)


def _embedded(x):
  return L.Embedding(10, 4, mask_zero=True)(x)


def _stacked_attention(e):
  h = L.Add()([e, L.MultiHeadAttention(2, 2)(e, e)])
  return L.Add()([h, L.MultiHeadAttention(2, 2)(h, h)])


@pytest.mark.parametrize("build,why", [
    (lambda x: L.Flatten()(L.MultiHeadAttention(2, 2)(
        L.Embedding(10, 4)(x), L.Embedding(10, 4)(x),
        attention_mask=keras.ops.not_equal(x, 0))), "attention_mask that"),
    (lambda x: L.GlobalAveragePooling1D()(_stacked_attention(_embedded(x))),
     "second attention reading Keras masks"),
    (lambda x: L.Dense(2)(keras.Sequential(
        [keras.Input((6, 4)), L.LSTM(2)])(_embedded(x))),
     "carry a Keras mask"),
    (lambda x: L.LSTM(2, return_sequences=True)(_embedded(x)),
     "output carries a Keras mask"),
    (lambda x: L.GRU(4)(L.Embedding(10, 4)(x), [L.Dense(4)(L.Flatten()(
        _embedded(x)))]), "positional arguments"),
    # Keras hands on masks at run time where the graph records none.
    (lambda x: L.Flatten()(L.Maximum()([_embedded(x), _embedded(x)])),
     "carry a Keras mask"),
    (lambda x: L.LSTM(3)(_embedded(x), training=False), "does not record"),
    (lambda x: L.GlobalAveragePooling1D()(_embedded(x), mask=None),
     "does not record"),
    (lambda x: L.LSTM(3)(keras.ops.cast(_embedded(x), "float32")), "cast"),
    (lambda x: L.LSTM(3)(keras.Sequential([
        keras.Input((6,), dtype="int32"),
        L.Embedding(10, 4, mask_zero=True)])(x)), "output carries"),
    (lambda x: L.SimpleRNN(2, unroll=True)(_embedded(x)), "unroll"),
    (lambda x: L.LSTM(3)(L.Embedding(10, 4)(x), mask=keras.ops.expand_dims(
        keras.ops.not_equal(x, 0), -1)), "other than one"),
    (lambda x: L.LSTM(2)(L.Embedding(10, 4)(x), None,
                         keras.ops.not_equal(x, 0)), "positional arguments"),
])
def test_masks_the_batched_path_cannot_apply_are_named(build, why):
  """(And initial states or masks given positionally, which the batched
  recurrence would not read.)"""
  inp = keras.Input((6,), dtype="int32")
  with pytest.raises(Unsupported, match=why):
    compile_batched(keras.Model(inp, build(inp)))


def _mixed_dtypes():
  """Models whose layers and Inputs differ in dtype."""
  inner = keras.Sequential([keras.Input((3,)), L.Dense(3, activation="tanh")])
  x = keras.Input((4,), dtype="float64")
  h = L.Dense(3, activation="tanh", dtype="float64")(x)
  h = L.Dense(3, dtype="float32")(h)
  h = L.Dense(3, activation="tanh", dtype="float64")(inner(h))
  yield keras.Model(x, h)
  yield keras.Sequential([keras.Input((4,), dtype="float32"),
                          L.Dense(3, dtype="float64"),
                          L.Dense(2, dtype="float32")])
  x = keras.Input((4,))                  # float32 Input, float64 layers
  yield keras.Model(x, L.Dense(2, dtype="float64")(
      L.Dense(4, dtype="float64")(x) + keras.ops.sin(x * 3)))
  x = keras.Input((4,), dtype="float64")  # a float64 skip past float32
  yield keras.Model(x, L.Add(dtype="float64")([L.Dense(4)(x), x]))
  x = keras.Input((4,))                   # float ids, a float64 Embedding
  yield keras.Model(x, L.Flatten(dtype="float64")(L.Embedding(
      7, 2, dtype="float64")(keras.ops.abs(x * 2))))
  inner = keras.Input((4,))               # a float32 functional inside
  inner = keras.Model(inner, L.Dense(3, dtype="float64")(inner))
  x = keras.Input((4,), dtype="float64")
  yield keras.Model(x, L.Dense(2, dtype="float64")(inner(
      L.Dense(4, dtype="float64")(x))))


def test_layers_cast_their_inputs_as_keras_does():
  """Each layer casts its floating inputs to its dtype as Keras' __call__
  does, and each model its inputs to its Inputs' dtypes."""
  rng = np.random.default_rng(10)
  for model in _mixed_dtypes():
    params = [tf.constant(v.numpy()[None] + 0.3 * rng.normal(
        size=(T,) + tuple(v.shape)), v.dtype) for v in
              model.trainable_variables]
    xs = tf.constant(rng.normal(size=(T, 5, 4)), "float64")
    y, _ = compile_batched(model)(params, [], xs)
    y_ref, _ = _loop(model, params, [], xs, True)
    assert y.dtype == y_ref.dtype
    # float64 outputs of float64 weights to 1e-12: a float32 rounding on
    # the way would show. (A float32 layer's matmul rounds as the CPU's
    # kernel sums, which differs between one batched and T matmuls.)
    exact = y.dtype == tf.float64 and all(
        v.dtype == "float64" for v in model.trainable_variables)
    tol = 1e-12 if exact else 1e-6
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)


def _integer_inputs():
  """Models whose integer Inputs reach layers that promote them."""
  yield keras.Sequential([keras.Input((4,), dtype="int32"),
                          L.Dense(3, activation="tanh"), L.Dense(2)])
  x = keras.Input((4,), dtype="int32")
  h = L.LayerNormalization()(L.EinsumDense("ab,bc->ac", (3,))(x))
  yield keras.Model(x, L.Concatenate()([h, L.BatchNormalization()(x)]))
  x = keras.Input((5, 2), dtype="int32")   # integer sequences
  h = L.Bidirectional(L.LSTM(3, return_sequences=True))(x)
  yield keras.Model(x, L.Concatenate()([h, L.TimeDistributed(L.Dense(2))(
      x), L.GroupNormalization(2)(L.TimeDistributed(L.Dense(4))(x))]))
  yield keras.Sequential([keras.Input((4,), dtype="int32"),
                          L.Dense(3, dtype="float64")])


def test_integer_inputs_are_promoted_as_keras_promotes_them():
  """Integer inputs of a Dense, EinsumDense, normalization or recurrent
  layer become the layer's floats, as Keras' own call promotes them."""
  rng = np.random.default_rng(11)
  for model in _integer_inputs():
    params = [tf.constant(v.numpy()[None] + 0.3 * rng.normal(
        size=(T,) + tuple(v.shape)), v.dtype) for v in
              model.trainable_variables]
    state = [tf.constant(np.stack([v.numpy()] * T)) for v in
             model.non_trainable_variables]
    shape = tuple(model.inputs[0].shape[1:])
    xs = tf.constant(rng.integers(-3, 4, size=(T, 5) + shape), "int32")
    for training in (True, False):
      y, new_state = compile_batched(model)(params, state, xs,
                                            training=training)
      y_ref, state_ref = _loop(model, params, state, xs, training)
      assert y.dtype == y_ref.dtype
      tol = 1e-10 if y.dtype == tf.float64 else 1e-5
      np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
      for a, b in zip(new_state, state_ref):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_operations_may_change_the_example_count():
  """``reshape(x, (-1, 3))`` folds each example's rows into the example
  axis: per task as on the task-batched path."""
  inp = keras.Input((4, 3), dtype="float64")
  h = keras.ops.reshape(L.Dense(3, dtype="float64")(inp), (-1, 3))
  model = keras.Model(inp, L.Dense(2, dtype="float64")(h))
  rng = np.random.default_rng(9)
  params, state = _per_task(model, rng, "float64")
  x = tf.constant(rng.normal(size=(T, 5, 4, 3)))
  y, _ = compile_batched(model)(params, state, x)
  assert y.shape == (T, 20, 2)
  np.testing.assert_allclose(y, _loop(model, params, state, x, True)[0],
                             rtol=1e-10, atol=1e-10)


class _ReshapedByBatchSize(keras.Model):
  """``reshape(h, (shape(h)[0], ...))``: the batch size is None when
  traced."""

  def __init__(self):
    super().__init__()
    self.a, self.o = L.Dense(8, dtype="float64"), L.Dense(1, dtype="float64")

  def call(self, x):
    h = self.a(x)
    n = keras.ops.shape(h)[0]
    h = keras.ops.sum(keras.ops.reshape(h, (n, 2, 4)), 1)
    return self.o(h + keras.ops.reshape(keras.ops.reshape(h, (n, -1)),
                                        (n, 4)))


def test_reshapes_by_the_traced_batch_size():
  """(The model's float32 policy casts its float64 inputs first, as its
  Keras __call__ does, then its float64 layers cast them back.)"""
  model = _ReshapedByBatchSize()
  model(np.zeros((2, 8)))
  rng = np.random.default_rng(12)
  params, state = _per_task(model, rng, "float64")
  x = tf.constant(rng.normal(size=(T, 5, 8)))
  y, _ = compile_batched(model)(params, state, x)
  np.testing.assert_allclose(y, _loop(model, params, state, x, True)[0],
                             rtol=1e-10, atol=1e-10)


def test_a_layer_called_twice_keeps_its_calls_order():
  """A BatchNorm called on a long branch and then on the input: its moving
  statistics are updated in Keras' order (the second call's last)."""
  x = keras.Input((4,), dtype="float64")
  norm = L.BatchNormalization(momentum=0.5, dtype="float64")
  dense = lambda: L.Dense(4, dtype="float64")
  a = dense()(dense()(norm(dense()(dense()(x)))))
  model = keras.Model(x, L.Add(dtype="float64")([a, norm(x)]))
  rng = np.random.default_rng(13)
  params, state = _per_task(model, rng, "float64")
  xs = tf.constant(rng.normal(size=(T, 5, 4)) * 3 + 1)
  y, new_state = compile_batched(model)(params, state, xs, training=True)
  y_ref, state_ref = _loop(model, params, state, xs, True)
  np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
  for got, want in zip(new_state, state_ref):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_inputs_are_matched_as_keras_matches_them():
  """A dict for a model built on a list is matched by input name, as
  Keras' functional call matches it, not by sorted key."""
  dtype = "float64"
  b = keras.Input((2,), name="b", dtype=dtype)
  a = keras.Input((3,), name="a", dtype=dtype)
  model = keras.Model([b, a], L.Dense(2, dtype=dtype)(L.Concatenate(
      dtype=dtype)([L.Dense(2, dtype=dtype)(b), a])), name="list_built")
  rng = np.random.default_rng(10)
  params, state = _per_task(model, rng, dtype)
  xb = tf.constant(rng.normal(size=(T, 4, 2)))
  xa = tf.constant(rng.normal(size=(T, 4, 3)))
  batched = compile_batched(model)
  ref = tf.stack([functional_call(model, [p[t] for p in params], [],
                                  {"a": xa[t], "b": xb[t]})[0]
                  for t in range(T)])
  for x in ([xb, xa], {"a": xa, "b": xb}):
    np.testing.assert_allclose(batched(params, state, x)[0], ref,
                               rtol=1e-10, atol=1e-10)
  with pytest.raises(ValueError, match=r"takes the inputs \['b', 'a'\]"):
    batched(params, state, {"x": xb, "a": xa})


@pytest.mark.parametrize("across,why", [
    (lambda x: keras.ops.mean(x, axis=0), "batch axis"),
    (lambda x: keras.ops.sum(x), "batch axis"),
    (lambda x: keras.ops.softmax(x, axis=0), "over axis 0, the batch axis"),
    (lambda x: keras.ops.matmul(x, keras.ops.transpose(x)),
     "batch axis"),
    (lambda x: x[0], "batch axis"),
    (lambda x: x + keras.ops.expand_dims(x, 1), "different ranks"),
    (lambda x: keras.ops.cumsum(x), "every axis"),
    (lambda x: keras.ops.sort(x, axis=-2), "the batch axis"),
    (lambda x: keras.ops.mean(keras.ops.matmul(
        keras.ops.reshape(x, (-1, 1, 2, 2)), keras.ops.reshape(x, (-1, 2, 2))),
                              axis=1), "different ranks"),
])
def test_operations_across_examples_are_named(across, why):
  """Operations that mix the examples of a batch keep a model off the
  batched path (which merges the tasks' examples), with the reason."""
  inp = keras.Input((4,))
  model = keras.Model(inp, across(L.Dense(4)(inp)))
  with pytest.raises(Unsupported, match=why):
    compile_batched(model)


def _noisy_mlp():
  return keras.Sequential([keras.Input((4,)), L.Dense(6, "tanh"),
                           L.Dropout(0.5), L.GaussianNoise(0.3),
                           L.GaussianDropout(0.2),
                           L.Dropout(0.4, noise_shape=(6,)),  # one mask
                           L.Dense(3), L.Dropout(0.2)])


def _alpha():
  """AlphaDropout (SELU networks), with and without a noise_shape."""
  return keras.Sequential([keras.Input((4,)), L.Dense(6, "selu"),
                           L.AlphaDropout(0.3), L.Dense(5, "selu"),
                           L.AlphaDropout(0.2, noise_shape=(None, 5)),
                           L.Dense(3)])


def _spatial():
  return keras.Sequential([
      keras.Input((4, 4, 2)), L.Conv2D(3, 3, padding="same",
                                       activation="tanh"),
      L.SpatialDropout2D(0.4), L.Dropout(0.3, noise_shape=(None, 1, 4, 3)),
      L.Reshape((16, 3)), L.SpatialDropout1D(0.5), L.Flatten(), L.Dense(3)])


def _functional_dropout():
  """Functional: Keras records training=False (or the given value) on each
  call; the caller's training replaces it, as in Keras' functional call."""
  inp = keras.Input((4,))
  h = L.Dropout(0.3)(L.Dense(6, "tanh")(inp))
  h = L.Dropout(0.5)(L.Dense(5, "tanh")(h), training=True)
  return keras.Model(inp, L.Dense(3)(h))


def _attention_dropout():
  inp = keras.Input((5, 4))
  h = L.Dense(6, "tanh")(inp)
  h = L.MultiHeadAttention(2, 3, dropout=0.4)(h, h, use_causal_mask=True)
  return keras.Model(inp, L.Dense(3)(L.Flatten()(h)))


@pytest.mark.parametrize("make,draws", [(_noisy_mlp, 5), (_spatial, 3),
                                        (_functional_dropout, 2),
                                        (_alpha, 2),
                                        (_attention_dropout, 1)])
def test_random_layers_draw_each_tasks_noise_from_its_seed(make, draws):
  """Per-task seed states: each task's masks and noise (and advanced seeds)
  are the ones Keras' Dropout (spatial, with a noise_shape), GaussianNoise,
  GaussianDropout and AlphaDropout draw for that task on its own."""
  keras.utils.set_random_seed(3)
  model = make()
  assert sum(type(op).__name__ in ("_Random", "_MultiHeadAttention")
             for op, _, _ in compile_batched(model).program.steps) == draws
  rng = np.random.default_rng(3)
  params = [tf.constant(np.stack([v.numpy()] * T))
            for v in model.trainable_variables]
  state = [tf.constant(np.stack([v.numpy() + [7 * t, 3 * t]
                                 for t in range(T)]))
           for v in model.non_trainable_variables]
  x = tf.constant(rng.normal(size=(T, 50) + model.input_shape[1:]),
                  "float32")
  batched = compile_batched(model)
  y, new_state = batched(params, state, x, training=True)
  y_ref, state_ref = _loop(model, params, state, x, True)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  for a, b, old in zip(new_state, state_ref, state):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a - old, [[0, 1]] * T)
  y_eval, _ = batched(params, state, x, training=False)
  np.testing.assert_allclose(y_eval, _loop(model, params, state, x, False)[0],
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(y, y_eval, atol=1e-3)      # the noise was drawn



class _Subclassed(keras.Model):
  """The research style: layers in ``__init__``, ``call`` composes them."""

  def __init__(self):
    super().__init__(name="subclassed")
    self.conv = L.Conv2D(3, 3, activation="tanh")
    self.norm = L.BatchNormalization()
    self.drop = L.Dropout(0.0)
    self.head = L.Dense(3)

  def call(self, x, training=None):
    h = self.norm(self.conv(x), training=training)
    h = keras.ops.mean(h, axis=(1, 2)) + keras.ops.max(h, axis=(1, 2))
    return self.head(self.drop(h, training=training))


class _Branching(_Subclassed):

  def call(self, x, training=None):
    h = keras.ops.mean(self.conv(x), axis=(1, 2))
    if training:
      h = h * 2.0
    return self.head(h)


class _TensorFlowInside(_Subclassed):

  def call(self, x, training=None):
    return self.head(tf.reduce_mean(self.conv(x), axis=(1, 2)))


class _Block(L.Layer):
  """A user's residual block: a Layer made of Keras layers."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.conv = L.Conv2D(2, 3, padding="same")
    self.norm = L.BatchNormalization()

  def call(self, x, training=None):
    return keras.ops.tanh(x + self.norm(self.conv(x), training=training))


def _blocks():
  inp = keras.Input((5, 5, 2))
  h = _Block()(_Block()(inp))
  return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(h)))


def _built_subclassed():
  model = _Subclassed()
  model(np.zeros((1, 5, 5, 2), "float32"))
  return model


class _NoTrainingArgument(_Subclassed):
  """``call(self, x)``: its layers take the caller's mode from Keras' call
  context (BatchNorm, and a Dropout that draws)."""

  def __init__(self):
    super().__init__()
    self.drop = L.Dropout(0.3)

  def call(self, x):
    h = keras.ops.mean(self.norm(self.conv(x)), axis=(1, 2))
    return self.head(self.drop(h))


def _no_training_argument():
  model = _NoTrainingArgument()
  model(np.zeros((1, 5, 5, 2), "float32"))
  return model


@pytest.mark.parametrize("make", [_built_subclassed, _blocks,
                                  _no_training_argument],
                         ids=["subclassed_model", "user_layers",
                              "no_training_argument"])
def test_a_subclassed_model_is_traced_into_its_layers(make):
  """Its call on a symbolic input gives the layer graph: the same numbers
  as the per-task loop in both modes, and second-order meta-gradients."""
  rng = np.random.default_rng(8)
  model = make()
  params, state = _per_task(model, rng, "float32")
  x = tf.constant(rng.normal(size=(T, 4, 5, 5, 2)), "float32")
  batched = compile_batched(model, conv_impl="patches")
  for training in (True, False):
    y, new_state = batched(params, state, x, training=training)
    y_ref, state_ref = _loop(model, params, state, x, training)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(new_state, state_ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  theta = [tf.constant(v.numpy()) for v in model.trainable_variables]
  sx, qx = x, tf.constant(rng.normal(size=(T, 6, 5, 5, 2)), "float32")
  sy = tf.constant(rng.integers(0, 3, size=(T, 4)))
  qy = tf.constant(rng.integers(0, 3, size=(T, 6)))
  grads = _batched_and_loop_meta_gradients(model, batched, theta, state,
                                           sx, sy, qx, qy)
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class _FrozenNorm(_Subclassed):

  def call(self, x, training=None):     # BatchNorm always in inference
    return self.head(keras.ops.mean(self.norm(self.conv(x), training=False),
                                    axis=(1, 2)))


class _KwargsBranching(_Subclassed):

  def call(self, x, **kwargs):
    h = keras.ops.mean(self.conv(x), axis=(1, 2))
    return self.head(h * 2.0 if kwargs.get("training") else h)


class _Scale(L.Layer):
  """A user's layer with a weight of its own, read by an operation."""

  def build(self, input_shape):
    self.gain = self.add_weight(shape=(input_shape[-1],), initializer="ones")

  def call(self, x):
    return x * self.gain


class _PadMask(L.Layer):
  """Passes its input on with a mask (as Masking does)."""

  def call(self, x):
    return x

  def compute_mask(self, x, mask=None):
    return keras.ops.any(keras.ops.not_equal(x, 0), axis=-1)


class _Counter(L.Layer):
  """Counts its calls in a variable."""

  def build(self, input_shape):
    self.calls = self.add_weight(shape=(), initializer="zeros",
                                 trainable=False)

  def call(self, x):
    self.calls.assign_add(1.0)
    return x


class _BorrowedScale(L.Layer):
  """Hands its own weight to a Keras layer."""

  def build(self, input_shape):
    self.gain = self.add_weight(shape=(), initializer="ones")
    self.rescale = L.Rescaling(scale=self.gain)

  def call(self, x):
    return self.rescale(x)


class _Optional(L.Layer):
  """An optional second tensor."""

  def call(self, x, context=None):
    return x if context is None else x + context


class _Summed(L.Layer):
  """Depends on its input's length (a Python int from the shape)."""

  def call(self, x):
    return keras.ops.mean(x, axis=1) * x.shape[1]


@pytest.mark.parametrize("build,why", [
    (lambda x: L.Dense(2)(_Scale()(x)), "a weight or tensor argument"),
    (lambda x: L.GlobalAveragePooling1D()(_PadMask()(L.Masking()(x))),
     "inputs carry a Keras mask"),
    (lambda x: L.Dense(2)(_Counter()(x)), "its call writes variables"),
    (lambda x: L.Dense(2)(_BorrowedScale()(x)), "holds trainable weights"),
    (lambda x: L.Dense(2)(_Optional()(x, x)), "2 positional arguments"),
])
def test_users_layers_that_cannot_be_traced_are_named(build, why):
  """Layers whose traced graph would differ from their call are refused
  (and a refused trace leaves the variables as they were)."""
  inp = keras.Input((3, 4))
  model = keras.Model(inp, build(inp))
  before = [v.numpy() for v in model.weights]
  with pytest.raises(Unsupported, match=why):
    compile_batched(model)
  for v, value in zip(model.weights, before):
    np.testing.assert_array_equal(v.numpy(), value)


def test_a_users_layer_is_traced_at_each_call_site():
  """One instance on inputs of two lengths: each site traced on its own."""
  short, long = keras.Input((3, 4)), keras.Input((6, 4))
  summed = _Summed()
  h = L.Concatenate()([summed(short), summed(L.Dense(4)(long))])
  model = keras.Model([short, long], L.Dense(2)(h))
  rng = np.random.default_rng(11)
  params, state = _per_task(model, rng, "float32")
  xs = tf.constant(rng.normal(size=(T, 5, 3, 4)), "float32")
  xl = tf.constant(rng.normal(size=(T, 5, 6, 4)), "float32")
  y, _ = compile_batched(model)(params, state, [xs, xl])
  ref = tf.stack([functional_call(model, [p[t] for p in params], [],
                                  [xs[t], xl[t]])[0] for t in range(T)])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


class _OwnWeight(_Subclassed):

  def build(self, input_shape):
    super().build(input_shape)
    self.scale = self.add_weight(shape=(3,), initializer="ones")

  def call(self, x, training=None):
    return self.head(keras.ops.mean(self.conv(x), axis=(1, 2))) * self.scale


@pytest.mark.parametrize("cls,why", [
    (_Branching, "other layers or operations with training=True"),
    (_KwargsBranching, "other layers or operations with training=True"),
    (_FrozenNorm, "passes training=False to 'batch_normalization"),
    (_OwnWeight, "a weight or tensor argument"),
    (_TensorFlowInside, "does not run on symbolic Keras inputs")])
def test_subclassed_models_that_cannot_be_traced_are_named(cls, why):
  model = cls()
  model(np.zeros((1, 5, 5, 2), "float32"))
  with pytest.raises(Unsupported, match=why):
    compile_batched(model)


def test_auto_conv_impl():
  expected = "grouped" if tf.config.list_physical_devices("GPU") else "map"
  assert compile_batched(_odd("float32")).conv_impl == expected


def test_bad_conv_impl():
  with pytest.raises(ValueError, match="conv_impl"):
    compile_batched(_mlp_layernorm("float32"), conv_impl="fft")
