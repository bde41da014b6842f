"""Sinusoid regression tasks (Finn et al. 2017, section 5.1).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase
``phi ~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``; K points of one task form a
support set, more points of the same task its query set.
"""

import dataclasses
import math
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from maml_tf.core.task_batch import TaskBatch


@dataclasses.dataclass(frozen=True)
class SinusoidDistribution:
  """The task distribution; defaults are the paper's."""
  amplitude: Tuple[float, float] = (0.1, 5.0)
  phase: Tuple[float, float] = (0.0, math.pi)
  x_range: Tuple[float, float] = (-5.0, 5.0)

  def sample_tasks(self, num_tasks: int, rng: np.random.Generator):
    """Returns ``(amplitudes, phases)``, each of shape ``[num_tasks]``."""
    return (rng.uniform(*self.amplitude, size=num_tasks),
            rng.uniform(*self.phase, size=num_tasks))

  def sample_x(self, shape, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(*self.x_range, size=shape)


def sinusoid(x, amplitude, phase):
  """``amplitude * sin(x - phase)``, broadcasting."""
  return amplitude * np.sin(x - phase)


def sample_batch(num_tasks: int, k_support: int, k_query: int,
                 rng: np.random.Generator,
                 distribution: SinusoidDistribution = SinusoidDistribution(),
                 dtype=np.float32):
  """Samples a meta-batch of sinusoid tasks.

  Arguments:
    num_tasks: tasks in the batch (T).
    k_support: support points per task (K).
    k_query: query points per task.
    rng: a numpy ``Generator``; the batch is a pure function of its state.
    distribution: the task distribution.
    dtype: dtype of the returned arrays.

  Returns:
    ``(TaskBatch, (amplitudes, phases))`` with ``x``/``y`` of shape
    ``[T, K, 1]`` and ``[T, k_query, 1]``.

  Example:
    >>> batch, (amp, phase) = sample_batch(25, 10, 10, np.random.default_rng(0))
    >>> batch.support_x.shape
    (25, 10, 1)
  """
  for name, value in (("num_tasks", num_tasks), ("k_support", k_support),
                      ("k_query", k_query)):
    if int(value) < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  amp, phase = distribution.sample_tasks(num_tasks, rng)
  x = distribution.sample_x((num_tasks, k_support + k_query, 1), rng)
  y = sinusoid(x, amp[:, None, None], phase[:, None, None])
  x, y = x.astype(dtype), y.astype(dtype)
  batch = TaskBatch(x[:, :k_support], y[:, :k_support],
                    x[:, k_support:], y[:, k_support:])
  return batch, (amp, phase)


def sample_pooled(num_points: int, rng: np.random.Generator,
                  distribution: SinusoidDistribution = SinusoidDistribution(),
                  points_per_task: int = 10, dtype=np.float32):
  """Points pooled over random tasks: the 'pretrained' baseline's data.

  Returns ``(x, y)`` of shape ``[num_points, 1]``; every ``points_per_task``
  consecutive points share one task.
  """
  tasks = -(-num_points // points_per_task)
  batch, _ = sample_batch(tasks, points_per_task, 1, rng, distribution, dtype)
  x = batch.support_x.reshape(-1, 1)[:num_points]
  y = batch.support_y.reshape(-1, 1)[:num_points]
  return x, y


def batch_sampler(num_tasks: int, k_support: int, k_query: int,
                  seed: int = 0,
                  distribution: SinusoidDistribution = SinusoidDistribution(),
                  dtype=tf.float32):
  """``iteration -> TaskBatch`` sampled in the TensorFlow graph.

  The in-graph twin of :func:`sample_batch`, for
  :meth:`maml_tf.MAML.train_steps`: the batch is a pure function of
  ``(seed, iteration)`` (stateless random ops), so a resumed run sees the
  batches of an uninterrupted one.

  Arguments:
    num_tasks, k_support, k_query: as :func:`sample_batch`.
    seed: an integer.
    distribution: the task distribution.
    dtype: float dtype of the batch.

  Returns:
    A function of an integer scalar tensor (the iteration) returning a
    ``TaskBatch`` of shapes ``[T, K, 1]`` / ``[T, k_query, 1]``.

  Example:
    >>> sample = batch_sampler(25, 10, 10, seed=0)
    >>> sample(tf.constant(3)).support_x.shape
    TensorShape([25, 10, 1])
  """
  for name, value in (("num_tasks", num_tasks), ("k_support", k_support),
                      ("k_query", k_query)):
    if int(value) < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  n = k_support + k_query

  def sample(iteration):
    key = tf.stack([tf.constant(int(seed), tf.int64),
                    tf.cast(iteration, tf.int64)])
    keys = tf.random.experimental.stateless_split(key, 3)
    amp = tf.random.stateless_uniform([num_tasks, 1, 1], keys[0],
                                      *distribution.amplitude, dtype=dtype)
    phase = tf.random.stateless_uniform([num_tasks, 1, 1], keys[1],
                                        *distribution.phase, dtype=dtype)
    x = tf.random.stateless_uniform([num_tasks, n, 1], keys[2],
                                    *distribution.x_range, dtype=dtype)
    y = amp * tf.sin(x - phase)
    return TaskBatch(x[:, :k_support], y[:, :k_support], x[:, k_support:],
                     y[:, k_support:])
  return sample


def dataset(num_tasks: int, k_support: int, k_query: int, seed: int = 0,
            num_batches: Optional[int] = None, first: int = 0,
            distribution: SinusoidDistribution = SinusoidDistribution(),
            dtype=tf.float32) -> tf.data.Dataset:
  """A ``tf.data.Dataset`` of meta-batches (for ``MetaModel.fit``).

  Element ``i`` is ``batch_sampler(...)(first + i)``: the in-graph stream of
  :meth:`maml_tf.MAML.train_steps`, so ``fit`` and ``train_steps`` see the
  same tasks. Infinite unless ``num_batches`` is given.

  Example:
    >>> meta.fit(dataset(25, 10, 10), epochs=5, steps_per_epoch=1000)
  """
  sample = batch_sampler(num_tasks, k_support, k_query, seed, distribution,
                         dtype)
  if num_batches is None:
    indices = tf.data.Dataset.counter(start=first, dtype=tf.int64)
  else:
    indices = tf.data.Dataset.range(first, first + int(num_batches))
  return indices.map(sample).prefetch(tf.data.AUTOTUNE)
