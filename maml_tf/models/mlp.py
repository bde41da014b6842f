"""Fully connected networks."""

from typing import Sequence

import keras


def mlp(input_dim: int, output_dim: int, hidden: Sequence[int] = (40, 40),
        activation: str = "relu", dtype: str = "float32",
        name: str = "mlp", init: str = "glorot") -> keras.Model:
  """A built MLP; ``mlp(1, 1)`` is the paper's sinusoid regressor 1-40-40-1.

  Arguments:
    input_dim: size of the input vector.
    output_dim: size of the output vector.
    hidden: widths of the hidden layers.
    activation: hidden activation.
    dtype: weights' dtype (``"float64"`` for gradient checks).
    name: model name.
    init: ``"glorot"`` (Keras' default) or ``"finn"``: truncated normal
      kernels with std 0.01 and zero biases, as the paper's code.

  Example:
    >>> model = mlp(1, 1)          # 1-40-40-1 ReLU, 1,761 parameters
  """
  if init == "glorot":
    kernel_init = "glorot_uniform"
  elif init == "finn":
    kernel_init = keras.initializers.TruncatedNormal(stddev=0.01)
  else:
    raise ValueError(f"init must be 'glorot' or 'finn', got {init!r}")
  layers = [keras.Input((input_dim,), dtype=dtype)]
  for i, width in enumerate(hidden):
    layers.append(keras.layers.Dense(width, activation=activation, dtype=dtype,
                                     kernel_initializer=kernel_init,
                                     name=f"dense_{i}"))
  layers.append(keras.layers.Dense(output_dim, dtype=dtype,
                                   kernel_initializer=kernel_init,
                                   name="output"))
  return keras.Sequential(layers, name=name)
