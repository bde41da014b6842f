"""Task-batched Dense and Conv2D kernels: every tensor has a task axis first.

Each kernel takes inputs ``[T, N, ...]`` and per-task weights ``[T, ...]``
(:func:`batched_dense` also shared ones) and equals, task by task, the plain
TF op. Conv2D has several implementations (``conv_impl``, see
:mod:`maml_tf.core.fast_weights`): :func:`conv2d_map`,
:func:`conv2d_patches`, :func:`conv2d_grouped` and, for reference and tests,
:func:`conv2d_slices`; :func:`resolve_conv_impl` maps ``'auto'`` to one.
"""

import os
import platform
from typing import Optional, Tuple

import tensorflow as tf

from maml_tf.core import keras_compat

CONV_IMPLS = ("auto", "patches", "grouped", "map")


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


def conv2d(x, kernel, strides, padding: str, dilations=(1, 1)):
  """``tf.nn.conv2d`` on ``[B, H, W, C]``; with a dilation,
  ``tf.nn.convolution`` (space-to-batch), whose derivatives of every order
  exist on CPU (``Conv2DBackpropInput`` has no dilated CPU kernel), as
  Keras convolves."""
  if tuple(dilations) == (1, 1):
    return tf.nn.conv2d(x, kernel, strides=list(strides),
                        padding=padding.upper())
  return tf.nn.convolution(x, kernel, strides=list(strides),
                           padding=padding.upper(), dilations=list(dilations))


# Patches at most this deep come from a convolution with a one-hot filter.
ONE_HOT_PATCH_DEPTH = 32


def _one_hot_filter(kh: int, kw: int, c: int, dtype):
  """``[kh, kw, C, kh*kw*C]``: output channel ``(i*kw + j)*C + ch`` copies
  input ``(i, j, ch)``: a convolution with it extracts the patches, in
  ``extract_patches``' depth order."""
  k = kh * kw * c
  return tf.reshape(tf.eye(k, dtype=dtype), [kh, kw, c, k])


def _flat_patches(x, kh: int, kw: int, strides, padding, dilations=(1, 1)):
  """``([T, N*H'*W', kh*kw*C] patches, H', W')`` of ``x [T, N, H, W, C]``.

  ``tf.image.extract_patches`` (TF's own 'SAME'/'VALID' geometry; depth
  ordered as ``(row, col, channel)``, the order of a reshaped
  ``[kh, kw, C, F]`` kernel); a strided subsample for 1x1 kernels; for
  patches at most :data:`ONE_HOT_PATCH_DEPTH` deep a convolution with a
  one-hot filter, which gives the same values (each output is one input
  times 1 plus zeros) and whose gradients are convolutions, not the sparse
  scatter of ``extract_patches``' gradient. ``dilations``: the kernel's
  ``(dh, dw)`` (patches of dilated taps).
  """
  _, _, h, w, c = x.shape
  sh, sw = strides
  dh, dw = dilations
  merged = tf.reshape(x, [-1, h, w, c])
  if kh == kw == 1:   # no padding either way; a strided subsample
    patches = merged[:, ::sh, ::sw, :]
  elif kh * kw * c <= ONE_HOT_PATCH_DEPTH:
    patches = conv2d(merged, _one_hot_filter(kh, kw, c, merged.dtype),
                     (sh, sw), padding, (dh, dw))
  else:
    patches = tf.image.extract_patches(
        merged, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
        rates=[1, dh, dw, 1], padding=padding.upper())
  flat = tf.reshape(patches, [_static_or_dynamic(x, 0), -1, kh * kw * c])
  return flat, patches.shape[1], patches.shape[2]


def conv2d_patches(x, kernel, strides, padding, dilations=(1, 1)):
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
    dilations: ``(dh, dw)``, the kernel's dilation.

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
  flat, oh, ow = _flat_patches(x, kh, kw, strides, padding, dilations)
  out = tf.matmul(flat, tf.reshape(kernel, [t, flat.shape[-1], -1]))
  return tf.reshape(out, [t, n, oh, ow, -1])


def conv2d_slices(x, kernel, strides, padding):
  """As :func:`conv2d_patches`, with patches from kh*kw strided slices.

  Pads as TF's 'SAME' does (more at the bottom/right when the total is odd),
  takes the kh*kw shifted strided slices and concatenates them along
  channels. Exact, but TF's CPU ``StridedSlice``/``StridedSliceGrad`` kernels
  are slow on 5-D tensors (BENCHMARKS.md), so it is kept for reference and
  tests only.

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


def conv2d_grouped(x, kernel, strides, padding, dilations=(1, 1)):
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
    return conv2d_map(x, kernel, strides, padding, dilations)
  folded = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]), [-1, h, w, t * c])
  filt = tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]), [kh, kw, c, t * f])
  y = conv2d(folded, filt, strides, padding, dilations)
  oh, ow = y.shape[1], y.shape[2]
  y = tf.reshape(y, [-1, oh, ow, t, f])
  return tf.transpose(y, [3, 0, 1, 2, 4])


def conv2d_map(x, kernel, strides, padding, dilations=(1, 1)):
  """Task-batched conv2d as one ``tf.nn.conv2d`` per task.

  Unrolled over a static task axis (TF may run the T convolutions in
  parallel); ``tf.map_fn`` when T is unknown.

  Example:
    >>> conv2d_map(tf.ones((2, 3, 7, 7, 1)), tf.ones((2, 3, 3, 1, 4)),
    ...            (1, 1), "same").shape
    TensorShape([2, 3, 7, 7, 4])
  """
  return map_tasks(lambda xt, kt: conv2d(xt, kt, strides, padding, dilations),
                   x, kernel)


def map_tasks(fn, x, kernel):
  """``fn(x[t], kernel[t])`` for every task, stacked: unrolled over a
  static task axis of ``x`` (the kernel's may be unknown), ``tf.map_fn``
  when it is unknown."""
  if x.shape[0] is not None:
    return tf.stack([fn(a, k) for a, k in zip(
        tf.unstack(x), tf.unstack(kernel, num=x.shape[0]))])
  return tf.map_fn(lambda a: fn(*a), (x, kernel), fn_output_signature=x.dtype)


_CONV_KERNELS = {"patches": conv2d_patches, "grouped": conv2d_grouped,
                 "map": conv2d_map}


def grouped_gradient_missing(dtype: str, gpu=None) -> Optional[str]:
  """Why TensorFlow cannot differentiate a grouped convolution computed in
  ``dtype`` on this machine, or ``None`` where it can.

  A GPU has the gradient. Without one, only oneDNN's CPU kernels have it,
  in float32 and bfloat16, and only where TensorFlow turned oneDNN on
  (:func:`maml_tf.core.keras_compat.onednn_enabled`: by default not on
  plain AVX2 CPUs; ``TF_ENABLE_ONEDNN_OPTS=1`` before TensorFlow starts
  turns it on). ``gpu``: default whether one is visible.
  """
  if gpu is None:
    gpu = bool(tf.config.list_physical_devices("GPU"))
  if gpu:
    return None
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return (f"TensorFlow's CPU kernels differentiate grouped convolutions "
            f"through oneDNN on x86-64 only, not on {platform.machine()}")
  onednn = keras_compat.onednn_enabled()
  if onednn is None:      # unknown: what TensorFlow decides where it is asked
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower() in (
        "1", "true")
  if not onednn:
    return ("TensorFlow's CPU kernels differentiate grouped convolutions "
            "through oneDNN only, which is off in this process "
            "(TF_ENABLE_ONEDNN_OPTS=1 set before TensorFlow starts turns it "
            "on)")
  if str(dtype) not in ("float32", "bfloat16"):
    return (f"TensorFlow's CPU kernels differentiate grouped convolutions "
            f"in float32 and bfloat16 only, not in {dtype}")
  return None


def resolve_conv_impl(conv_impl: str, gpu=None) -> str:
  """Maps ``'auto'`` to ``'grouped'`` (GPU) or ``'map'`` (CPU).

  ``gpu``: whether the step runs with a GPU; default whether one is
  visible. Other values of :data:`CONV_IMPLS` are returned as given;
  anything else raises ``ValueError``. (:mod:`maml_tf.core.plan` refines
  ``'auto'`` on CPU by the size of one task.)
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
  if conv_impl == "auto":
    if gpu is None:
      gpu = bool(tf.config.list_physical_devices("GPU"))
    return "grouped" if gpu else "map"
  return conv_impl

