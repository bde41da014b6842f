"""Compiles a Keras model to task-batched ops: :func:`compile_batched`.

Every layer becomes one ``_Op`` over all tasks (the kernels of
:mod:`~maml_tf.core.fast_weights.kernels` and
:mod:`~maml_tf.core.fast_weights.normalization`); a model becomes a
``_Program`` of them, wrapped in a :class:`BatchedModel`. Layers without
per-task weights (pooling, Flatten, activations, Add, Concatenate, the
weightless per-example layers) merge the task and example axes and run TF's
own ops once.
"""

import inspect
import math
from typing import List, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from maml_tf.core import functional
from maml_tf.core import keras_compat
from maml_tf.core.fast_weights.base import (
    Unsupported, _Context, _Op, _unsupported)
from maml_tf.core.fast_weights.kernels import (
    _CONV_KERNELS, _dims, _merge_task_axis, _per_task_vector, batched_dense,
    conv2d, map_tasks, resolve_conv_impl)
from maml_tf.core.fast_weights.normalization import (
    _BatchNorm, _ConvBatchNorm, _GroupNorm, _LayerNorm)
from maml_tf.core.fast_weights.recurrent import (
    _Bidirectional, _Recurrent, _Stacked, _TimeDistributed, check_recurrent,
    recurrent_cells)


# ---------------------------------------------------------------- layer ops
class _Identity(_Op):

  def __call__(self, ctx, inputs):
    return inputs[0]


class _Elementwise(_Op):
  """Activation-like layers without weights: the layer's own ``call``."""

  def __call__(self, ctx, inputs):
    return self.layer.call(inputs[0])


def _bias_and_activation(ctx, op, y):
  """``y`` plus ``op``'s bias (per task or shared; ``op.bias_ref``), through
  its layer's activation: what Dense and the convolutions end with."""
  if op.bias_ref is not None:
    bias, per_task = ctx.read(op.bias_ref)
    y = y + _per_task_vector(bias, per_task, y.shape.rank)
  if op.layer.activation is not None:
    y = op.layer.activation(y)
  return y


class _Dense(_Op):

  promotes_integers = True

  def __init__(self, layer, kernel_ref, bias_ref):
    super().__init__(layer)
    self.kernel_ref, self.bias_ref = kernel_ref, bias_ref

  def __call__(self, ctx, inputs):
    kernel, per_task = ctx.read(self.kernel_ref)
    return _bias_and_activation(ctx, self,
                                batched_dense(inputs[0], kernel, per_task))


class _EinsumDense(_Op):
  """EinsumDense with per-task kernels: the layer's equation with a task
  axis added to the inputs, the kernel and the output."""

  promotes_integers = True

  def __init__(self, layer, kernel_ref, bias_ref):
    super().__init__(layer)
    self.kernel_ref, self.bias_ref = kernel_ref, bias_ref
    equation = layer.equation.replace(" ", "")
    inputs, rest = equation.split(",")
    kernel, output = rest.split("->")
    task = next(c for c in "tzyxwvutsrqponmlkjihgfedcba"
                if c not in equation)
    self.equation = equation
    self.per_task_equation = f"{task}{inputs},{task}{kernel}->{task}{output}"

  def __call__(self, ctx, inputs):
    x = inputs[0]
    kernel, per_task = ctx.read(self.kernel_ref)
    if per_task:
      y = tf.einsum(self.per_task_equation, x, kernel)
    else:
      merged, split = _merge_task_axis(x)
      y = split(tf.einsum(self.equation, merged, kernel))
    if self.bias_ref is not None:
      bias, per_task = ctx.read(self.bias_ref)
      if per_task:       # [T, *b] lined up with y's trailing axes
        ones = [1] * (y.shape.rank - bias.shape.rank)
        bias = tf.reshape(bias, _dims(bias)[:1] + ones + _dims(bias)[1:])
      y = y + bias
    if self.layer.activation is not None:
      y = self.layer.activation(y)
    return y


class _MultiHeadAttention(_Op):
  """MultiHeadAttention: its projections as per-task EinsumDense ops, the
  attention itself (no weights) on the task and example axes merged, as
  the layer computes it (:func:`maml_tf.core.keras_compat.attention`); an
  attention dropout draws each task's mask from that task's seed state.

  Inputs: query, value, key, then the masks named in ``masks`` (Keras
  masks of the inputs, an ``attention_mask``), combined as the layer
  combines them (:func:`maml_tf.core.keras_compat.attention_mask`)."""

  def __init__(self, layer, projections, seed_ref, causal: bool,
               masks=()):
    super().__init__(layer)
    self.projections, self.seed_ref, self.causal = (projections, seed_ref,
                                                    causal)
    self.masks = tuple(masks)

  def __call__(self, ctx, inputs):
    query, value, key = inputs[:3]
    mask = None
    if self.masks:
      given = {name: _merge_task_axis(m)[0]
               for name, m in zip(self.masks, inputs[3:])}
      mask = keras_compat.attention_mask(
          self.layer, _merge_task_axis(query)[0],
          _merge_task_axis(value)[0], given, self.causal)
    project = lambda name, x: self.projections[name](ctx, [x])
    q, k, v = (_merge_task_axis(project(n, x)) for n, x in
               (("query", query), ("key", key), ("value", value)))
    rate = self.layer.dropout

    def dropout_mask(scores):
      seed = _drawn_seeds(ctx, self.seed_ref, tf.shape(query)[0])
      shape = tf.concat([tf.shape(query)[1:2], tf.shape(scores)[1:]], 0)
      masks = keras_compat.dropout_masks(seed, shape, rate, scores.dtype)
      return _merge_task_axis(masks)[0]

    out = keras_compat.attention(self.layer, q[0], k[0], v[0], self.causal,
                                 ctx.training, dropout_mask, mask)
    out = q[1](out)
    if self.projections.get("gate") is not None:
      out = out * project("gate", query)
    return project("output", out)


def _static_inputs(layer, x, axes: str):
  """``x``, checked to be ``[T, N, *axes]`` with the named axes static."""
  if x.shape.rank != 2 + len(axes.split(",")) or None in x.shape[2:]:
    raise _unsupported(layer, f"needs inputs [T, N, {axes}] with static "
                       f"{axes}; got {x.shape}")
  return x


class _Conv2D(_Op):

  def __init__(self, layer, kernel_ref, bias_ref, impl):
    super().__init__(layer)
    self.kernel_ref, self.bias_ref = kernel_ref, bias_ref
    self.impl = impl
    self.strides = tuple(int(s) for s in layer.strides)
    self.dilations = tuple(int(d) for d in layer.dilation_rate)
    self.padding = layer.padding
    self.groups = int(getattr(layer, "groups", 1))

  def __call__(self, ctx, inputs):
    x = _static_inputs(self.layer, inputs[0], "H, W, C")
    kernel, per_task = ctx.read(self.kernel_ref)
    return self.convolve(ctx, x, kernel, per_task)

  def convolve(self, ctx, x, kernel, per_task: bool):
    """The layer on ``x`` with ``kernel`` (``[T, kh, kw, C, F]`` per task or
    ``[kh, kw, C, F]`` shared), bias and activation included."""
    return _bias_and_activation(ctx, self,
                                self.apply_kernel(x, kernel, per_task))

  def apply_kernel(self, x, kernel, per_task: bool):
    """The convolution alone, ``[T, N, H, W, C] -> [T, N, H', W', F]``;
    with ``groups``, one convolution per group of channels (each group's
    inputs with its slice of the filters), concatenated as Keras orders
    them."""
    if self.groups > 1:
      inputs = tf.split(x, self.groups, axis=-1)
      kernels = tf.split(kernel, self.groups, axis=-1)
      return tf.concat([self.apply_kernel_once(a, k, per_task)
                        for a, k in zip(inputs, kernels)], axis=-1)
    return self.apply_kernel_once(x, kernel, per_task)

  def apply_kernel_once(self, x, kernel, per_task: bool):
    """One group's convolution (the layer's with ``groups=1``)."""
    if per_task:
      return _CONV_KERNELS[self.impl](x, kernel, self.strides, self.padding,
                                      self.dilations)
    merged, split = _merge_task_axis(x)
    return split(conv2d(merged, kernel, self.strides, self.padding,
                        self.dilations))


class _Conv1D(_Conv2D):
  """Conv1D as a Conv2D of height 1: ``[T, N, L, C]`` inputs get a unit
  axis, the ``[k, C, F]`` kernel a unit row (the same numbers, derivatives
  of every order included, on the Conv2D kernels); 'causal' padding pads
  the left by ``(k - 1) * dilation`` and convolves 'valid', as Keras."""

  def __init__(self, layer, kernel_ref, bias_ref, impl):
    super().__init__(layer, kernel_ref, bias_ref, impl)
    self.strides = (1, int(layer.strides[0]))
    self.dilations = (1, int(layer.dilation_rate[0]))
    if layer.padding == "causal":
      self.padding = "valid"

  def __call__(self, ctx, inputs):
    x = _static_inputs(self.layer, inputs[0], "L, C")
    if self.layer.padding == "causal":   # left-padded, then 'valid'
      left = (int(self.layer.kernel_size[0]) - 1) * self.dilations[1]
      x = tf.pad(x, [[0, 0], [0, 0], [left, 0], [0, 0]])
    kernel, per_task = ctx.read(self.kernel_ref)
    y = self.convolve(ctx, tf.expand_dims(x, 2),
                      tf.expand_dims(kernel, 1 if per_task else 0), per_task)
    return tf.squeeze(y, 2)


class _DepthwiseConv2D(_Conv2D):
  """DepthwiseConv2D with per-task kernels as one depthwise convolution:
  the tasks' channels side by side (``[N, H, W, T*C]``, kernel
  ``[kh, kw, T*C, M]``); each channel is convolved on its own, so every task
  meets only its own kernel."""

  def __init__(self, layer, kernel_ref, bias_ref):
    super().__init__(layer, kernel_ref, bias_ref, impl=None)
    self.strides = [1] + [int(v) for v in layer.strides] + [1]
    self.rates = [int(d) for d in layer.dilation_rate]

  def apply_kernel(self, x, kernel, per_task: bool):
    padding = self.padding.upper()
    if not per_task:
      merged, split = _merge_task_axis(x)
      return split(tf.nn.depthwise_conv2d(merged, kernel, self.strides,
                                          padding, dilations=self.rates))
    kh, kw, c, m = (int(v) for v in kernel.shape[1:])
    n, (h, w) = tf.shape(x)[1], x.shape[2:4]
    side_by_side = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]),
                              [n, h, w, -1])
    kernels = tf.reshape(tf.transpose(kernel, [1, 2, 0, 3, 4]),
                         [kh, kw, -1, m])
    y = tf.nn.depthwise_conv2d(side_by_side, kernels, self.strides, padding,
                               dilations=self.rates)
    y = tf.reshape(y, [n, y.shape[1], y.shape[2], -1, c * m])
    return tf.transpose(y, [3, 0, 1, 2, 4])


class _SeparableConv2D(_DepthwiseConv2D):
  """SeparableConv2D as Keras computes it: the depthwise convolution
  (strides and dilation included), then the 1x1 pointwise kernel as one
  batched matmul over pixels, then bias and activation."""

  def __init__(self, layer, kernel_ref, pointwise_ref, bias_ref):
    super().__init__(layer, kernel_ref, bias_ref)
    self.pointwise_ref = pointwise_ref

  def __call__(self, ctx, inputs):
    x = _static_inputs(self.layer, inputs[0], "H, W, C")
    kernel, per_task = ctx.read(self.kernel_ref)
    y = self.apply_kernel(x, kernel, per_task)         # [T, N, H', W', C*M]
    pointwise, per_task = ctx.read(self.pointwise_ref)  # [(T,) 1, 1, CM, F]
    lead = _dims(pointwise)[:1] if per_task else []
    pointwise = tf.reshape(pointwise, lead + _dims(pointwise)[-2:])
    return _bias_and_activation(ctx, self,
                                batched_dense(y, pointwise, per_task))


class _SeparableConv1D(_SeparableConv2D):
  """SeparableConv1D as a SeparableConv2D of height 1: ``[T, N, L, C]``
  inputs get a unit axis, the ``[k, C, M]`` depthwise kernel a unit row
  (the same numbers, derivatives of every order included)."""

  def __init__(self, layer, kernel_ref, pointwise_ref, bias_ref):
    super().__init__(layer, kernel_ref, pointwise_ref, bias_ref)
    stride = int(layer.strides[0])
    self.strides = [1, stride, stride, 1]     # as Keras: equal strides
    self.rates = [1, int(layer.dilation_rate[0])]

  def __call__(self, ctx, inputs):
    x = _static_inputs(self.layer, inputs[0], "L, C")
    kernel, per_task = ctx.read(self.kernel_ref)
    y = self.apply_kernel(tf.expand_dims(x, 2),
                          tf.expand_dims(kernel, 1 if per_task else 0),
                          per_task)                  # [T, N, 1, L', C*M]
    y = tf.squeeze(y, 2)
    pointwise, per_task = ctx.read(self.pointwise_ref)  # [(T,) 1, CM, F]
    lead = _dims(pointwise)[:1] if per_task else []
    pointwise = tf.reshape(pointwise, lead + _dims(pointwise)[-2:])
    return _bias_and_activation(ctx, self,
                                batched_dense(y, pointwise, per_task))


class _PerTaskConv(_Op):
  """Conv3D, Conv1DTranspose, Conv2DTranspose, Conv3DTranspose: Keras' own
  ``ops.conv`` / ``ops.conv_transpose`` once per task
  (:func:`~maml_tf.core.fast_weights.kernels.map_tasks`), once on the
  merged axes for a shared kernel; then bias and activation."""

  def __init__(self, layer, kernel_ref, bias_ref):
    super().__init__(layer)
    self.kernel_ref, self.bias_ref = kernel_ref, bias_ref

  def __call__(self, ctx, inputs):
    x, layer = inputs[0], self.layer
    options = dict(strides=list(layer.strides), padding=layer.padding,
                   dilation_rate=layer.dilation_rate,
                   data_format=layer.data_format)
    if isinstance(layer, keras.layers.Conv3D):
      conv = lambda xt, kt: keras.ops.conv(xt, kt, **options)
    else:
      conv = lambda xt, kt: keras.ops.conv_transpose(
          xt, kt, output_padding=layer.output_padding, **options)
    kernel, per_task = ctx.read(self.kernel_ref)
    if per_task:
      y = map_tasks(conv, x, kernel)
    else:
      merged, split = _merge_task_axis(x)
      y = split(conv(merged, kernel))
    return _bias_and_activation(ctx, self, y)


class _Embedding(_Op):
  """Embedding with per-task tables ``[T, V, D]``: one gather over the task
  axis (``batch_dims=1``); negative ids count from the end, as Keras'
  ``ops.take`` does."""

  def __init__(self, layer, table_ref):
    super().__init__(layer)
    self.table_ref = table_ref

  def __call__(self, ctx, inputs):
    ids = inputs[0]
    if ids.dtype not in (tf.int32, tf.int64):
      ids = tf.cast(ids, tf.int32)
    table, per_task = ctx.read(self.table_ref)
    rows = tf.cast(tf.shape(table)[1 if per_task else 0], ids.dtype)
    ids = tf.where(ids < 0, ids + rows, ids)
    if per_task:
      return tf.gather(table, ids, batch_dims=1)
    return tf.gather(table, ids)


class _ScoredAttention(_Op):
  """Attention (``score_mode`` "dot" or "concat") and AdditiveAttention
  without masks or dropout: the layer's scores (``_calculate_scores``)
  with each task's ``scale`` (and ``concat_score_weight``), a softmax over
  the values, their weighted sum. Inputs: query, value[, key]."""

  def __init__(self, layer, scale_ref, concat_ref):
    super().__init__(layer)
    self.scale_ref, self.concat_ref = scale_ref, concat_ref

  def _weight(self, ctx, ref, rank: int):
    """A weight read for ``rank``-D scores-shaped tensors (None: none)."""
    if ref is None:
      return None
    w, per_task = ctx.read(ref)
    if not per_task:
      return w
    trailing = w.shape.rank - 1         # () for scale, (d,) for Additive's
    return tf.reshape(w, _dims(w)[:1] + [1] * (rank - 1 - trailing)
                      + _dims(w)[1:])

  def __call__(self, ctx, inputs):
    query, value = inputs[0], inputs[1]
    key = inputs[2] if len(inputs) > 2 else value
    additive = isinstance(self.layer, keras.layers.AdditiveAttention)
    if additive or self.layer.score_mode == "concat":
      pairs = tf.expand_dims(query, -2) + tf.expand_dims(key, -3)
      scale = self._weight(ctx, self.scale_ref, 5)   # [T, N, Tq, Tv, d]
      if additive:
        terms = tf.tanh(pairs)
        scores = tf.reduce_sum(terms if scale is None else scale * terms, -1)
      else:
        scores = tf.reduce_sum(tf.tanh(
            pairs if scale is None else scale * pairs), -1)
        scores = self._weight(ctx, self.concat_ref, 4) * scores
    else:
      scores = tf.matmul(query, key, transpose_b=True)   # [T, N, Tq, Tv]
      scale = self._weight(ctx, self.scale_ref, 4)
      scores = scores if scale is None else scores * scale
    return tf.matmul(tf.nn.softmax(scores, axis=-1), value)


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


class _PerExample(_Op):
  """Weightless layers acting on each example alone: the layer's own
  ``call`` once, over the merged task and example axes; with ``masked``,
  the last input is the Keras mask its call takes."""

  def __init__(self, layer, masked: bool = False):
    super().__init__(layer)
    self.masked = masked

  def __call__(self, ctx, inputs):
    merged = [_merge_task_axis(x) for x in inputs]
    split = merged[0][1]
    merged = [m for m, _ in merged]
    kwargs = {"mask": merged.pop()} if self.masked else {}
    y = self.layer.call(merged[0] if len(merged) == 1 else merged, **kwargs)
    return split(y)


# Merge layers that read their inputs' masks at run time and change values
# by them; operations that may hand on their input tensor itself.
_MASK_READING_MERGES = (keras.layers.Maximum, keras.layers.Minimum,
                        keras.layers.Multiply)
_SAME_TENSOR_OPERATIONS = ("Cast", "ConvertToTensor")


def _uses_masks(graph) -> bool:
  """Does a functional ``graph`` (``None``: no graph) carry Keras masks
  (between its layers or on its output)?"""
  return graph is not None and (
      keras_compat.keras_mask(graph.outputs[0]) is not None or any(
          keras_compat.keras_mask(t) is not None
          for node in keras_compat.graph_nodes(graph) for t in node.input_tensors))


def _users_layer(layer) -> bool:
  """Is ``layer`` of a class defined outside Keras (a user's block, which
  is traced into its layers)?"""
  return not type(layer).__module__.startswith("keras.")


def _takes_mask(layer) -> bool:
  """Does ``layer.call`` take a ``mask`` (Keras then passes the mask its
  input carries)?"""
  try:
    return "mask" in inspect.signature(layer.call).parameters
  except (TypeError, ValueError):
    return True


class _Operation(_Op):
  """A Keras operation on KerasTensors in a functional graph (``x + y``,
  ``keras.ops.relu(x)``, ``x[:, 0]``) that acts on each example alone
  (:func:`~maml_tf.core.keras_compat.per_example_operation`): called once,
  with its recorded arguments, on the task and example axes merged."""

  def __init__(self, operation, arguments, input_shape=None):
    super().__init__(operation)
    self.arguments = arguments
    self.call = operation
    newshape = tuple(getattr(operation, "newshape", None) or ())
    if type(operation).__name__ == "Reshape" and None in newshape:
      # ``reshape(x, (shape(x)[0], ...))`` records the batch size as None:
      # each example takes the rest (a -1 in it resolved from the input's
      # static example shape: checked by per_example_operation).
      rest = list(newshape[1:])
      if -1 in rest:
        rest[rest.index(-1)] = int(np.prod(input_shape[1:]) // np.prod(
            [d for d in rest if d != -1]))
      shape = (-1, *rest)
      self.call = lambda x: keras.ops.reshape(x, shape)

  def __call__(self, ctx, inputs):
    tasks = _dims(inputs[0])[:1]
    values = iter([tf.reshape(x, [-1] + _dims(x)[2:]) for x in inputs])
    args, kwargs = self.arguments.convert(
        lambda v: next(values) if isinstance(v, keras.KerasTensor) else v)
    y = self.call(*args, **kwargs)
    # Each task's rows stay together: [T*M, ...] -> [T, M, ...], where M
    # may differ from the inputs' N (a reshape of the examples).
    return tf.reshape(y, tasks + [-1] + _dims(y)[1:])


def _drawn_seeds(ctx, seed_ref, num_tasks):
  """The ``[T, 2]`` per-task seeds of a random layer's state (a shared
  ``[2]`` seed tiled), left in ``ctx`` advanced by one draw, as the layer's
  ``SeedGenerator`` advances."""
  seed, per_task = ctx.read(seed_ref)
  if not per_task:
    seed = tf.tile(seed[None], [num_tasks, 1])
  ctx.write(seed_ref, seed + tf.constant([0, 1], seed.dtype))
  return seed


class _Random(_Op):
  """A random layer (Dropout, GaussianNoise, GaussianDropout, AlphaDropout)
  with its noise drawn per task from that task's seed state as the
  per-task path draws it (``draw(seeds, shape, dtype)``, :mod:`~maml_tf.core.keras_compat`), then
  ``combine(x, noise)``; the state then holds the seed advanced by one draw,
  as the layer's ``SeedGenerator`` would. Inference mode passes ``x``."""

  def __init__(self, layer, seed_ref, draw, combine):
    super().__init__(layer)
    self.seed_ref, self.draw, self.combine = seed_ref, draw, combine

  def __call__(self, ctx, inputs):
    x = inputs[0]
    if not ctx.training:
      return x
    seed = _drawn_seeds(ctx, self.seed_ref, tf.shape(x)[0])
    return self.combine(x, self.draw(seed, tf.shape(x)[1:], x.dtype))


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


def _cast_floats(x, dtype):
  """``x`` in ``dtype`` if it is floating (as Keras converts inputs)."""
  if x.dtype.is_floating and x.dtype != dtype:
    return tf.cast(x, dtype)
  return x


def _cast_integers(x, dtype):
  """``x`` in ``dtype`` if it is an integer tensor (as Keras' type
  promotion of integers with floats gives)."""
  if x.dtype.is_integer:
    return tf.cast(x, dtype)
  return x


class _Program(_Op):
  """A nested (or the top-level) model as a sequence of compiled steps.

  ``steps`` holds ``(op, input_ids, output_id)``; tensor ids index a dict of
  values that starts with the model's inputs (``input_ids``, in the order
  of ``model.inputs``).
  """

  def __init__(self, layer, input_ids, steps, output_id, input_dtypes=None):
    super().__init__(layer)
    self.input_ids, self.steps, self.output_id = input_ids, steps, output_id
    # The dtypes of the model's Inputs, which Keras casts floating inputs
    # to (None: a model traced from its call, which casts none).
    self.input_dtypes = input_dtypes

  def __call__(self, ctx, inputs):
    if len(inputs) != len(self.input_ids):
      raise ValueError(f"model {self.layer.name!r} takes "
                       f"{len(self.input_ids)} inputs, got {len(inputs)}")
    if self.input_dtypes is not None:
      inputs = [_cast_floats(x, dtype) if "float" in dtype else x
                for x, dtype in zip(inputs, self.input_dtypes)]
    values = dict(zip(self.input_ids, inputs))
    for op, input_ids, output_id in self.steps:
      args = [values[i] for i in input_ids]
      if op.input_dtype is not None:
        args = [_cast_floats(a, op.input_dtype) for a in args]
      if op.promotes_integers:
        args = [_cast_integers(a, op.layer.compute_dtype) for a in args]
      values[output_id] = op(ctx, args)
    return values[self.output_id]


# ---------------------------------------------------------------- compiler
# Ops that read no weights through the context (a layer of these kinds with
# trainable weights is refused).
# Call arguments of Attention and AdditiveAttention that change nothing when
# given as False.
_OFF_BY_DEFAULT = ("use_causal_mask", "return_attention_scores")
_WEIGHTLESS = (_Identity, _Elementwise, _PerExample, _Pool2D, _Flatten,
               _Random, _Add, _Concatenate)

_ELEMENTWISE = (keras.layers.Activation, keras.layers.ReLU,
                keras.layers.LeakyReLU, keras.layers.ELU)
# No trainable weights, no batch statistics, no randomness: each example's
# output depends on that example alone (Normalization's mean and variance
# are constants of the layer once adapted or given).
_PER_EXAMPLE = (
    keras.layers.Rescaling, keras.layers.Normalization, keras.layers.Identity,
    keras.layers.Reshape, keras.layers.Permute, keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D, keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D, keras.layers.Subtract,
    keras.layers.Multiply, keras.layers.Average, keras.layers.Maximum,
    keras.layers.Minimum, keras.layers.Masking, keras.layers.MaxPooling1D,
    keras.layers.AveragePooling1D, keras.layers.GlobalAveragePooling3D,
    keras.layers.GlobalMaxPooling3D, keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding3D, keras.layers.Cropping1D,
    keras.layers.Cropping3D, keras.layers.RepeatVector,
    keras.layers.UnitNormalization, keras.layers.UpSampling1D,
    keras.layers.UpSampling3D, keras.layers.MaxPooling3D,
    keras.layers.AveragePooling3D)
# Random layers: noise per task from each task's seed stream.
_SPATIAL_DROPOUT = (keras.layers.SpatialDropout1D,
                    keras.layers.SpatialDropout2D,
                    keras.layers.SpatialDropout3D)
_RANDOM = (keras.layers.Dropout, keras.layers.GaussianNoise,
           keras.layers.GaussianDropout,
           keras.layers.AlphaDropout) + _SPATIAL_DROPOUT


def _dropout_noise_shape(layer):
  """``shape -> mask shape`` of a Dropout-family layer for one task's inputs
  of ``shape`` (a 1-D tensor), as the layer computes its ``noise_shape``:
  spatial dropout keeps the example and channel axes (``channels_last``), a
  given ``noise_shape`` takes the inputs' size where it says ``None``."""
  if type(layer) in _SPATIAL_DROPOUT:  # pylint: disable=unidiomatic-typecheck
    def spatial(shape):
      ones = tf.ones_like(shape[1:-1])
      return tf.concat([shape[:1], ones, shape[-1:]], 0)
    return spatial
  if layer.noise_shape is None:
    return lambda shape: shape
  given = tuple(layer.noise_shape)

  def partial(shape):
    # Keras fills the None entries from the inputs' leading axes; TF then
    # lines a shorter mask up with the inputs from the right.
    mask = [shape[i] if d is None else tf.constant(d, shape.dtype)
            for i, d in enumerate(given)]
    pad = [tf.constant(1, shape.dtype)] * (int(shape.shape[0]) - len(mask))
    return tf.stack(pad + mask)
  return partial


_SUPPORTED = (
    "InputLayer, Dense, EinsumDense, MultiHeadAttention, Attention and "
    "AdditiveAttention (no masks, no dropout), Embedding, Conv1D, "
    "Conv2D, Conv3D, DepthwiseConv2D, SeparableConv1D, SeparableConv2D, "
    "Conv1D/2D/3DTranspose, "
    "SimpleRNN, GRU, LSTM, RNN over their cells or a stack of them, "
    "Bidirectional over them, TimeDistributed, "
    "BatchNormalization, LayerNormalization, GroupNormalization, "
    "MaxPooling2D, AveragePooling2D, "
    "Flatten, Activation, ReLU, LeakyReLU, ELU, Softmax, Dropout, "
    "SpatialDropout1D/2D/3D, GaussianNoise, GaussianDropout, AlphaDropout, "
    "Add, "
    "Concatenate, UpSampling2D (nearest), "
    + ", ".join(k.__name__ for k in _PER_EXAMPLE)
    + ", nested Sequential/functional models, and Keras operations that "
    "act on each example alone (x + y, keras.ops.tanh(x), x[:, 0])")


class _Compiler:
  """Maps a Keras model's layers to :class:`_Op` objects."""

  def __init__(self, model, conv_impl, fold=True):
    self.conv_impl = conv_impl
    self.fold = fold
    self.masked_attention = None   # the attention reading Keras masks
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
    for name in ("activation", "recurrent_activation"):
      if isinstance(getattr(layer, name, None), keras.layers.Layer):
        raise _unsupported(layer, f"its {name} is a layer (its weights "
                           "would not be the per-task ones)")
    if getattr(layer, "data_format", "channels_last") != "channels_last":
      raise _unsupported(layer, f"data_format={layer.data_format!r}; only "
                         "'channels_last' is supported")

  def check_convolution(self, layer):
    """'same' or 'valid' padding ('causal' too for Conv1D); not strides and
    dilation both above 1 (Keras computes that combination, which only
    depthwise and separable layers accept, by a decomposition of its own)."""
    causal = isinstance(layer, keras.layers.Conv1D)
    if layer.padding not in ("same", "valid") + (("causal",) if causal
                                                  else ()):
      raise _unsupported(layer, f"padding={layer.padding!r}")
    if max(layer.strides) > 1 and max(layer.dilation_rate) > 1:
      raise _unsupported(layer, f"strides={tuple(layer.strides)} with "
                         f"dilation_rate={tuple(layer.dilation_rate)}")

  def compile_layer(self, layer, node=None) -> _Op:
    """``layer``'s op (``node``: its call site in a functional graph)."""
    op = self._compile_layer(layer, node)
    if isinstance(op, _WEIGHTLESS) and layer.trainable_weights:
      raise _unsupported(layer, "it holds trainable weights (another "
                         "layer's?) that the task-batched path would read "
                         "unadapted")
    op.input_dtype = keras_compat.autocast_dtype(layer)
    return op

  def _compile_layer(self, layer, node) -> _Op:
    kind = type(layer)
    if isinstance(layer, keras.Model):
      return self.compile_model(layer)
    self.check_common(layer)
    if kind is keras.layers.InputLayer:
      return _Identity(layer)
    if kind is keras.layers.Dense:
      return _Dense(layer, self.ref(layer, layer.kernel),
                    self.ref(layer, layer.bias))
    if kind in (keras.layers.Conv1D, keras.layers.Conv2D):
      self.check_convolution(layer)
      op = _Conv2D if kind is keras.layers.Conv2D else _Conv1D
      return op(layer, self.ref(layer, layer.kernel),
                self.ref(layer, layer.bias), self.conv_impl)
    if recurrent_cells(layer) is not None:
      return self.compile_recurrent(layer)
    if kind in (keras.layers.Bidirectional, keras.layers.TimeDistributed):
      inner = ([layer.forward_layer, layer.backward_layer]
               if kind is keras.layers.Bidirectional else [layer.layer])
      if any(l.compute_dtype != layer.compute_dtype for l in inner):
        raise _unsupported(layer, "it wraps a layer of another dtype (Keras "
                           "casts or promotes between them)")
    if kind is keras.layers.Bidirectional:
      if layer.merge_mode not in ("concat", "sum", "ave", "mul"):
        raise _unsupported(layer, f"merge_mode={layer.merge_mode!r} (several "
                           "outputs)")
      directions = [layer.forward_layer, layer.backward_layer]
      if any(recurrent_cells(d) is None for d in directions):
        raise _unsupported(layer, "it wraps a layer other than SimpleRNN, "
                           "GRU, LSTM or RNN over their cells")
      return _Bidirectional(layer, *(self.compile_layer(d)
                                     for d in directions))
    if kind is keras.layers.TimeDistributed:
      if any(isinstance(l, keras.layers.BatchNormalization)
             for l in keras_compat.flatten_layers(layer)
             ) or functional.draws_random(layer):
        raise _unsupported(layer, "it wraps BatchNormalization or a random "
                           "layer, which Keras runs once per time step")
      return _TimeDistributed(layer, self.compile_layer(layer.layer))
    if kind is keras.layers.EinsumDense:
      return _EinsumDense(layer, self.ref(layer, layer.kernel),
                          self.ref(layer, layer.bias))
    if kind is keras.layers.Embedding:
      return _Embedding(layer, self.ref(layer, layer.embeddings))
    if kind is keras.layers.DepthwiseConv2D:
      self.check_convolution(layer)
      return _DepthwiseConv2D(layer, self.ref(layer, layer.kernel),
                              self.ref(layer, layer.bias))
    if kind in (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                keras.layers.Conv3DTranspose, keras.layers.Conv3D):
      if kind is keras.layers.Conv3D:
        self.check_convolution(layer)
        if layer.groups != 1:
          raise _unsupported(layer, f"groups={layer.groups} (3-D)")
      return _PerTaskConv(layer, self.ref(layer, layer.kernel),
                          self.ref(layer, layer.bias))
    if kind in (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D):
      self.check_convolution(layer)
      op = (_SeparableConv1D if kind is keras.layers.SeparableConv1D
            else _SeparableConv2D)
      return op(layer, self.ref(layer, layer.depthwise_kernel),
                self.ref(layer, layer.pointwise_kernel),
                self.ref(layer, layer.bias))
    if kind is keras.layers.BatchNormalization:
      rank = keras_compat.batchnorm_rank(layer)
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
      axis = (layer.axis if isinstance(layer.axis, (list, tuple))
              else [layer.axis])
      last = len(layer.input.shape) - 1 if _has_input(layer) else None
      if list(axis) not in ([-1], [last]):
        raise _unsupported(layer, f"axis={layer.axis}; only the last axis is "
                           "supported")
      if layer.rms_scaling:
        raise _unsupported(layer, "rms_scaling=True")
      return _LayerNorm(layer, self.ref(layer, layer.gamma),
                        self.ref(layer, layer.beta))
    if kind is keras.layers.GroupNormalization:
      last = len(layer.input.shape) - 1 if _has_input(layer) else None
      if layer.axis not in (-1, last):
        raise _unsupported(layer, f"axis={layer.axis}; only the last "
                           "(channel) axis is supported")
      return _GroupNorm(layer, self.ref(layer, layer.gamma),
                        self.ref(layer, layer.beta))
    if kind in (keras.layers.Attention, keras.layers.AdditiveAttention):
      if layer.dropout:
        raise _unsupported(layer, f"dropout={layer.dropout}")
      if node is None or any(len(t.shape) != 3 for t in node.input_tensors):
        raise _unsupported(layer, "needs query, value (and key) of shape "
                           "[batch, length, features]")
      ref = lambda v: None if v is None else self.ref(layer, v)
      return _ScoredAttention(layer, ref(layer.scale),
                              ref(getattr(layer, "concat_score_weight",
                                          None)))
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
    if kind in _RANDOM:
      return self.compile_random(layer)
    if kind is keras.layers.Add:
      return _Add(layer)
    if kind is keras.layers.Concatenate:
      if layer.axis == 0:
        raise _unsupported(layer, "concatenation along the batch axis")
      return _Concatenate(layer)
    if kind is keras.layers.UnitNormalization:
      axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [
          layer.axis]
      rank = len(layer.input.shape) if _has_input(layer) else None
      if any(a == 0 or (rank is not None and a % rank == 0)
             or (rank is None and a < -1) for a in axes):
        raise _unsupported(layer, f"axis={layer.axis} (across examples)")
    if kind in _PER_EXAMPLE:
      return _PerExample(layer)
    if kind is keras.layers.UpSampling2D:
      if layer.interpolation != "nearest":
        raise _unsupported(layer, f"interpolation={layer.interpolation!r} "
                           "(TensorFlow's resize has no second derivative)")
      return _PerExample(layer)
    if _users_layer(layer) and node is not None:
      # A user's layer (a block of Keras layers): its call traced on this
      # call site's input (one positional tensor: compile_model's checks).
      shape = tuple(node.input_tensors[0].shape)
      return self.compile_model(_traced(layer, shape))
    raise _unsupported(layer, "this layer type is not supported (supported: "
                       f"{_SUPPORTED})")

  def input_mask(self, op, node):
    """The Keras mask (a tensor of the graph) that ``node``'s call passes
    and its task-batched op applies, or ``None``.

    Keras computes a mask in the graph (``Embedding(mask_zero=True)``'s
    ``ids != 0``, ``Masking``'s, a layer's ``compute_mask``), records it as
    the ``mask`` argument of the layers whose call takes one, and at run
    time also hands a tensor's mask to any such layer called without it;
    some layers read it from their inputs. Here recurrent layers,
    Bidirectional and per-example layers (GlobalAveragePooling1D) apply a
    recorded mask; MultiHeadAttention reads its inputs' masks itself (its
    op's inputs: :meth:`attention_masks`); layers that take no mask and read
    none are unaffected.

    Raises:
      Unsupported: wherever the run-time mask could differ from the
        recorded one or be applied otherwise: a masked input reaching a
        layer that takes a mask without one recorded (a call with other
        keyword arguments, a dtype conversion), a subclass of
        MultiHeadAttention, Maximum / Minimum / Multiply, a nested model or a user's layer, a cast (which
        hands on the same tensor, mask and all); a mask not ``[B, L]``; an
        unrolled recurrent layer (Keras' unrolled loop masks otherwise).
    """
    carried = any(keras_compat.keras_mask(t) is not None
                  for t in node.input_tensors)
    if not isinstance(op, keras.layers.Layer):
      if carried and type(op).__name__ in _SAME_TENSOR_OPERATIONS:
        raise _unsupported(op, "a cast of a masked tensor hands on the same "
                           "tensor, whose mask then reaches later layers")
      return None
    if type(op) is keras.layers.MultiHeadAttention:  # pylint: disable=unidiomatic-typecheck
      return None            # its masks are its op's inputs (see above)
    if carried and (isinstance(op, (keras.layers.MultiHeadAttention,
                                    keras.Model) + _MASK_READING_MERGES)
                    or _users_layer(op)):
      raise _unsupported(op, "its inputs carry a Keras mask, which it would "
                         "apply where the task-batched path cannot")
    mask = node.arguments.kwargs.get("mask")
    if not _given(mask):
      if carried and _takes_mask(op):
        raise _unsupported(op, "its inputs carry a Keras mask that Keras "
                           "passes at run time but the graph does not "
                           "record (a call with other keyword arguments, "
                           "or a dtype conversion)")
      return None
    if not isinstance(mask, keras.KerasTensor) or len(mask.shape) != 2:
      raise _unsupported(op, "called with a Keras mask other than one "
                         "[batch, steps] tensor")
    if isinstance(op, keras.layers.TimeDistributed) and not _takes_mask(
        op.layer):
      return None                 # the wrapped layer does not take it
    directions = ([op.forward_layer, op.backward_layer]
                  if isinstance(op, keras.layers.Bidirectional) else [op])
    if any(getattr(d, "unroll", False) for d in directions):
      raise _unsupported(op, "unroll=True with a Keras mask (Keras' "
                         "unrolled loop masks otherwise than its loop)")
    if (recurrent_cells(op) is not None or type(op) in _PER_EXAMPLE
        or isinstance(op, keras.layers.Bidirectional)):
      return mask
    raise _unsupported(op, "its call takes a Keras mask (masks reach only "
                       "recurrent layers and GlobalAveragePooling1D here)")

  def compile_recurrent(self, layer) -> _Op:
    """SimpleRNN, GRU, LSTM (or RNN over their cells, or over a stack of
    them: one op per cell) with zero initial states and no dropout inside
    the cell (a Keras mask is the op's second input)."""
    check_recurrent(layer)
    cells = recurrent_cells(layer)
    for cell in cells + [layer.cell]:   # (the stack of cells casts too)
      self.check_common(cell)
      if cell.dtype_policy.name != layer.dtype_policy.name:
        raise _unsupported(layer, f"its cell computes in "
                           f"{cell.dtype_policy.name}, the layer in "
                           f"{layer.dtype_policy.name}")
    refs = lambda cell: [self.ref(layer, v) for v in (
        cell.kernel, cell.recurrent_kernel, cell.bias)]
    if len(cells) == 1 and cells[0] is layer.cell:
      return _Recurrent(layer, *refs(cells[0]))
    last = len(cells) - 1
    return _Stacked(layer, [_Recurrent(
        layer, *refs(cell), cell=cell, go_backwards=layer.go_backwards and not i,
        return_sequences=layer.return_sequences or i < last,
        zero_output=layer.zero_output_for_mask and i == last)
                            for i, cell in enumerate(cells)])

  def compile_random(self, layer) -> _Op:
    """Dropout (spatial too), GaussianNoise, GaussianDropout, AlphaDropout:
    noise per task."""
    rate = (layer.stddev if isinstance(layer, keras.layers.GaussianNoise)
            else layer.rate)
    if rate == 0:
      return _Identity(layer)
    if isinstance(layer, keras.layers.Dropout):
      noise_shape = _dropout_noise_shape(layer)
      draw = lambda s, shape, dtype: keras_compat.dropout_masks(
          s, noise_shape(shape), rate, dtype)
      combine = tf.multiply
    elif isinstance(layer, keras.layers.AlphaDropout):
      if rate >= 1:
        raise _unsupported(layer, f"rate={rate}")
      noise_shape = _dropout_noise_shape(layer)
      alpha_p = -1.6732632423543772848170429916717 * (
          1.0507009873554804934193349852946)
      a = ((1 - rate) * (1 + rate * alpha_p**2)) ** -0.5
      b = -a * alpha_p * rate
      draw = lambda s, shape, dtype: tf.cast(keras_compat.uniform_noise(
          s, noise_shape(shape)) >= rate, dtype)
      combine = lambda x, kept: a * (x * kept + alpha_p * (1 - kept)) + b
    elif isinstance(layer, keras.layers.GaussianNoise):
      draw = lambda s, shape, dtype: keras_compat.normal_noise(
          s, shape, 0.0, rate, dtype)
      combine = tf.add
    else:
      stddev = math.sqrt(rate / (1.0 - rate))
      draw = lambda s, shape, dtype: keras_compat.normal_noise(
          s, shape, 1.0, stddev, dtype)
      combine = tf.multiply
    return _Random(layer, self.ref(layer, layer.seed_generator.state), draw,
                   combine)

  def compile_attention(self, layer, node):
    """A MultiHeadAttention node's step: ``layer(query, value[, key],
    use_causal_mask=..., attention_mask=...)`` without returned scores;
    the Keras masks its call reads (the query's own; the value's and the
    key's unless given as ``value_mask``/``key_mask``) are inputs too."""
    self.check_common(layer)
    args, kwargs = list(node.arguments.args), dict(node.arguments.kwargs)
    kwargs.pop("training", None)
    names = ("query", "value", "key")
    given = dict(zip(names, args))
    for name in names:
      if name in kwargs:
        given[name] = kwargs.pop(name)
    causal = kwargs.pop("use_causal_mask", False)
    scores = kwargs.pop("return_attention_scores", False)
    if len(args) > 3:
      raise _unsupported(layer, "called with masks as positional arguments")
    if scores is not False or not isinstance(causal, bool):
      raise _unsupported(layer, "return_attention_scores, or a "
                         "use_causal_mask that is not a Python bool")
    config = layer.get_config()
    if config.get("sliding_window") is not None:
      raise _unsupported(layer, "sliding_window")
    tensors = [given.get("query"), given.get("value"),
               given.get("key") if given.get("key") is not None
               else given.get("value")]
    if any(not isinstance(t, keras.KerasTensor) for t in tensors) or any(
        len(t.shape) != 3 for t in tensors):
      raise _unsupported(layer, "needs query, value (and key) of shape "
                         "[batch, length, features]")
    masks = self.attention_masks(layer, given, kwargs)
    if set(masks) - {"attention_mask"}:
      if self.masked_attention is not None:
        raise _unsupported(layer, "a second attention reading Keras masks "
                           f"(after {self.masked_attention!r}): Keras' "
                           "attention removes its inputs' masks when it runs, "
                           "so later ones attend otherwise than the graph "
                           "records")
      self.masked_attention = layer.name
    parts = keras_compat.attention_parts(layer)
    if parts is None:
      raise _unsupported(layer, f"this Keras ({keras.__version__}) names its "
                         "sublayers otherwise")
    projections = {}
    for name in ("query", "key", "value", "output", "gate"):
      if parts[name] is not None:
        projections[name] = self.compile_layer(parts[name])
    seed_ref = (self.ref(layer, parts["dropout"].seed_generator.state)
                if layer.dropout else None)
    op = _MultiHeadAttention(layer, projections, seed_ref, causal,
                             list(masks))
    op.input_dtype = keras_compat.autocast_dtype(layer)
    return (op, [id(t) for t in tensors] + [id(m) for m in masks.values()],
            id(node.outputs[0]))

  @staticmethod
  def attention_masks(layer, given, kwargs) -> dict:
    """The masks a MultiHeadAttention call site attends with, as its call
    reads them: ``{name: mask tensor}`` for ``query_mask`` (always the
    query's own Keras mask), ``value_mask`` and ``key_mask`` (those given,
    else the value's and the key's Keras masks, which Keras' ``__call__``
    passes) and ``attention_mask``; each one ``[batch, ...]``."""
    kwargs = {k: v for k, v in kwargs.items() if _given(v)}
    kwargs.pop("query_mask", None)       # the call reads the query's own
    unknown = sorted(set(kwargs) - {"value_mask", "key_mask",
                                    "attention_mask"})
    if unknown:
      raise _unsupported(layer, f"called with {unknown}")
    masks = {"query_mask": keras_compat.keras_mask(given["query"])}
    for name in ("value", "key"):
      tensor = given.get(name)
      masks[name + "_mask"] = kwargs.get(name + "_mask", None if tensor is
                                         None else
                                         keras_compat.keras_mask(tensor))
    masks["attention_mask"] = kwargs.get("attention_mask")
    masks = {k: m for k, m in masks.items() if m is not None}
    for name, m in masks.items():
      rank = 3 if name == "attention_mask" else 2
      if not isinstance(m, keras.KerasTensor) or len(m.shape) != rank:
        raise _unsupported(layer, f"a {name} that is not a [batch, ...] "
                           f"tensor of rank {rank} computed in the model")
    return masks

  def compile_model(self, model) -> _Program:
    graph = keras_compat.functional_graph(model)
    input_dtypes = None if graph is None else [str(t.dtype)
                                               for t in graph.inputs]
    if isinstance(model, keras.Sequential) and not _uses_masks(graph):
      steps, layers, i = [], model.layers, 0
      while i < len(layers):
        op = self.compile_layer(layers[i])
        # pylint: disable=unidiomatic-typecheck
        if (self.fold and type(op) is _Conv2D and i + 1 < len(layers)
            and type(layers[i + 1]) is keras.layers.BatchNormalization
            and layers[i + 1].compute_dtype == layers[i].compute_dtype
            and _ConvBatchNorm.applies(layers[i], layers[i + 1])):
          folded = _ConvBatchNorm(op, self.compile_layer(layers[i + 1]))
          folded.input_dtype = op.input_dtype
          steps.append((folded, [i], i + 2))
          i += 2
          continue
        steps.append((op, [i], i + 1))
        i += 1
      return _Program(model, [0], steps, len(layers), input_dtypes)
    if graph is None:                                 # subclassed
      graph = _traced(model)
    if len(graph.outputs) != 1:
      raise Unsupported(
          f"maml_tf.fast_weights cannot batch model {model.name!r}: it has "
          f"{len(graph.outputs)} outputs; only single-output models are "
          "supported")
    if keras_compat.keras_mask(graph.outputs[0]) is not None:
      raise Unsupported(
          f"maml_tf.fast_weights cannot batch model {model.name!r}: its "
          "output carries a Keras mask (which the layers after it, or a "
          "Keras loss, would apply)")
    steps = []
    for node in keras_compat.graph_nodes(_with_attention_masks(graph)):
      op = node.operation
      mask = self.input_mask(op, node)
      if not isinstance(op, keras.layers.Layer):   # keras.ops, x + y
        why = keras_compat.per_example_operation(node)
        if why is not None:
          raise _unsupported(op, why)
        steps.append((_Operation(op, node.arguments,
                                 tuple(node.input_tensors[0].shape)),
                      [id(t) for t in node.input_tensors],
                      id(node.outputs[0])))
        continue
      if type(op) is keras.layers.MultiHeadAttention:  # pylint: disable=unidiomatic-typecheck
        steps.append(self.compile_attention(op, node))
        continue
      # A `training` recorded when the graph was built is replaced by
      # the caller's in Keras' functional call (a bool: always here).
      # (A nested model called on several inputs records mask=[None,
      # ...]: no mask.)
      kwargs = {k: v for k, v in node.arguments.kwargs.items()
                if k not in ("training", "mask") and _given(v)
                and not (k in _OFF_BY_DEFAULT and v is False and type(op)
                         in (keras.layers.Attention,
                             keras.layers.AdditiveAttention))}
      if kwargs:
        raise _unsupported(op, f"called with keyword arguments "
                           f"{sorted(kwargs)} (only the input is "
                           "task-batched)")
      if len(node.outputs) != 1:
        raise _unsupported(op, "layers with several outputs")
      if len(node.arguments.args) != 1:
        raise _unsupported(op, f"called with {len(node.arguments.args)} "
                           "positional arguments (its task-batched op reads "
                           "only the first: an initial state or mask given "
                           "so would be dropped)")
      recorded = node.arguments.kwargs.get("mask")
      sources = [t for t in node.input_tensors if t is not recorded]
      if isinstance(op, keras.Model):
        sources = _ordered_inputs(op, node.arguments.args[0])
      compiled = self.compile_layer(op, node)
      # (Embedding casts its ids to integers itself.)
      if (not isinstance(op, (keras.Model, keras.layers.Embedding))
          and compiled.input_dtype is None
          and {str(t.dtype) for t in sources if "float" in str(t.dtype)}
          - {op.compute_dtype}):
        raise _unsupported(op, "autocast=False on inputs of another dtype "
                           "(Keras promotes them inside its ops)")
      ids = [id(t) for t in sources]
      if mask is not None:          # the layer's call takes this mask
        ids.append(id(mask))
        if type(compiled) is _PerExample:  # pylint: disable=unidiomatic-typecheck
          compiled.masked = True
      steps.append((compiled, ids, id(node.outputs[0])))
    inputs = [id(t) for t in graph.inputs]
    return _Program(model, inputs, _in_dependency_order(steps, inputs),
                    id(graph.outputs[0]), input_dtypes)


def _traced(model: keras.layers.Layer, shape=None) -> keras.Model:
  """A subclassed model's (or a user's layer's) ``call`` run on a symbolic
  input: a functional model of the same layers and variables. (Weights of
  its own, which its call reads directly, are refused where an operation
  reads them: :func:`maml_tf.core.keras_compat.per_example_operation`.)

  ``call`` is traced in both modes (its layers take the mode where not
  given one, as Keras' ``__call__`` passes it on, and a ``training``
  argument takes it too), and must take the same layers and operations in
  each (a branch on ``training`` would make one graph wrong for the other
  mode).

  Raises:
    Unsupported: the model was not built on one input of known shape, its
      call cannot run on symbolic inputs (a TensorFlow op, Python on
      values), or it branches on ``training``.
  """
  what = "model" if isinstance(model, keras.Model) else "layer"
  name = f"maml_tf.fast_weights cannot batch {what} {model.name!r} " + (
      f"({type(model).__name__})")
  with tf.init_scope():   # eagerly, even when compiled inside a step
    before = [(v, v.numpy()) for v in model.weights]
    try:
      graphs = _trace_modes(model, shape, name)
    finally:       # a call that writes variables: undone, then refused
      changed = [v.path for v, value in before
                 if not np.array_equal(v.numpy(), value)]
      for v, value in before:
        v.assign(value)
  if changed:
    raise Unsupported(f"{name}: its call writes variables ({changed}); "
                      "the task-batched path would not")
  if len(graphs) == 2 and _structure(graphs[0]) != _structure(graphs[1]):
    raise Unsupported(f"{name}: its call takes other layers or operations "
                      "with training=True than with training=False")
  return graphs[0]


def _trace_modes(model, shape, name) -> list:
  """``model.call`` on a symbolic input of ``shape``, as functional models:
  one per training mode (True, False)."""
  graphs = []
  for mode in (True, False):
    try:
      # (Its layers take the mode where not given one, as in its __call__.)
      graph = functional.traced_call(model, mode, shape, refuse_losses=True)
    except functional.NoInputShape as e:
      raise Unsupported(f"{name}: to be traced, it must be built on one "
                        f"input of known shape ({e})") from None
    except functional.CallAddsLosses:
      raise Unsupported(f"{name}: its call adds losses (Layer.add_loss), "
                        "which the task-batched path would leave out "
                        "silently") from None
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).splitlines() or [""])[0][:200]
      raise Unsupported(
          f"{name}: its call does not run on symbolic Keras inputs "
          f"({type(e).__name__}: {first}); a call made of Keras layers and "
          "keras.ops runs task-batched") from None
    fixed = _fixed_training(graph, mode)
    if fixed:
      raise Unsupported(f"{name}: its call passes training={fixed[1]} to "
                        f"{fixed[0]!r} whatever its own training (the "
                        "task-batched layers follow the caller's)")
    graphs.append(graph)
  return graphs


def _with_attention_masks(graph: keras.Model) -> keras.Model:
  """``graph``, or a functional model of its inputs that also computes the
  Keras masks its MultiHeadAttention calls read from their inputs where no
  layer of ``graph`` takes them (Keras computes them beside the graph)."""
  computed = {id(t) for t in graph.inputs} | {
      id(t) for node in keras_compat.graph_nodes(graph) for t in node.outputs}
  missing = {}
  for node in keras_compat.graph_nodes(graph):
    if type(node.operation) is keras.layers.MultiHeadAttention:  # pylint: disable=unidiomatic-typecheck
      for t in node.input_tensors:
        mask = keras_compat.keras_mask(t)
        if mask is not None and id(mask) not in computed:
          missing[id(mask)] = mask
  if not missing:
    return graph
  return keras.Model(graph.inputs, [graph.outputs[0]] + list(
      missing.values()), name=f"{graph.name}_with_masks")


def _in_dependency_order(steps, input_ids):
  """``steps`` reordered so that each comes after the steps whose outputs
  it reads (a Keras mask an attention reads is no edge of the layer graph,
  so its depth may put it after the attention), otherwise in their order:
  each time the earliest step whose inputs are ready. (Already in order,
  they stay so: a layer called twice keeps its calls' order, which its
  state and random draws follow.)"""
  available, pending, ordered = set(input_ids), list(steps), []
  while pending:
    for i, step in enumerate(pending):
      if all(j in available for j in step[1]):
        break
    else:
      raise Unsupported(f"maml_tf.fast_weights: {len(pending)} layer calls "
                        "read tensors no earlier call computes")
    ordered.append(pending.pop(i))
    available.add(step[2])
  return ordered


def _given(value) -> bool:
  """Does a recorded call argument hold anything (a mask list of ``None``
  holds nothing)?"""
  return any(v is not None for v in tf.nest.flatten(value))


def _fixed_training(graph: keras.Model, mode):
  """``(layer name, value)`` of a layer ``graph`` calls with a ``training``
  other than ``mode`` (the trace's own: a value fixed in ``call``), or
  ``None``."""
  for node in keras_compat.graph_nodes(graph):
    value = node.arguments.kwargs.get("training")
    if value is not None and value != mode:
      return node.operation.name, value
  return None


def _structure(graph: keras.Model) -> list:
  """The layers and operations of a functional ``graph`` and how they
  connect, comparable across two traces of one call."""
  index = {id(t): i for i, t in enumerate(graph.inputs)}
  out = []
  for node in keras_compat.graph_nodes(graph):
    op = node.operation
    if isinstance(op, keras.layers.Layer):
      key = id(op)
    else:       # an operation: its type and non-tensor arguments
      args, kwargs = node.arguments.convert(
          lambda v: None if isinstance(v, keras.KerasTensor) else v)
      key = (type(op).__name__, repr(args), repr(sorted(kwargs.items())),
             repr(sorted((k, v) for k, v in vars(op).items()
                         if not k.startswith("_") and k != "name")))
    out.append((key, [index.get(id(t)) for t in node.input_tensors]))
    for t in node.outputs:
      index[id(t)] = len(index)
  return out


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

  Attributes:
    model: the compiled Keras model.
    conv_impl: the resolved Conv2D implementation (never ``'auto'``).
    program: the compiled top-level ``_Program``; ``program.steps`` lists
      its ``(op, input_ids, output_id)`` steps.

  Arguments (of ``__call__``):
    params: tensors aligned with ``model.trainable_variables``, each
      ``[T, *var.shape]`` (one value per task) or ``var.shape`` (shared by
      all tasks).
    state: tensors aligned with ``model.non_trainable_variables``, each
      ``[T, *var.shape]`` or ``var.shape``.
    x: inputs ``[T, N, *input_shape]``; for a model with several inputs,
      the structure it takes (``model.input``'s: a list, tuple or dict),
      each ``[T, N, ...]``.
    training: ``True`` normalises BatchNorm with each task's batch statistics
      and updates its moving statistics; ``False`` uses the moving statistics.

  Returns:
    ``(y, new_state)``: ``y`` is ``[T, N, *output_shape]``; ``new_state`` is
    a list aligned with ``state`` (updated BatchNorm moving statistics are
    ``[T, ...]``; in training mode a random layer's seed comes back
    ``[T, 2]``, advanced by its draw; untouched entries are passed through
    as given). A seed shared by the tasks (``[2]``) gives every task the
    same noise, as task by task with that seed; per-task seeds (``[T, 2]``,
    e.g. :func:`maml_tf.core.inner_loop.task_states`) give each its own.

  Example:
    >>> batched = compile_batched(model)
    >>> y, new_state = batched(params, state, x, training=True)
  """

  def __init__(self, model: keras.Model, program: _Program, conv_impl: str):
    self.model = model
    self.conv_impl = conv_impl
    self.program = program
    self._shapes = {
        "p": [tuple(v.shape) for v in model.trainable_variables],
        "s": [tuple(v.shape) for v in model.non_trainable_variables]}
    # What a model traced from its call (no Inputs) casts floating inputs
    # to in its __call__ (Keras' autocast), or None.
    self._dtype = keras_compat.autocast_dtype(model)

  def __call__(self, params: Sequence[tf.Tensor], state: Sequence[tf.Tensor],
               x, training: bool = True) -> Tuple[tf.Tensor, List[tf.Tensor]]:
    if len(params) != len(self._shapes["p"]):
      raise ValueError(f"expected {len(self._shapes['p'])} params (one per "
                       f"trainable variable), got {len(params)}")
    if len(state) != len(self._shapes["s"]):
      raise ValueError(f"expected {len(self._shapes['s'])} state tensors (one "
                       f"per non-trainable variable), got {len(state)}")
    inputs = self._flat_inputs(x)
    params = [tf.convert_to_tensor(p) for p in params]
    state = [tf.convert_to_tensor(s) for s in state]
    if not isinstance(training, (bool, np.bool_)):
      raise TypeError(
          f"training must be True or False, got {training!r} (Keras' None "
          "would keep the flags recorded in the graph, which this compiled "
          "model does not read)")
    ctx = _Context(params, state, self._shapes, bool(training))
    y = self.program(ctx, inputs)
    return y, ctx.values["s"]

  def _flat_inputs(self, x) -> List[tf.Tensor]:
    """``x`` (a tensor, or the structure of ``model.input``) as a list in
    the order of ``model.inputs``, floats cast to the model's dtype."""
    flat = tf.nest.flatten(x)
    if len(flat) != len(self.program.input_ids):
      raise ValueError(
          f"model {self.model.name!r} takes {len(self.program.input_ids)} "
          f"inputs, got {len(flat)} ({tf.nest.map_structure(_shape_of, x)})")
    if len(flat) > 1:
      flat = _ordered_inputs(self.model, x)
    inputs = []
    for t in flat:
      t = tf.convert_to_tensor(t)
      if self.program.input_dtypes is None and self._dtype is not None:
        t = _cast_floats(t, self._dtype)     # (the program casts the rest)
      if t.shape.rank is None or t.shape.rank < 2:
        raise ValueError(f"x must be [T, N, *input_shape], got shape "
                         f"{t.shape}")
      inputs.append(t)
    return inputs


def _shape_of(t):
  return tuple(getattr(t, "shape", ()))


def _ordered_inputs(model: keras.Model, x) -> list:
  """The values of ``x`` (a structure of a functional ``model``'s several
  inputs) in the order of ``model.inputs``, matched as Keras matches them:
  a dict by key where the model was built on a dict, else by input name; a
  list or tuple by position.

  Raises:
    ValueError: a dict whose keys are not the model's.
  """
  if not isinstance(x, dict):
    return tf.nest.flatten(x)
  declared = model.input
  names = (sorted(declared) if isinstance(declared, dict)
           else [t.name for t in model.inputs])
  if sorted(names) != sorted(x):
    raise ValueError(f"model {model.name!r} takes the inputs {names}; got "
                     f"a dict of {sorted(x)}")
  return [x[name] for name in names]


def compile_batched(model: keras.Model, conv_impl: str = "auto",
                    fold_conv_batchnorm: bool = True) -> BatchedModel:
  """Compiles ``model`` into a :class:`BatchedModel` running all tasks at once.

  Arguments:
    model: a built ``keras.Sequential``, functional ``keras.Model`` (one
      output, any number of inputs; nested models are fine) or subclassed
      model (built on one input; its ``call`` is traced into its layers,
      and must take the same ones with ``training`` True and False; so is
      a user's ``Layer`` subclass inside a model) made of supported
      layers:
      InputLayer, Dense, EinsumDense, MultiHeadAttention (Keras masks in
      one attention of a model, ``attention_mask``, ``use_causal_mask``;
      no returned scores), Attention and AdditiveAttention (no masks, no
      dropout),
      Embedding, Conv1D, Conv2D
      (any ``groups``), DepthwiseConv2D, SeparableConv1D and
      SeparableConv2D (channels_last, 'same' or 'valid'), Conv3D, Conv1D/2D/3DTranspose,
      SimpleRNN, GRU, LSTM and RNN over their cells or a stack of them
      (no dropout inside the cell, not stateful, no returned states), Bidirectional over
      them, TimeDistributed over a supported layer (no
      BatchNormalization or random layers inside), BatchNormalization,
      LayerNormalization and GroupNormalization (last axis), Masking,
      MaxPooling2D, AveragePooling2D, Flatten, Activation, ReLU,
      LeakyReLU, ELU, Softmax (last axis), Dropout (and its
      ``noise_shape``), SpatialDropout1D/2D/3D, GaussianNoise,
      GaussianDropout, AlphaDropout, Add, Concatenate and the weightless
      per-example layers (Rescaling, Normalization, Identity, Reshape,
      Permute, padding and cropping, 1-D and global pooling, UpSampling
      (nearest), RepeatVector, UnitNormalization, Subtract, Multiply,
      Average, Maximum, Minimum); between them, Keras operations that act on each example alone (``x + y``,
      ``keras.ops.tanh(x)``, ``x[:, 0]``, reductions over feature axes:
      :func:`maml_tf.core.keras_compat.per_example_operation`). Keras
      masks reach the recurrent layers, MultiHeadAttention and
      GlobalAveragePooling1D as Keras passes them; a model whose output
      carries one is refused.
    conv_impl: ``'auto'``, ``'patches'``, ``'grouped'`` or ``'map'`` (see
      :mod:`maml_tf.core.fast_weights`).
    fold_conv_batchnorm: in training mode, fold a Conv2D with few inputs
      per output pixel (at most its filter count, e.g. a first layer) and
      the BatchNormalization after it into one convolution
      (:class:`~maml_tf.core.fast_weights.normalization._ConvBatchNorm`;
      same numbers, fewer full-size passes).

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
