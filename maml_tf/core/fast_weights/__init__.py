"""Task-batched fast weights: all T tasks of a meta-batch as one batched op.

MAML evaluates one network at T different sets of weights (one per task).
``tf.vectorized_map`` cannot vectorise a ``Conv2D`` whose filter differs per
task ("Input 'filter' of op 'Conv2D' expected to be loop invariant"), so the
learner falls back to ``tf.map_fn``, which runs the tasks one after another.
This package compiles a Keras model into a :class:`BatchedModel`: a pure
function of ``(params, state, x)`` in which every tensor carries a leading
task axis and every layer is one task-batched kernel:

* Dense: one batched matmul ``[T, M, D] x [T, D, K]``
  (:func:`~maml_tf.core.fast_weights.kernels.batched_dense`).
* Conv2D, selectable with ``conv_impl``
  (:mod:`~maml_tf.core.fast_weights.kernels`):

  - ``'map'`` (CPU default): one ``tf.nn.conv2d`` per task, unrolled over a
    static task axis (``tf.map_fn`` when T is unknown).
  - ``'patches'``: ``tf.image.extract_patches`` on ``[T*N, H, W, C]`` (TF's
    own 'SAME'/'VALID' geometry; patches at most
    ``kernels.ONE_HOT_PATCH_DEPTH`` deep, a first layer's, by a convolution
    with a one-hot filter instead), then one batched matmul
    ``[T, N*H'*W', kh*kw*C] x [T, kh*kw*C, F]``. Linear ops only, exact
    derivatives of every order. (:func:`conv2d_slices` is the same with
    patches built from kh*kw strided slices; exact but slow on CPU.)
  - ``'grouped'`` (GPU default): fold the tasks into channels, input
    ``[N, H, W, T*C]`` and filter ``[kh, kw, C, T*F]``, so that
    ``tf.nn.conv2d`` runs one grouped convolution with T groups (cuDNN).
    TF's CPU kernels run the forward pass (tested) but differentiate
    grouped convolutions only through oneDNN (float32 and bfloat16 on
    x86-64 where TensorFlow turned oneDNN on, which by default it does not
    on plain AVX2 CPUs; :func:`grouped_gradient_missing`); elsewhere on CPU
    a learner refuses it. Its float64 first and second order gradients are
    tested where a GPU is visible.
  - ``'auto'``: ``'grouped'`` when a GPU is visible, else ``'map'``; the
    learner's execution plan (:mod:`maml_tf.core.plan`) refines this on CPU
    by the size of one task.

* BatchNormalization / LayerNormalization
  (:mod:`~maml_tf.core.fast_weights.normalization`): per-task moments over
  every axis but the task and channel axes, computed as ``mean`` then
  ``mean((x - mean)^2)`` with no ``stop_gradient``, so second derivatives are
  exact (see :mod:`maml_tf.core.functional`). In training mode BatchNorm's
  backward pass is written out (:func:`normalize_with_moments`: about half
  the full-size ops of autodiff through the moments, still exact to every
  order). A Conv2D with few inputs per output pixel (``kh*kw*C`` at most
  its filter count: a first layer) followed by BatchNormalization is folded
  into one convolution in training mode (``_ConvBatchNorm``: the batch
  statistics from the moments of the input patches).
  GroupNormalization: each example's groups of channels normalised by
  their moments, then the per-task scale and offset.
* EinsumDense: the layer's equation with a task axis added.
  MultiHeadAttention (no masks other than ``use_causal_mask``): its
  projections as EinsumDense; the attention, which has no weights, on the
  task and example axes merged as the layer computes it; an attention
  dropout draws each task's mask from its seed state. Attention and
  AdditiveAttention (no masks, no dropout): the layer's scores with each
  task's scale weights, then the softmax-weighted values.
* SimpleRNN, GRU, LSTM (:mod:`~maml_tf.core.fast_weights.recurrent`): the
  input projections of all time steps as one batched matmul, then one
  ``tf.scan`` over time of the cell's recurrence on ``[T, N, U]`` states
  (stacked cells: one such op per cell); Bidirectional over them, TimeDistributed over a supported layer
  without BatchNormalization or random draws (Keras calls it per step). Zero
  initial states, no dropout inside the cell. A Keras mask
  (``Embedding(mask_zero=True)``, ``Masking``) skips steps as Keras' loop
  does; masked GlobalAveragePooling1D too.
* Conv3D, Conv1D/2D/3DTranspose: Keras' ``conv`` / ``conv_transpose``
  once per task.
* SeparableConv2D: that depthwise convolution, then the pointwise kernel
  as one batched matmul over pixels; SeparableConv1D: the same at height 1.
* Conv1D: a Conv2D of height 1 on the same kernels. A grouped convolution
  (``groups > 1``): one convolution per group of channels, concatenated.
  DepthwiseConv2D: the tasks' channels side by side in one depthwise
  convolution. Embedding: one gather over the task axis.
* Pooling, Flatten, activations, Add, Concatenate and weightless
  per-example layers (Rescaling, Normalization, Reshape, padding,
  cropping, 1-D and global pooling, nearest upsampling, RepeatVector,
  UnitNormalization, elementwise merges): no per-task weights; the task
  and example axes are merged and TF's own ops (or the layer's ``call``)
  run once (pooling keeps TF's exact tie-breaking, so derivatives equal Keras' too).
  Keras operations of a functional graph (``x + y``, ``keras.ops.*``,
  ``x[:, 0]``) likewise, where they act on each example alone
  (:func:`maml_tf.core.keras_compat.per_example_operation` says which).
* Random layers (Dropout, spatial dropout, GaussianNoise, GaussianDropout,
  AlphaDropout):
  each task's noise is drawn from its own seed state (``[T, 2]`` seeds) as
  Keras draws it for that task alone; the layers themselves run batched.

Every parameter may also be given *without* the task axis (shape
``var.shape``): it is then shared by all tasks and the layer uses the plain
(unbatched) kernel, e.g. ``tf.nn.conv2d`` on ``[T*N, H, W, C]``. The gradient
with respect to a shared parameter is the sum over tasks.

Measurements behind these choices: BENCHMARKS.md ("Task-batched kernels").
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

from maml_tf.core.fast_weights.base import Unsupported
from maml_tf.core.fast_weights.compiler import BatchedModel, compile_batched
from maml_tf.core.fast_weights.kernels import (
    CONV_IMPLS, batched_dense, conv2d_grouped, conv2d_map, conv2d_patches,
    conv2d_slices, grouped_gradient_missing, resolve_conv_impl)
from maml_tf.core.fast_weights.normalization import normalize_with_moments

__all__ = [
    "BatchedModel", "CONV_IMPLS", "Unsupported", "batched_dense",
    "compile_batched", "conv2d_grouped", "conv2d_map", "conv2d_patches",
    "conv2d_slices", "grouped_gradient_missing", "normalize_with_moments",
    "resolve_conv_impl",
]
