"""The classification networks of Finn et al. (2017), as Keras 3 models.

* ``conv4``: 4 blocks of [3x3 conv, BatchNormalization, ReLU], each halving
  the resolution either by a stride-2 convolution (``pooling='stride'``, 'same'
  padding; Omniglot) or by a stride-1 convolution followed by 2x2 max-pooling
  (``pooling='max'``, 'valid' pooling as in Finn's code; MiniImagenet), then
  Flatten and a Dense logits head. Omniglot: 28 -> 14 -> 7 -> 4 -> 2, i.e.
  2*2*64 = 256 features; MiniImagenet: 84 -> 42 -> 21 -> 10 -> 5, i.e.
  5*5*32 = 800 features. The convolutions keep their bias as in Finn's code.
* ``omniglot_mlp``: Flatten, then Dense 256-128-64-64 each followed by
  BatchNormalization and ReLU, then a Dense logits head.

Finn's code averages the last Omniglot feature map spatially; these models
flatten it instead (the head then has 4x the weights). Every BatchNormalization
has ``center=True, scale=True`` and Keras' default momentum; the MAML learner
decides whether it runs in training mode (batch statistics, as in the paper).

All builders return built models (``model.built`` is True, weights exist) and
take a ``dtype`` (e.g. ``"float64"`` for gradient checks).

Example:
  >>> from maml_tf.models import paper_nets
  >>> model = paper_nets.omniglot_conv(5)
  >>> model.output_shape
  (None, 5)
  >>> model.count_params()
  113733
"""

from typing import Sequence, Tuple

import keras


def conv4(num_classes: int,
          input_shape: Tuple[int, int, int] = (28, 28, 1),
          filters: int = 64,
          pooling: str = "stride",
          dtype: str = "float32",
          name: str = "conv4") -> keras.Sequential:
  """The paper's 4-block convolutional classifier.

  Arguments:
    num_classes: output logits (N of N-way).
    input_shape: ``(H, W, C)`` of one image.
    filters: channels of every convolution (64 Omniglot, 32 MiniImagenet).
    pooling: ``'stride'`` (3x3 stride-2 'same' convs) or ``'max'`` (3x3
      stride-1 'same' convs, each block ending in 2x2 'valid' max-pooling).
    dtype: variable and compute dtype of every layer.
    name: model name.

  Returns:
    a built ``keras.Sequential`` mapping ``[B, H, W, C]`` to ``[B,
    num_classes]`` logits.

  Example:
    >>> conv4(5, input_shape=(84, 84, 3), filters=32, pooling="max"
    ...       ).output_shape
    (None, 5)
  """
  if pooling not in ("stride", "max"):
    raise ValueError(f"pooling must be 'stride' or 'max', got {pooling!r}")
  if int(num_classes) <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  if int(filters) <= 0:
    raise ValueError(f"filters must be positive, got {filters}")
  layers = [keras.Input(shape=tuple(input_shape), dtype=dtype)]
  for i in range(4):
    layers.append(keras.layers.Conv2D(
        filters, 3, strides=2 if pooling == "stride" else 1, padding="same",
        dtype=dtype, name=f"conv{i + 1}"))
    layers.append(keras.layers.BatchNormalization(
        center=True, scale=True, dtype=dtype, name=f"bn{i + 1}"))
    layers.append(keras.layers.ReLU(dtype=dtype, name=f"relu{i + 1}"))
    if pooling == "max":
      layers.append(keras.layers.MaxPooling2D(
          2, strides=2, padding="valid", dtype=dtype, name=f"pool{i + 1}"))
  layers.append(keras.layers.Flatten(dtype=dtype, name="flatten"))
  layers.append(keras.layers.Dense(num_classes, dtype=dtype, name="logits"))
  return keras.Sequential(layers, name=name)


def omniglot_conv(num_classes: int, dtype: str = "float32") -> keras.Sequential:
  """``conv4`` for 28x28x1 Omniglot: 64 filters, strided convolutions.

  Arguments:
    num_classes: output logits.
    dtype: layer dtype.

  Example:
    >>> omniglot_conv(20).output_shape
    (None, 20)
  """
  return conv4(num_classes, (28, 28, 1), filters=64, pooling="stride",
               dtype=dtype, name="omniglot_conv")


def miniimagenet_conv(num_classes: int,
                      dtype: str = "float32") -> keras.Sequential:
  """``conv4`` for 84x84x3 MiniImagenet: 32 filters, max-pooling.

  Arguments:
    num_classes: output logits.
    dtype: layer dtype.

  Example:
    >>> miniimagenet_conv(5).count_params()
    33157
  """
  return conv4(num_classes, (84, 84, 3), filters=32, pooling="max",
               dtype=dtype, name="miniimagenet_conv")


def omniglot_mlp(num_classes: int,
                 input_shape: Tuple[int, ...] = (28, 28, 1),
                 hidden: Sequence[int] = (256, 128, 64, 64),
                 dtype: str = "float32") -> keras.Sequential:
  """The paper's fully connected Omniglot network.

  Arguments:
    num_classes: output logits.
    input_shape: shape of one input (flattened first).
    hidden: widths of the hidden Dense layers, each followed by
      BatchNormalization and ReLU.
    dtype: layer dtype.

  Returns:
    a built ``keras.Sequential``.

  Example:
    >>> omniglot_mlp(5).output_shape
    (None, 5)
  """
  if int(num_classes) <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  layers = [keras.Input(shape=tuple(input_shape), dtype=dtype),
            keras.layers.Flatten(dtype=dtype, name="flatten")]
  for i, width in enumerate(hidden):
    layers.append(keras.layers.Dense(width, dtype=dtype, name=f"dense{i + 1}"))
    layers.append(keras.layers.BatchNormalization(
        center=True, scale=True, dtype=dtype, name=f"bn{i + 1}"))
    layers.append(keras.layers.ReLU(dtype=dtype, name=f"relu{i + 1}"))
  layers.append(keras.layers.Dense(num_classes, dtype=dtype, name="logits"))
  return keras.Sequential(layers, name="omniglot_mlp")
