"""Conjugate gradient and flat-vector helpers for TRPO.

Example:
  >>> x = conjugate_gradient(lambda v: tf.linalg.matvec(A, v), b, iters=10)
"""

from typing import Callable, Sequence

import tensorflow as tf


def flatten(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """Concatenates tensors into one vector."""
  return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unflatten(vector: tf.Tensor, like: Sequence[tf.Tensor]) -> list:
  """Splits ``vector`` into tensors shaped as ``like``."""
  out, offset = [], 0
  for t in like:
    size = int(tf.size(t)) if not t.shape.is_fully_defined() else t.shape.num_elements()
    out.append(tf.reshape(vector[offset:offset + size], t.shape))
    offset += size
  return out


def conjugate_gradient(matvec: Callable[[tf.Tensor], tf.Tensor], b: tf.Tensor,
                       iters: int = 10, residual_tol: float = 1e-10):
  """Approximately solves ``A x = b`` for a symmetric positive-definite ``A``.

  Runs exactly ``iters`` iterations (a Python loop, so it unrolls into a
  fixed graph inside ``tf.function``); once the squared residual falls below
  ``residual_tol`` the remaining iterations leave ``x`` unchanged, as
  rllab's early exit.

  Arguments:
    matvec: ``v -> A v`` for vectors shaped as ``b``.
    b: the right-hand side vector.
    iters: number of iterations (10 in TRPO).
    residual_tol: stopping threshold on ``r . r``.

  Returns:
    ``x`` with ``A x ~= b``.

  Example:
    >>> a = tf.constant([[4., 1.], [1., 3.]]); b = tf.constant([1., 2.])
    >>> conjugate_gradient(lambda v: tf.linalg.matvec(a, v), b, iters=2)
  """
  x = tf.zeros_like(b)
  r = tf.identity(b)
  p = tf.identity(b)
  rdotr = tf.reduce_sum(r * r)
  tiny = tf.constant(1e-30, b.dtype)
  for _ in range(iters):
    active = tf.cast(rdotr >= residual_tol, b.dtype)
    z = matvec(p)
    alpha = active * rdotr / (tf.reduce_sum(p * z) + tiny)
    x = x + alpha * p
    r = r - alpha * z
    new_rdotr = tf.reduce_sum(r * r)
    beta = new_rdotr / (rdotr + tiny)
    p = active * (r + beta * p) + (1.0 - active) * p
    rdotr = active * new_rdotr + (1.0 - active) * rdotr
  return x
