"""Gaussian MLP policy (Keras) and its tensorflow_probability distribution.

The policy is a Keras model ``obs -> [mean, log_std]``: an MLP (2 x 100 ReLU
by default, Glorot-uniform weights, as rllab) for the mean and a
state-independent log standard deviation (one trainable vector, initialised
to ``log(init_std)``), broadcast to the batch. MAML evaluates it with explicit
weights through :func:`maml_tf.core.functional.functional_call`; per-task
weights are stacked on a leading axis and run with ``tf.vectorized_map``.

Example:
  >>> model = build_gaussian_mlp_policy(obs_dim=2, act_dim=2)
  >>> params, state = functional.read_weights(model)
  >>> stacked = tile_params(params, 20)
  >>> mean, log_std = batched_forward(model, stacked, state, obs)  # obs [20, B, 2]
  >>> dist = action_distribution(mean, log_std)
"""

import math
from typing import Sequence

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from maml_tf.core import functional

tfd = tfp.distributions


class StateIndependentLogStd(keras.layers.Layer):
  """Outputs a trainable ``log_std`` vector broadcast to its input's batch.

  Arguments:
    act_dim: action dimension.
    init_std: initial standard deviation.

  Example:
    >>> log_std = StateIndependentLogStd(2)(mean)   # same shape as mean
  """

  def __init__(self, act_dim: int, init_std: float = 1.0, **kwargs):
    super().__init__(**kwargs)
    self.act_dim = int(act_dim)
    self.init_std = float(init_std)

  def build(self, input_shape):
    self.log_std = self.add_weight(
        name="log_std", shape=(self.act_dim,),
        initializer=keras.initializers.Constant(math.log(self.init_std)))

  def call(self, mean):
    return keras.ops.zeros_like(mean) + self.log_std

  def get_config(self):
    return {**super().get_config(), "act_dim": self.act_dim,
            "init_std": self.init_std}


def build_gaussian_mlp_policy(obs_dim: int, act_dim: int,
                              hidden_sizes: Sequence[int] = (100, 100),
                              init_std: float = 1.0, dtype: str = "float32",
                              seed: int = 0, name: str = "policy") -> keras.Model:
  """A Gaussian MLP policy ``obs -> [mean, log_std]``.

  Arguments:
    obs_dim, act_dim: observation and action sizes.
    hidden_sizes: ReLU hidden layers (paper: two of 100).
    init_std: initial action standard deviation (rllab: 1).
    dtype: ``"float32"``, or ``"float64"`` for gradient checks.
    seed: initialiser seed.
    name: model name.

  Example:
    >>> model = build_gaussian_mlp_policy(2, 2)
    >>> mean, log_std = model(tf.zeros((5, 2)))
  """
  obs = keras.Input((obs_dim,), dtype=dtype, name="obs")
  h = obs
  for i, units in enumerate(hidden_sizes):
    h = keras.layers.Dense(
        units, activation="relu", dtype=dtype, name=f"hidden_{i}",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i))(h)
  mean = keras.layers.Dense(
      act_dim, dtype=dtype, name="mean",
      kernel_initializer=keras.initializers.GlorotUniform(
          seed=seed + len(hidden_sizes)))(h)
  log_std = StateIndependentLogStd(act_dim, init_std, dtype=dtype,
                                   name="log_std")(mean)
  return keras.Model(obs, [mean, log_std], name=name)


def tile_params(params: Sequence[tf.Tensor], tasks: int) -> list:
  """Stacks ``tasks`` copies of every parameter on a new leading axis."""
  return [tf.tile(p[None], [tasks] + [1] * p.shape.rank) for p in params]


def batched_forward(model: keras.Model, stacked_params: Sequence[tf.Tensor],
                    state: Sequence[tf.Tensor], obs: tf.Tensor):
  """Runs task ``i``'s weights on ``obs[i]`` for every task at once.

  Arguments:
    model: the policy (used as a function only).
    stacked_params: parameters with a leading task axis ``T``.
    state: non-trainable state shared by all tasks (empty for an MLP).
    obs: ``[T, B, obs_dim]``.

  Returns:
    ``(mean, log_std)``, each ``[T, B, act_dim]``.
  """
  def one(args):
    params, x = args
    (mean, log_std), _ = functional.functional_call(model, params, state, x)
    return mean, log_std
  return tf.vectorized_map(one, (list(stacked_params), obs))


def action_distribution(mean: tf.Tensor, log_std: tf.Tensor):
  """``tfd.MultivariateNormalDiag(mean, exp(log_std))``."""
  return tfd.MultivariateNormalDiag(loc=mean, scale_diag=tf.exp(log_std))
