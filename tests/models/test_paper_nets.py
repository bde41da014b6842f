"""Tests for maml_tf.models.paper_nets: output shapes and parameter counts."""

import keras
import numpy as np
import pytest

from maml_tf.models import paper_nets


def _conv_params(c_in, c_out):
  return 3 * 3 * c_in * c_out + c_out  # kernel + bias


def _bn_params(c):
  return 4 * c  # gamma, beta (trainable) + moving mean, variance


def _trainable(model):
  return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_omniglot_conv():
  model = paper_nets.omniglot_conv(5)
  assert model.built and model.output_shape == (None, 5)
  # 28 -> 14 -> 7 -> 4 -> 2 with stride-2 'same' convs: 2 * 2 * 64 features.
  expected = (_conv_params(1, 64) + 3 * _conv_params(64, 64) + 4 * _bn_params(64)
              + (2 * 2 * 64) * 5 + 5)
  assert expected == 113733
  assert model.count_params() == expected
  assert _trainable(model) == expected - 4 * 2 * 64  # moving stats excluded
  out = model(np.zeros((3, 28, 28, 1), np.float32), training=True)
  assert tuple(out.shape) == (3, 5)
  assert len([l for l in model.layers
              if isinstance(l, keras.layers.BatchNormalization)]) == 4
  bn = model.get_layer("bn1")
  assert bn.center and bn.scale
  assert model.get_layer("conv1").strides == (2, 2)


def test_miniimagenet_conv():
  model = paper_nets.miniimagenet_conv(5)
  assert model.output_shape == (None, 5)
  # 84 -> 42 -> 21 -> 10 -> 5 with 2x2 'valid' max-pooling: 5 * 5 * 32.
  expected = (_conv_params(3, 32) + 3 * _conv_params(32, 32) +
              4 * _bn_params(32) + (5 * 5 * 32) * 5 + 5)
  assert expected == 33157
  assert model.count_params() == expected
  assert model.get_layer("flatten").output.shape == (None, 800)
  assert model.get_layer("conv1").strides == (1, 1)
  out = model(np.zeros((2, 84, 84, 3), np.float32), training=False)
  assert tuple(out.shape) == (2, 5)


def test_omniglot_mlp():
  model = paper_nets.omniglot_mlp(20)
  assert model.output_shape == (None, 20)
  widths = [28 * 28, 256, 128, 64, 64]
  expected = sum(a * b + b + _bn_params(b) for a, b in zip(widths, widths[1:]))
  expected += 64 * 20 + 20
  assert model.count_params() == expected == 249620
  out = model(np.zeros((4, 28, 28, 1), np.float32))
  assert tuple(out.shape) == (4, 20)


def test_conv4_options_and_float64():
  model = paper_nets.conv4(3, input_shape=(28, 28, 1), filters=8,
                           pooling="max", dtype="float64")
  assert model.output_shape == (None, 3)
  # 28 -> 14 -> 7 -> 3 -> 1 with 'valid' pooling.
  assert model.get_layer("flatten").output.shape == (None, 8)
  out = model(np.ones((2, 28, 28, 1)), training=True)
  assert keras.backend.standardize_dtype(out.dtype) == "float64"
  assert all(w.dtype == "float64" for w in model.weights)
  with pytest.raises(ValueError, match="pooling"):
    paper_nets.conv4(5, pooling="avg")
  with pytest.raises(ValueError, match="num_classes"):
    paper_nets.omniglot_mlp(0)
