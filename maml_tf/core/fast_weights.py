"""Task-batched fast weights: all T tasks of a meta-batch as one batched op.

MAML evaluates one network at T different sets of weights (one per task).
``tf.vectorized_map`` cannot vectorise a ``Conv2D`` whose filter differs per
task ("Input 'filter' of op 'Conv2D' expected to be loop invariant"), so the
learner falls back to ``tf.map_fn``, which runs the tasks one after another.
This module compiles a Keras model into a :class:`BatchedModel`: a pure
function of ``(params, state, x)`` in which every tensor carries a leading
task axis and every layer is one task-batched kernel:

* Dense: one batched matmul ``[T, M, D] x [T, D, K]``.
* Conv2D, selectable with ``conv_impl``:

  - ``'map'`` (CPU default): one ``tf.nn.conv2d`` per task, unrolled over a
    static task axis (``tf.map_fn`` when T is unknown). oneDNN's per-task
    convolutions beat every patch-based formulation measured on CPU (below).
  - ``'patches'``: ``tf.image.extract_patches`` on ``[T*N, H, W, C]`` (TF's
    own 'SAME'/'VALID' geometry), then one batched matmul
    ``[T, N*H'*W', kh*kw*C] x [T, kh*kw*C, F]``. Linear ops only, exact
    derivatives of every order. (:func:`conv2d_slices` is the same with
    patches built from kh*kw strided slices; exact but slow on CPU.)
  - ``'grouped'`` (GPU default): fold the tasks into channels, input
    ``[N, H, W, T*C]`` and filter ``[kh, kw, C, T*F]``, so that
    ``tf.nn.conv2d`` runs one grouped convolution with T groups (cuDNN).
    TF's CPU kernels run the forward pass (tested) but have NO gradient for
    grouped convolutions ("Gradients for grouped convolutions are not
    supported on CPU"), so on CPU it serves inference only. Its GPU
    gradients (first and second order) were not verified in this session:
    no GPU was available; run ``test_second_order_gradients`` on a GPU.
  - ``'auto'``: ``'grouped'`` when a GPU is visible, else ``'map'``.
    :class:`maml_tf.MAML` refines this on CPU by the size of one task
    (``MAML._small_tasks``): tasks with fewer than 2**15 input values
    (Omniglot 5-way 1-shot with 1 query image per class) run all at once
    with ``'patches'`` (2x faster than ``'map'``: a few big ops instead of
    thousands of tiny ones), larger tasks one after another with ``'map'``
    (``MAML(task_chunk=1)``: each task's activations stay in the CPU caches;
    15 query images per class: 0.38 s instead of 0.56 s per meta-step).

* BatchNormalization / LayerNormalization: per-task moments over every axis
  but the task and channel axes, computed as ``mean`` then
  ``mean((x - mean)^2)`` with no ``stop_gradient``, so second derivatives are
  exact (see :mod:`maml_tf.core.functional`). In training mode BatchNorm's
  backward pass is written out (:func:`normalize_with_moments`: about half
  the full-size ops of autodiff through the moments, still exact to every
  order). A Conv2D with few inputs per output pixel (``kh*kw*C`` at most
  its filter count: a first layer) followed by BatchNormalization is folded
  into one convolution in training mode (:class:`_ConvBatchNorm`: the batch
  statistics from the moments of the input patches): Omniglot 5-way 1-shot
  meta-step 0.362 -> 0.325 s on one CPU.
* Pooling, Flatten, activations, Add, Concatenate: no per-task weights; the
  task and example axes are merged and TF's own ops run once (pooling keeps
  TF's exact tie-breaking, so derivatives equal Keras' too).

Every parameter may also be given *without* the task axis (shape
``var.shape``): it is then shared by all tasks and the layer uses the plain
(unbatched) kernel, e.g. ``tf.nn.conv2d`` on ``[T*N, H, W, C]``. The gradient
with respect to a shared parameter is the sum over tasks.

Benchmark (CPU machine of this repo: 2 cores shared with other jobs, load
average ~5 during the runs, TF 2.21 CPU wheel with oneDNN, float32): one
Omniglot meta-gradient -- the paper's conv net (4 x [Conv2D 64 3x3 stride 2
'same', BatchNorm, ReLU], Flatten, Dense(5)) on 28x28x1, T=32 tasks, 5
support and 75 query images per task, one inner SGD step (alpha 0.4), second
order, gradient of the mean query cross-entropy w.r.t. theta, in a
``tf.function``; median of 7 after warm-up, seconds per iteration (wall /
process CPU time; wall times of repeated runs in brackets):

  ==========================================  ==============  =============
  implementation                              wall / CPU (s)  other runs
  ==========================================  ==============  =============
  tf.map_fn of functional_call (fallback)     0.67 / 0.68     0.62 - 1.03
  batched, conv_impl='map'                    0.77 / 0.76     0.71 - 1.05
  batched, conv_impl='patches'                1.16 / 0.84     0.94 - 2.14
  batched, patches from 9 strided slices      9.9             (first try)
  batched, conv_impl='grouped'                n/a: no CPU gradient kernel
  MAML.train_step, vectorize=False (whole     1.19 / 1.33
  step: metrics, Adam, check_numerics)
  ==========================================  ==============  =============

All are below the 1.6 s goal on this machine, and on CPU batching gives no
speed-up: the convolutions dominate (in a traced profile of 'map',
Conv2D + its two backprop kernels are ~2/3 of op time) and oneDNN already
runs each task's convolution efficiently, so the win of this module is on
GPUs (one grouped kernel instead of T sequential ones) and in removing the
``tf.map_fn`` loop. The paper's MLP (``omniglot_mlp``, same batch) takes
0.069 s with ``tf.map_fn`` and 0.070 s batched (0.046 s CPU time).

What was tried for the patches path (profiled with a traced session): the
first version (pad + 9 strided slices + concat + batched matmul) spent ~80%
of op time in TF's 5-D ``StridedSlice``/``StridedSliceGrad`` CPU kernels and
only ~3% in the matmuls. A micro-benchmark of one 14x14x64 -> 7x7x64 layer
(second derivative of a scalar through it, T=32, N=75) gave: per-task
conv2d 0.70 s, ``extract_patches`` 1.81 s, depthwise conv with an identity
filter as patch extractor 2.16 s, unit-stride slices of a space-to-depth
(phase) reshape 4.2 s (3.5 s with the phases transposed first), strided
slices 12.7 s. ``'patches'`` therefore uses ``extract_patches`` and ``'auto'``
picks ``'map'`` on CPU. Not tried: NCHW inside (oneDNN picks its own layout),
a 2-D matmul for parameters shared at step 0 (the inner gradient needs
per-task parameters anyway; shared parameters are supported and use the
plain unbatched kernels).

Arguments and semantics: see :func:`compile_batched` and
:class:`BatchedModel`.

Example:
  >>> batched = compile_batched(model)
  >>> params = [tf.tile(v[None], [T] + [1] * len(v.shape))
  ...           for v in model.trainable_variables]
  >>> state = [tf.tile(v[None], [T] + [1] * len(v.shape))
  ...          for v in model.non_trainable_variables]
  >>> y, new_state = batched(params, state, x)    # x: [T, N, *input_shape]
"""

import math
from typing import List, Sequence, Tuple

import keras
import tensorflow as tf

CONV_IMPLS = ("auto", "patches", "grouped", "map")


class Unsupported(Exception):
  """A layer or configuration that :func:`compile_batched` cannot batch.

  The message names the layer and says why; callers fall back to a per-task
  loop (``tf.map_fn`` over :func:`maml_tf.core.functional.functional_call`).
  """


def _unsupported(layer, why: str) -> Unsupported:
  return Unsupported(
      f"maml_tf.fast_weights cannot batch layer {layer.name!r} "
      f"({type(layer).__name__}): {why}")


# ------------------------------------------------------------------ context
class _Context:
  """The values one call of a :class:`BatchedModel` works on."""

  def __init__(self, params, state, shapes, training):
    self.values = {"p": list(params), "s": list(state)}
    self.shapes = shapes               # {"p": [var shapes], "s": [...]}
    self.training = training

  def read(self, ref) -> Tuple[tf.Tensor, bool]:
    """``(value, per_task)`` of a variable reference ``(kind, index)``."""
    kind, index = ref
    value = self.values[kind][index]
    rank = len(self.shapes[kind][index])
    if value.shape.rank == rank + 1:
      return value, True
    if value.shape.rank == rank:
      return value, False
    raise ValueError(
        f"fast_weights: {'params' if kind == 'p' else 'state'}[{index}] has "
        f"shape {value.shape}; expected [T, *{tuple(self.shapes[kind][index])}]"
        f" (per task) or {tuple(self.shapes[kind][index])} (shared)")

  def write(self, ref, value):
    kind, index = ref
    self.values[kind][index] = value


def _per_task_vector(value, per_task: bool, rank: int):
  """Broadcasts a per-channel vector against a ``[T, N, ..., C]`` tensor."""
  if not per_task:
    return value
  return tf.reshape(value, [-1] + [1] * (rank - 2) + _dims(value)[1:])


def _dims(x) -> list:
  """The shape of ``x`` as a list: static ints where known, else scalars."""
  static = x.shape.as_list()
  if None not in static:
    return static
  dynamic = tf.shape(x)
  return [d if d is not None else dynamic[i] for i, d in enumerate(static)]


def _merge_task_axis(x):
  """``[T, N, ...] -> [T*N, ...]`` and the function that undoes it."""
  dims = _dims(x)
  merged = tf.reshape(x, [-1] + dims[2:])

  def split(y):
    return tf.reshape(y, dims[:2] + _dims(y)[1:])
  return merged, split


def _static_or_dynamic(x, axis):
  return _dims(x)[axis]


# ------------------------------------------------------------------ kernels
def batched_dense(x, kernel, per_task: bool):
  """``x [T, N, ..., D] @ kernel`` where kernel is ``[T, D, K]`` or ``[D, K]``.

  Arguments:
    x: inputs with task axis first.
    kernel: per-task ``[T, D, K]`` (``per_task=True``) or shared ``[D, K]``.
    per_task: whether ``kernel`` has the task axis.

  Example:
    >>> batched_dense(tf.ones((3, 4, 2)), tf.ones((3, 2, 5)), True).shape
    TensorShape([3, 4, 5])
  """
  if not per_task:
    return tf.matmul(x, kernel) if x.shape.rank == 2 else tf.tensordot(
        x, kernel, axes=[[x.shape.rank - 1], [0]])
  if x.shape.rank == 3:
    d, k = kernel.shape[-2], kernel.shape[-1]
    # Rank-1 products as broadcasts: cheaper than a batched matmul kernel
    # (and so are their first and second derivatives), e.g. the sinusoid
    # MLP's 1 -> 40 and 40 -> 1 layers.
    if d == 1:
      return x * kernel                          # [T,N,1] * [T,1,K]
    if k == 1:
      return tf.reduce_sum(x * tf.transpose(kernel, [0, 2, 1]), axis=-1,
                           keepdims=True)        # [T,N,D] * [T,1,D]
    return tf.matmul(x, kernel)
  dims = _dims(x)
  out = tf.matmul(tf.reshape(x, [dims[0], -1, dims[-1]]), kernel)
  return tf.reshape(out, dims[:-1] + _dims(kernel)[-1:])


def _same_padding(size: int, k: int, s: int) -> Tuple[int, int, int]:
  """TF 'SAME': output size and (before, after) padding of one spatial axis."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return out, total // 2, total - total // 2


def _conv_geometry(h, w, kh, kw, sh, sw, padding):
  if padding == "same":
    oh, top, bottom = _same_padding(h, kh, sh)
    ow, left, right = _same_padding(w, kw, sw)
    return oh, ow, [[top, bottom], [left, right]]
  oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
  return oh, ow, [[0, 0], [0, 0]]


def _flat_patches(x, kh: int, kw: int, strides, padding):
  """``([T, N*H'*W', kh*kw*C] patches, H', W')`` of ``x [T, N, H, W, C]``.

  ``tf.image.extract_patches`` (TF's own 'SAME'/'VALID' geometry; depth
  ordered as ``(row, col, channel)``, the order of a reshaped
  ``[kh, kw, C, F]`` kernel); a strided subsample for 1x1 kernels.
  """
  _, _, h, w, c = x.shape
  sh, sw = strides
  merged = tf.reshape(x, [-1, h, w, c])
  if kh == kw == 1:   # no padding either way; a strided subsample
    patches = merged[:, ::sh, ::sw, :]
  else:
    patches = tf.image.extract_patches(
        merged, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
        rates=[1, 1, 1, 1], padding=padding.upper())
  flat = tf.reshape(patches, [_static_or_dynamic(x, 0), -1, kh * kw * c])
  return flat, patches.shape[1], patches.shape[2]


def conv2d_patches(x, kernel, strides, padding):
  """Task-batched conv2d as patch extraction + one batched matmul.

  The ``kh*kw*C`` patches of every output pixel are extracted from the
  ``[T*N, H, W, C]`` inputs with ``tf.image.extract_patches`` (TF's own
  'SAME'/'VALID' geometry; depth ordered as ``(row, col, channel)``, the
  order of a reshaped ``[kh, kw, C, F]`` kernel), then one batched matmul
  ``[T, N*H'*W', kh*kw*C] x [T, kh*kw*C, F]`` applies each task's filter.
  Patch extraction, its gradient (a sparse scatter) and matmul are linear
  ops, so derivatives of every order are exact.

  Arguments:
    x: ``[T, N, H, W, C]`` (H, W, C static).
    kernel: ``[T, kh, kw, C, F]``.
    strides: ``(sh, sw)``.
    padding: ``'same'`` or ``'valid'`` (TF conventions).

  Returns:
    ``[T, N, H', W', F]``.

  Example:
    >>> conv2d_patches(tf.ones((2, 3, 7, 7, 1)), tf.ones((2, 3, 3, 1, 4)),
    ...                (2, 2), "same").shape
    TensorShape([2, 3, 4, 4, 4])
  """
  kh, kw = int(kernel.shape[1]), int(kernel.shape[2])
  t = _static_or_dynamic(x, 0)
  n = _static_or_dynamic(x, 1)
  flat, oh, ow = _flat_patches(x, kh, kw, strides, padding)
  out = tf.matmul(flat, tf.reshape(kernel, [t, flat.shape[-1], -1]))
  return tf.reshape(out, [t, n, oh, ow, -1])


def conv2d_slices(x, kernel, strides, padding):
  """As :func:`conv2d_patches`, with patches from kh*kw strided slices.

  Pads as TF's 'SAME' does (more at the bottom/right when the total is odd),
  takes the kh*kw shifted strided slices and concatenates them along
  channels. Exact, but TF's CPU ``StridedSlice``/``StridedSliceGrad`` kernels
  are slow on 5-D tensors (about 15x slower than ``'map'`` on the Omniglot
  benchmark), so it is kept for reference and tests only.

  Example:
    >>> conv2d_slices(tf.ones((2, 3, 7, 7, 1)), tf.ones((2, 3, 3, 1, 4)),
    ...               (2, 2), "same").shape
    TensorShape([2, 3, 4, 4, 4])
  """
  _, _, h, w, c = x.shape
  kh, kw = int(kernel.shape[1]), int(kernel.shape[2])
  sh, sw = strides
  oh, ow, pads = _conv_geometry(h, w, kh, kw, sh, sw, padding)
  if any(p for pair in pads for p in pair):
    x = tf.pad(x, [[0, 0], [0, 0]] + pads + [[0, 0]])
  patches = tf.concat(
      [x[:, :, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :]
       for i in range(kh) for j in range(kw)], axis=-1)
  t = _static_or_dynamic(x, 0)
  n = _static_or_dynamic(x, 1)
  k = kh * kw * c
  out = tf.matmul(tf.reshape(patches, [t, -1, k]),
                  tf.reshape(kernel, [t, k, -1]))
  return tf.reshape(out, [t, n, oh, ow, -1])


def conv2d_grouped(x, kernel, strides, padding):
  """Task-batched conv2d as one grouped convolution (tasks as groups).

  Input ``[T, N, H, W, C]`` becomes ``[N, H, W, T*C]`` and the filter
  ``[T, kh, kw, C, F]`` becomes ``[kh, kw, C, T*F]``; ``tf.nn.conv2d`` then
  convolves channel group ``t`` with filters ``t*F .. t*F+F-1``.

  Arguments:
    x: ``[T, N, H, W, C]``.
    kernel: ``[T, kh, kw, C, F]`` (T static; :func:`conv2d_map` otherwise).
    strides: ``(sh, sw)``.
    padding: ``'same'`` or ``'valid'``.

  Example:
    >>> conv2d_grouped(tf.ones((2, 3, 7, 7, 1)), tf.ones((2, 3, 3, 1, 4)),
    ...                (1, 1), "valid").shape
    TensorShape([2, 3, 5, 5, 4])
  """
  t, _, h, w, c = x.shape
  _, kh, kw, _, f = kernel.shape
  if t is None:   # the folded channel count must be static
    return conv2d_map(x, kernel, strides, padding)
  folded = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]), [-1, h, w, t * c])
  filt = tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]), [kh, kw, c, t * f])
  y = tf.nn.conv2d(folded, filt, strides=list(strides),
                   padding=padding.upper())
  oh, ow = y.shape[1], y.shape[2]
  y = tf.reshape(y, [-1, oh, ow, t, f])
  return tf.transpose(y, [3, 0, 1, 2, 4])


def conv2d_map(x, kernel, strides, padding):
  """Task-batched conv2d as one ``tf.nn.conv2d`` per task.

  Unrolled over a static task axis (TF may run the T convolutions in
  parallel); ``tf.map_fn`` when T is unknown.

  Example:
    >>> conv2d_map(tf.ones((2, 3, 7, 7, 1)), tf.ones((2, 3, 3, 1, 4)),
    ...            (1, 1), "same").shape
    TensorShape([2, 3, 7, 7, 4])
  """
  def one(args):
    xt, kt = args
    return tf.nn.conv2d(xt, kt, strides=list(strides), padding=padding.upper())
  if x.shape[0] is not None:
    return tf.stack([one(a) for a in zip(tf.unstack(x), tf.unstack(kernel))])
  return tf.map_fn(one, (x, kernel), fn_output_signature=x.dtype)


_CONV_KERNELS = {"patches": conv2d_patches, "grouped": conv2d_grouped,
                 "map": conv2d_map}


def resolve_conv_impl(conv_impl: str) -> str:
  """Maps ``'auto'`` to ``'grouped'`` (GPU visible) or ``'map'`` (CPU)."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
  if conv_impl == "auto":
    return "grouped" if tf.config.list_physical_devices("GPU") else "map"
  return conv_impl


# ---------------------------------------------------------------- layer ops
class _Op:
  """One compiled layer: ``op(ctx, inputs) -> output`` (inputs: a list)."""

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, ctx: _Context, inputs: list):
    raise NotImplementedError


class _Identity(_Op):

  def __call__(self, ctx, inputs):
    return inputs[0]


class _Elementwise(_Op):
  """Activation-like layers without weights: the layer's own ``call``."""

  def __call__(self, ctx, inputs):
    return self.layer.call(inputs[0])


class _Dense(_Op):

  def __init__(self, layer, kernel_ref, bias_ref):
    super().__init__(layer)
    self.kernel_ref, self.bias_ref = kernel_ref, bias_ref

  def __call__(self, ctx, inputs):
    x = inputs[0]
    kernel, per_task = ctx.read(self.kernel_ref)
    y = batched_dense(x, kernel, per_task)
    if self.bias_ref is not None:
      bias, per_task = ctx.read(self.bias_ref)
      y = y + _per_task_vector(bias, per_task, y.shape.rank)
    if self.layer.activation is not None:
      y = self.layer.activation(y)
    return y


class _Conv2D(_Op):

  def __init__(self, layer, kernel_ref, bias_ref, impl):
    super().__init__(layer)
    self.kernel_ref, self.bias_ref = kernel_ref, bias_ref
    self.impl = impl
    self.strides = tuple(int(s) for s in layer.strides)
    self.padding = layer.padding

  def __call__(self, ctx, inputs):
    x = inputs[0]
    if x.shape.rank != 5 or None in x.shape[2:]:
      raise _unsupported(self.layer, f"needs inputs [T, N, H, W, C] with static "
                         f"H, W, C; got {x.shape}")
    kernel, per_task = ctx.read(self.kernel_ref)
    if per_task:
      y = _CONV_KERNELS[self.impl](x, kernel, self.strides, self.padding)
    else:
      merged, split = _merge_task_axis(x)
      y = split(tf.nn.conv2d(merged, kernel, strides=list(self.strides),
                             padding=self.padding.upper()))
    if self.bias_ref is not None:
      bias, per_task = ctx.read(self.bias_ref)
      y = y + _per_task_vector(bias, per_task, 5)
    if self.layer.activation is not None:
      y = self.layer.activation(y)
    return y


def _exact_moments(x, axes):
  mean = tf.reduce_mean(x, axis=axes, keepdims=True)
  variance = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
  return mean, variance


def _normalize(x, mean, variance, gamma, beta, epsilon):
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

  The numbers of ``_normalize(x, *_exact_moments(x, axes), gamma, beta,
  epsilon)``, with the textbook backward pass written out,
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
  def normalize(*args):
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
  return normalize(*args)


class _BatchNorm(_Op):

  def __init__(self, layer, refs):
    super().__init__(layer)
    self.gamma_ref, self.beta_ref, self.mean_ref, self.var_ref = refs

  def update_moving(self, ctx, mean, variance):
    """Moves the moving statistics towards ``[T, C]`` batch statistics."""
    momentum = self.layer.momentum
    for ref, stat in ((self.mean_ref, mean), (self.var_ref, variance)):
      moving, _ = ctx.read(ref)
      ctx.write(ref, moving * momentum + stat * (1.0 - momentum))

  def _vector(self, ctx, ref, rank):
    if ref is None:
      return None
    value, per_task = ctx.read(ref)
    return _per_task_vector(value, per_task, rank)

  def __call__(self, ctx, inputs):
    x = inputs[0]
    rank = x.shape.rank
    layer = self.layer
    gamma = self._vector(ctx, self.gamma_ref, rank)
    beta = self._vector(ctx, self.beta_ref, rank)
    if ctx.training and layer.trainable:
      squeeze = list(range(1, rank - 1))
      y, mean, variance = normalize_with_moments(x, gamma, beta,
                                                 layer.epsilon, squeeze)
      self.update_moving(ctx, tf.squeeze(mean, squeeze),
                         tf.squeeze(variance, squeeze))
      return y
    mean = self._vector(ctx, self.mean_ref, rank)
    variance = self._vector(ctx, self.var_ref, rank)
    return _normalize(x, mean, variance, gamma, beta, layer.epsilon)


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

  def __init__(self, conv: "_Conv2D", bn: "_BatchNorm"):
    super().__init__(bn.layer)
    self.conv, self.bn = conv, bn

  @staticmethod
  def applies(conv_layer, bn_layer) -> bool:
    """Is ``conv_layer -> bn_layer`` worth folding (and foldable)?"""
    kh, kw = conv_layer.kernel_size
    fan_in = kh * kw * int(conv_layer.kernel.shape[2])
    linear = conv_layer.activation in (None, keras.activations.linear)
    return (linear and bn_layer.axis in (-1, 3) and bn_layer.trainable
            and fan_in <= conv_layer.filters)

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
    gamma = bn._vector(ctx, bn.gamma_ref, 3)  # pylint: disable=protected-access
    beta = bn._vector(ctx, bn.beta_ref, 3)  # pylint: disable=protected-access
    scale = inv * gamma if gamma is not None else inv
    # (bias - mean) * scale: the bias cancels, but stays connected (its
    # gradient is zero, not None, as without the fold).
    shift = (bias - mean) * scale if bias is not None else -mean * scale
    if beta is not None:
      shift = shift + beta
    folded = w * scale                                           # [T, K, F]
    if conv.impl == "patches":
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
    mean, variance = _exact_moments(x, [rank - 1])
    return _normalize(x, mean, variance, vectors[0], vectors[1],
                      self.layer.epsilon)


class _Pool2D(_Op):

  def __call__(self, ctx, inputs):
    x = inputs[0]
    if x.shape.rank != 5:
      raise _unsupported(self.layer, f"needs inputs [T, N, H, W, C], got "
                         f"{x.shape}")
    merged, split = _merge_task_axis(x)
    pool = (tf.nn.max_pool2d
            if isinstance(self.layer, keras.layers.MaxPooling2D)
            else tf.nn.avg_pool2d)
    return split(pool(merged, ksize=list(self.layer.pool_size),
                      strides=list(self.layer.strides),
                      padding=self.layer.padding.upper()))


class _Flatten(_Op):

  def __call__(self, ctx, inputs):
    x = inputs[0]
    features = x.shape[2:]
    size = -1 if None in features else int(math.prod(features))
    return tf.reshape(x, _dims(x)[:2] + [size])


class _Add(_Op):

  def __call__(self, ctx, inputs):
    y = inputs[0]
    for x in inputs[1:]:
      y = y + x
    return y


class _Concatenate(_Op):

  def __call__(self, ctx, inputs):
    axis = self.layer.axis
    return tf.concat(inputs, axis=axis if axis < 0 else axis + 1)


class _Program(_Op):
  """A nested (or the top-level) model as a sequence of compiled steps.

  ``steps`` holds ``(op, input_ids, output_id)``; tensor ids index a dict of
  values that starts with the model's input.
  """

  def __init__(self, layer, input_id, steps, output_id):
    super().__init__(layer)
    self.input_id, self.steps, self.output_id = input_id, steps, output_id

  def __call__(self, ctx, inputs):
    values = {self.input_id: inputs[0]}
    for op, input_ids, output_id in self.steps:
      values[output_id] = op(ctx, [values[i] for i in input_ids])
    return values[self.output_id]


# ---------------------------------------------------------------- compiler
_ELEMENTWISE = (keras.layers.Activation, keras.layers.ReLU,
                keras.layers.LeakyReLU, keras.layers.ELU)


class _Compiler:
  """Maps a Keras model's layers to :class:`_Op` objects."""

  def __init__(self, model, conv_impl, fold=True):
    self.conv_impl = conv_impl
    self.fold = fold
    self.refs = {}
    for i, v in enumerate(model.trainable_variables):
      self.refs[id(v)] = ("p", i)
    for i, v in enumerate(model.non_trainable_variables):
      self.refs[id(v)] = ("s", i)

  def ref(self, layer, variable):
    if variable is None:
      return None
    try:
      return self.refs[id(variable)]
    except KeyError:
      raise _unsupported(layer, f"its variable {variable.path!r} is not among "
                         "the model's variables") from None

  def check_common(self, layer):
    policy = layer.dtype_policy
    if policy.compute_dtype != policy.variable_dtype:
      raise _unsupported(layer, f"mixed precision policy {policy.name!r} "
                         "(compute and variable dtypes differ)")
    if getattr(layer, "quantization_mode", None):
      raise _unsupported(layer, f"quantized ({layer.quantization_mode})")
    if getattr(layer, "lora_enabled", False):
      raise _unsupported(layer, "LoRA is enabled")
    if getattr(layer, "data_format", "channels_last") != "channels_last":
      raise _unsupported(layer, f"data_format={layer.data_format!r}; only "
                         "'channels_last' is supported")

  def compile_layer(self, layer) -> _Op:
    kind = type(layer)
    if isinstance(layer, keras.Model):
      return self.compile_model(layer)
    self.check_common(layer)
    if kind is keras.layers.InputLayer:
      return _Identity(layer)
    if kind is keras.layers.Dense:
      return _Dense(layer, self.ref(layer, layer.kernel),
                    self.ref(layer, layer.bias))
    if kind is keras.layers.Conv2D:
      if tuple(layer.dilation_rate) != (1, 1):
        raise _unsupported(layer, f"dilation_rate={layer.dilation_rate}; only "
                           "(1, 1) is supported")
      if layer.groups != 1:
        raise _unsupported(layer, f"groups={layer.groups}; only 1 is supported")
      if layer.padding not in ("same", "valid"):
        raise _unsupported(layer, f"padding={layer.padding!r}")
      return _Conv2D(layer, self.ref(layer, layer.kernel),
                     self.ref(layer, layer.bias), self.conv_impl)
    if kind is keras.layers.BatchNormalization:
      rank = len(layer._reduction_axes) + 1  # pylint: disable=protected-access
      if layer.axis not in (-1, rank - 1):
        raise _unsupported(layer, f"axis={layer.axis}; only the last (channel)"
                           " axis is supported")
      if layer.renorm:
        raise _unsupported(layer, "renorm=True")
      if layer.synchronized:
        raise _unsupported(layer, "synchronized=True")
      return _BatchNorm(layer, [self.ref(layer, v) for v in (
          layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)])
    if kind is keras.layers.LayerNormalization:
      axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
      last = len(layer.input.shape) - 1 if _has_input(layer) else None
      if list(axis) not in ([-1], [last]):
        raise _unsupported(layer, f"axis={layer.axis}; only the last axis is "
                           "supported")
      if layer.rms_scaling:
        raise _unsupported(layer, "rms_scaling=True")
      return _LayerNorm(layer, self.ref(layer, layer.gamma),
                        self.ref(layer, layer.beta))
    if kind in (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D):
      if layer.padding not in ("same", "valid"):
        raise _unsupported(layer, f"padding={layer.padding!r}")
      return _Pool2D(layer)
    if kind is keras.layers.Flatten:
      return _Flatten(layer)
    if kind in _ELEMENTWISE:
      return _Elementwise(layer)
    if kind is keras.layers.Softmax:
      if layer.axis != -1:
        raise _unsupported(layer, f"axis={layer.axis}; only -1 is supported")
      return _Elementwise(layer)
    if kind is keras.layers.Dropout:
      # Raised here, not at call time, so that callers can fall back before
      # tracing (MAML always runs in training mode).
      if layer.rate > 0:
        raise _unsupported(layer, f"dropout with rate {layer.rate} (random "
                           "per-task masks are not supported; only rate 0)")
      return _Identity(layer)
    if kind is keras.layers.Add:
      return _Add(layer)
    if kind is keras.layers.Concatenate:
      if layer.axis == 0:
        raise _unsupported(layer, "concatenation along the batch axis")
      return _Concatenate(layer)
    raise _unsupported(layer, "this layer type is not supported (supported: "
                       "InputLayer, Dense, Conv2D, BatchNormalization, "
                       "LayerNormalization, MaxPooling2D, AveragePooling2D, "
                       "Flatten, Activation, ReLU, LeakyReLU, ELU, Softmax, "
                       "Dropout, Add, Concatenate and nested Sequential/"
                       "functional models)")

  def compile_model(self, model) -> _Program:
    if isinstance(model, keras.Sequential):
      steps, layers, i = [], model.layers, 0
      while i < len(layers):
        op = self.compile_layer(layers[i])
        if (self.fold and isinstance(op, _Conv2D) and i + 1 < len(layers)
            and type(layers[i + 1]) is keras.layers.BatchNormalization  # pylint: disable=unidiomatic-typecheck
            and _ConvBatchNorm.applies(layers[i], layers[i + 1])):
          steps.append((_ConvBatchNorm(op, self.compile_layer(layers[i + 1])),
                        [i], i + 2))
          i += 2
          continue
        steps.append((op, [i], i + 1))
        i += 1
      return _Program(model, 0, steps, len(layers))
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if nodes_by_depth is None or not hasattr(model, "outputs"):
      raise Unsupported(
          f"maml_tf.fast_weights cannot batch model {model.name!r} "
          f"({type(model).__name__}): subclassed models have no layer graph; "
          "use keras.Sequential or the functional API")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
      raise Unsupported(
          f"maml_tf.fast_weights cannot batch model {model.name!r}: it has "
          f"{len(model.inputs)} inputs and {len(model.outputs)} outputs; only "
          "single-input single-output models are supported")
    steps = []
    for depth in sorted(nodes_by_depth, reverse=True):
      for node in nodes_by_depth[depth]:
        op = node.operation
        if op is None or node.is_input:
          continue
        kwargs = {k: v for k, v in node.arguments.kwargs.items()
                  if v is not None}
        if kwargs:
          raise _unsupported(op, f"called with keyword arguments "
                             f"{sorted(kwargs)} (masks, training flags)")
        if len(node.outputs) != 1:
          raise _unsupported(op, "layers with several outputs")
        steps.append((self.compile_layer(op),
                      [id(t) for t in node.input_tensors],
                      id(node.outputs[0])))
    return _Program(model, id(model.inputs[0]), steps, id(model.outputs[0]))


def _has_input(layer) -> bool:
  try:
    return layer.input is not None
  except (AttributeError, ValueError):
    return False


# ------------------------------------------------------------------ public
class BatchedModel:
  """A Keras model compiled to task-batched kernels (pure, stateless).

  Create with :func:`compile_batched`. Calling it never reads or writes the
  model's variables.

  Arguments (of ``__call__``):
    params: tensors aligned with ``model.trainable_variables``, each
      ``[T, *var.shape]`` (one value per task) or ``var.shape`` (shared by
      all tasks).
    state: tensors aligned with ``model.non_trainable_variables``, each
      ``[T, *var.shape]`` or ``var.shape``.
    x: inputs ``[T, N, *input_shape]``.
    training: ``True`` normalises BatchNorm with each task's batch statistics
      and updates its moving statistics; ``False`` uses the moving statistics.

  Returns:
    ``(y, new_state)``: ``y`` is ``[T, N, *output_shape]``; ``new_state`` is
    a list aligned with ``state`` (updated BatchNorm moving statistics are
    ``[T, ...]``; untouched entries are passed through as given).

  Example:
    >>> batched = compile_batched(model)
    >>> y, new_state = batched(params, state, x, training=True)
  """

  def __init__(self, model: keras.Model, program: _Program, conv_impl: str):
    self.model = model
    self.conv_impl = conv_impl
    self._program = program
    self._shapes = {
        "p": [tuple(v.shape) for v in model.trainable_variables],
        "s": [tuple(v.shape) for v in model.non_trainable_variables]}
    self._dtype = model.trainable_variables[0].dtype if (
        model.trainable_variables) else keras.config.floatx()

  def __call__(self, params: Sequence[tf.Tensor], state: Sequence[tf.Tensor],
               x, training: bool = True) -> Tuple[tf.Tensor, List[tf.Tensor]]:
    if len(params) != len(self._shapes["p"]):
      raise ValueError(f"expected {len(self._shapes['p'])} params (one per "
                       f"trainable variable), got {len(params)}")
    if len(state) != len(self._shapes["s"]):
      raise ValueError(f"expected {len(self._shapes['s'])} state tensors (one "
                       f"per non-trainable variable), got {len(state)}")
    x = tf.convert_to_tensor(x)
    if x.dtype.is_floating and x.dtype != self._dtype:
      x = tf.cast(x, self._dtype)
    if x.shape.rank is None or x.shape.rank < 2:
      raise ValueError(f"x must be [T, N, *input_shape], got shape {x.shape}")
    params = [tf.convert_to_tensor(p) for p in params]
    state = [tf.convert_to_tensor(s) for s in state]
    ctx = _Context(params, state, self._shapes, bool(training))
    y = self._program(ctx, [x])
    return y, ctx.values["s"]


def compile_batched(model: keras.Model, conv_impl: str = "auto",
                    fold_conv_batchnorm: bool = True) -> BatchedModel:
  """Compiles ``model`` into a :class:`BatchedModel` running all tasks at once.

  Arguments:
    model: a built ``keras.Sequential`` or functional ``keras.Model`` (nested
      Sequential/functional models are fine) made of supported layers:
      InputLayer, Dense, Conv2D (channels_last, dilation 1, groups 1, 'same'
      or 'valid'), BatchNormalization and LayerNormalization (last axis),
      MaxPooling2D, AveragePooling2D, Flatten, Activation, ReLU, LeakyReLU,
      ELU, Softmax (last axis), Dropout (rate 0 only), Add and
      Concatenate.
    conv_impl: ``'auto'``, ``'patches'``, ``'grouped'`` or ``'map'`` (see the
      module docstring).
    fold_conv_batchnorm: in training mode, fold a Conv2D with few inputs
      per output pixel (at most its filter count, e.g. a first layer) and
      the BatchNormalization after it into one convolution
      (:class:`_ConvBatchNorm`; same numbers, fewer full-size passes).

  Returns:
    a :class:`BatchedModel`; ``batched(params, state, x, training)`` equals,
    task by task, ``functional_call(model, params[t], state[t], x[t],
    training)`` (outputs and new state), derivatives of every order included.

  Raises:
    Unsupported: naming the first layer (or configuration) it cannot batch.

  Example:
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> batched = compile_batched(model)
    >>> y, _ = batched([tf.ones((3, 4, 2)), tf.zeros((3, 2))], [],
    ...                tf.ones((3, 5, 4)))
    >>> y.shape
    TensorShape([3, 5, 2])
  """
  if not isinstance(model, keras.Model):
    raise TypeError(f"compile_batched needs a keras.Model, got "
                    f"{type(model).__name__}")
  if not model.built:
    raise ValueError(f"model {model.name!r} is not built; give it an "
                     "keras.Input or call it once")
  impl = resolve_conv_impl(conv_impl)
  program = _Compiler(model, impl, fold_conv_batchnorm).compile_model(model)
  return BatchedModel(model, program, impl)
