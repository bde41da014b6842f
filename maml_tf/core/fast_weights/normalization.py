"""Task-batched BatchNormalization and LayerNormalization, exact to any order.

Per-task moments over every axis but the task and channel axes, computed as
``mean`` then ``mean((x - mean)^2)`` with no ``stop_gradient`` (unlike
``tf.nn.moments``), so second derivatives are exact (see
:mod:`maml_tf.core.functional`). In training mode BatchNorm's backward pass is
written out (:func:`normalize_with_moments`, exact to every order). A Conv2D
with few inputs per output pixel followed by BatchNormalization is folded into
one convolution in training mode (:class:`_ConvBatchNorm`).
"""

import keras
import tensorflow as tf

from maml_tf.core.fast_weights.base import _Op
from maml_tf.core.fast_weights.kernels import (
    _CONV_KERNELS, ONE_HOT_PATCH_DEPTH, _dims, _flat_patches, _per_task_vector,
    _static_or_dynamic)


def moments(x, axes):
  """``(mean, variance)`` over ``axes`` (kept as 1), exact to every order.

  The (biased) variance is ``mean((x - mean)^2)``, with no
  ``stop_gradient``: derivatives of every order are those of the formula.
  """
  mean = tf.reduce_mean(x, axis=axes, keepdims=True)
  variance = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
  return mean, variance


def normalize(x, mean, variance, gamma, beta, epsilon):
  """The formula of ``tf.nn.batch_normalization`` (as Keras uses it)."""
  inv = tf.math.rsqrt(variance + epsilon)
  if gamma is not None:
    inv = inv * gamma
  shift = beta - mean * inv if beta is not None else -mean * inv
  return x * inv + shift


def _sum_to_shape(t, shape):
  """Sums a broadcast result back to ``shape`` (static), as autodiff would."""
  shape = list(shape)
  while t.shape.rank > len(shape):
    t = tf.reduce_sum(t, axis=0)
  axes = [i for i, (a, b) in enumerate(zip(t.shape.as_list(), shape))
          if b == 1 and a != 1]
  return tf.reduce_sum(t, axis=axes, keepdims=True) if axes else t


def normalize_with_moments(x, gamma, beta, epsilon: float, axes):
  """``(y, mean, variance)``: normalisation by the moments over ``axes``.

  The numbers of ``normalize(x, *moments(x, axes), gamma, beta, epsilon)``,
  with the textbook backward pass written out,
  ``dx = s * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` with
  ``s = gamma / sqrt(variance + epsilon)``: about half the full-size
  elementwise ops that autodiff makes through the two moments. The backward
  pass is built from differentiable ops on tensors the forward pass
  computed from ``x`` (and recorded), so derivatives of every order are
  exact: second-order MAML differentiates it.

  Arguments:
    x: inputs, ``[T, N, ..., C]``.
    gamma, beta: scale and offset broadcastable against ``x`` and constant
      along ``axes`` (``[C]`` or ``[T, 1, ..., C]`` for BatchNorm; not
      LayerNorm's, which vary along its axis), or ``None``.
    epsilon: added to the variance.
    axes: the axes of the moments (the others index the statistics).

  Returns:
    ``y`` like ``x``; ``mean`` and ``variance`` with ``axes`` kept as 1.

  Example:
    >>> y, m, v = normalize_with_moments(x, gamma, beta, 1e-3, [1, 2, 3])
  """
  has_gamma, has_beta = gamma is not None, beta is not None
  args = [x] + [t for t in (gamma, beta) if t is not None]
  count = 1
  for a in axes:
    count *= _dims(x)[a]

  @tf.custom_gradient
  def forward(*args):
    x = args[0]
    gamma = args[1] if has_gamma else None
    beta = args[-1] if has_beta else None
    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    centred = x - mean
    variance = tf.reduce_mean(tf.square(centred), axis=axes, keepdims=True)
    inv = tf.math.rsqrt(variance + epsilon)
    scale = inv * gamma if has_gamma else inv
    y = centred * scale
    if has_beta:
      y = y + beta

    def grad(dy, dmean, dvariance):
      n = tf.cast(count, x.dtype)
      sum_dy = tf.reduce_sum(dy, axis=axes, keepdims=True)
      sum_dy_centred = tf.reduce_sum(dy * centred, axis=axes, keepdims=True)
      dx = (scale * dy
            - centred * (scale * tf.square(inv) * sum_dy_centred / n)
            - scale * sum_dy / n)
      if dmean is not None:
        dx = dx + dmean / n
      if dvariance is not None:
        dx = dx + centred * (2.0 * dvariance / n)
      grads = [dx]
      if has_gamma:
        grads.append(_sum_to_shape(sum_dy_centred * inv, gamma.shape))
      if has_beta:
        grads.append(_sum_to_shape(sum_dy, beta.shape))
      return grads
    return (y, mean, variance), grad
  return forward(*args)


class _BatchNorm(_Op):

  promotes_integers = True

  def __init__(self, layer, refs):
    super().__init__(layer)
    self.gamma_ref, self.beta_ref, self.mean_ref, self.var_ref = refs

  def update_moving(self, ctx, mean, variance):
    """Moves the moving statistics towards ``[T, C]`` batch statistics."""
    momentum = self.layer.momentum
    for ref, stat in ((self.mean_ref, mean), (self.var_ref, variance)):
      moving, _ = ctx.read(ref)
      ctx.write(ref, moving * momentum + stat * (1.0 - momentum))

  def vector(self, ctx, ref, rank):
    """The value of ``ref`` broadcastable against rank-``rank`` inputs.

    ``None`` when ``ref`` is ``None`` (a layer without gamma or beta).
    """
    if ref is None:
      return None
    value, per_task = ctx.read(ref)
    return _per_task_vector(value, per_task, rank)

  def __call__(self, ctx, inputs):
    x = inputs[0]
    rank = x.shape.rank
    layer = self.layer
    gamma = self.vector(ctx, self.gamma_ref, rank)
    beta = self.vector(ctx, self.beta_ref, rank)
    if ctx.training and layer.trainable:
      squeeze = list(range(1, rank - 1))
      y, mean, variance = normalize_with_moments(x, gamma, beta,
                                                 layer.epsilon, squeeze)
      self.update_moving(ctx, tf.squeeze(mean, squeeze),
                         tf.squeeze(variance, squeeze))
      return y
    mean = self.vector(ctx, self.mean_ref, rank)
    variance = self.vector(ctx, self.var_ref, rank)
    return normalize(x, mean, variance, gamma, beta, layer.epsilon)


class _ConvBatchNorm(_Op):
  """Conv2D then BatchNormalization (training mode), folded into one conv.

  With batch statistics, BatchNorm of ``z = conv(x, W) + b`` only needs the
  per-channel mean and variance of ``z``, and both follow from the moments
  of the input patches ``p`` (the ``kh*kw*C`` values under each output
  pixel, zero padding included): ``mean(z) = mean(p) @ W + b`` and
  ``var(z) = diag(W^T cov(p) W)``. So ``BN(z) = conv(x, W * s) + beta -
  (mean(p) @ W) * s`` with ``s = gamma / sqrt(var(z) + epsilon)``: one
  convolution with a folded per-task filter, and no full-size normalisation
  pass forward or backward (the derivatives flow through ``[kh*kw*C, F]``
  tensors instead of ``[N, H', W', F]`` ones). Exact to every order, the
  same numbers to float round-off (tested). Worth it only when the patch
  covariance (``(kh*kw*C)^2`` per pixel) costs no more than the convolution
  (``kh*kw*C*F``): the first layer of an image model (Omniglot: 3x3x1 patches
  for 64 filters).
  """

  def __init__(self, conv: _Op, bn: _BatchNorm):
    """``conv``: the compiled Conv2D (``compiler._Conv2D``); ``bn``: its BN."""
    super().__init__(bn.layer)
    self.conv, self.bn = conv, bn

  @staticmethod
  def applies(conv_layer, bn_layer) -> bool:
    """Is ``conv_layer -> bn_layer`` worth folding (and foldable)?"""
    kh, kw = conv_layer.kernel_size
    fan_in = kh * kw * int(conv_layer.kernel.shape[2])
    linear = conv_layer.activation in (None, keras.activations.linear)
    return (linear and bn_layer.axis in (-1, 3) and bn_layer.trainable
            and conv_layer.groups == 1
            and fan_in <= conv_layer.filters
            and all(int(d) == 1 for d in conv_layer.dilation_rate))

  def __call__(self, ctx, inputs):
    x = inputs[0]
    if not ctx.training or x.shape.rank != 5 or None in x.shape[2:]:
      return self.bn(ctx, [self.conv(ctx, inputs)])
    conv, bn = self.conv, self.bn
    kernel, kernel_per_task = ctx.read(conv.kernel_ref)
    kh, kw, c, f = kernel.shape[-4:]
    k = kh * kw * c
    t = _static_or_dynamic(x, 0)
    n = _static_or_dynamic(x, 1)
    flat, oh, ow = _flat_patches(x, kh, kw, conv.strides,
                                 conv.padding)                   # [T, M, K]
    mu = tf.reduce_mean(flat, axis=1, keepdims=True)             # [T, 1, K]
    centred = flat - mu
    count = tf.cast(tf.shape(flat)[1], x.dtype)
    cov = tf.matmul(centred, centred, transpose_a=True) / count  # [T, K, K]
    w = tf.reshape(kernel, ([t] if kernel_per_task else []) + [k, f])
    if not kernel_per_task:
      w = tf.broadcast_to(w, [t, k, f])
    mean = tf.matmul(mu, w)                                      # [T, 1, F]
    bias = None
    if conv.bias_ref is not None:
      bias, bias_per_task = ctx.read(conv.bias_ref)
      bias = tf.reshape(bias, [t if bias_per_task else 1, 1, f])
      mean = mean + bias
    variance = tf.reduce_sum(tf.matmul(cov, w) * w, axis=1,
                             keepdims=True)                      # [T, 1, F]
    inv = tf.math.rsqrt(variance + bn.layer.epsilon)
    gamma = bn.vector(ctx, bn.gamma_ref, 3)
    beta = bn.vector(ctx, bn.beta_ref, 3)
    scale = inv * gamma if gamma is not None else inv
    # (bias - mean) * scale: the bias cancels, but stays connected (its
    # gradient is zero, not None, as without the fold).
    shift = (bias - mean) * scale if bias is not None else -mean * scale
    if beta is not None:
      shift = shift + beta
    folded = w * scale                                           # [T, K, F]
    if conv.impl == "patches" or k <= ONE_HOT_PATCH_DEPTH:
      y = tf.reshape(tf.matmul(flat, folded), [t, n, oh, ow, f])
    else:
      y = _CONV_KERNELS[conv.impl](
          x, tf.reshape(folded, [t, kh, kw, c, f]), conv.strides,
          conv.padding)
    y = y + tf.reshape(shift, [t, 1, 1, 1, f])
    bn.update_moving(ctx, tf.reshape(mean, [t, f]),
                     tf.reshape(variance, [t, f]))
    return y


class _LayerNorm(_Op):

  promotes_integers = True

  def __init__(self, layer, gamma_ref, beta_ref):
    super().__init__(layer)
    self.gamma_ref, self.beta_ref = gamma_ref, beta_ref

  def __call__(self, ctx, inputs):
    x = inputs[0]
    rank = x.shape.rank
    vectors = []
    for ref in (self.gamma_ref, self.beta_ref):
      if ref is None:
        vectors.append(None)
      else:
        value, per_task = ctx.read(ref)
        vectors.append(_per_task_vector(value, per_task, rank))
    mean, variance = moments(x, [rank - 1])
    return normalize(x, mean, variance, vectors[0], vectors[1],
                      self.layer.epsilon)


class _GroupNorm(_Op):
  """GroupNormalization over the last axis: each example's channels in
  ``groups`` groups, each group normalised by its moments over the
  example's other axes, then the per-task (or shared) scale and offset."""

  promotes_integers = True

  def __init__(self, layer, gamma_ref, beta_ref):
    super().__init__(layer)
    self.gamma_ref, self.beta_ref = gamma_ref, beta_ref

  def __call__(self, ctx, inputs):
    x = inputs[0]
    dims, channels = _dims(x), int(x.shape[-1])
    groups = int(self.layer.groups)
    grouped = tf.reshape(x, dims[:-1] + [groups, channels // groups])
    rank = grouped.shape.rank
    vectors = []
    for ref in (self.gamma_ref, self.beta_ref):
      if ref is None:
        vectors.append(None)
        continue
      value, per_task = ctx.read(ref)
      lead = [-1] + [1] * (rank - 3) if per_task else []
      vectors.append(tf.reshape(value, lead + [groups, channels // groups]))
    mean, variance = moments(grouped, list(range(2, rank - 2)) + [rank - 1])
    y = normalize(grouped, mean, variance, vectors[0], vectors[1],
                  self.layer.epsilon)
    return tf.reshape(y, dims)
