"""Closed-form MAML meta-gradients for chains of Dense layers under MSE.

For the smallest models (the paper's 1-40-40-1 sinusoid regressor) a
meta-step is a few hundred tiny ops, and autodiff through the inner
gradient adds broadcast bookkeeping (``Reshape``, ``Sum``, ``Tile``) around
every product. For a chain of Dense layers with ReLU or linear activations
and a mean-squared-error loss the meta-gradient has a short closed form,
written out here: the backward pass, and Pearlmutter's R-operator on it for
the Hessian-vector products of the second-order terms::

    theta_{k+1} = theta_k - alpha * g_S(theta_k)                (inner steps)
    v_n = g_Q(theta_n)
    v_k = v_{k+1} - alpha * H_S(theta_k) v_{k+1}               (k = n-1 .. 0)
    meta-gradient = mean over tasks of v_0

where ``g_S``/``g_Q`` are the support/query loss gradients and ``H_S v`` is
exact (ReLU's second derivative is zero almost everywhere, as in autodiff).
First-order MAML drops the Hessian terms: ``v_0 = v_n``.

Every tensor carries the task axis: activations ``[T, N, width]``, adapted
biases ``[T, 1, out]``. A kernel (:class:`_Kernel`) is theta's shared
``[in, out]`` plus per-task corrections. Few-shot gradients have low rank:
the kernel gradient of ``N`` examples is ``a^T delta``, so when ``N`` is
below the layer's widths it is kept as those two factors and every product
with an adapted kernel goes through ``[T, N, N']`` intermediates; no
``[T, in, out]`` per-task kernel is ever formed, and the meta-gradient's
mean over tasks is one 2-D product over all tasks' rows. (Per-task outer
products ``a^T delta`` are the slowest batched matmuls on CPU, under XLA
most of all.)

:class:`maml_tf.MAML` uses this path by itself (``closed_form="auto"``) for
``keras.Sequential`` models of Dense layers with ``relu`` or ``linear``
activations, Keras' mean-squared-error loss, a fixed inner step size, every
weight adapted and no multi-step loss; the numbers equal autodiff's (tested
to float64 round-off).

Example:
  >>> chain = dense_chain.analyse(model, keras.losses.MeanSquaredError())
  >>> grads, losses = dense_chain.meta_gradients(
  ...     chain, params, batch, inner_lr=0.01, steps=1, first_order=False,
  ...     record_steps=(0, 1))        # losses: [T, 2] query losses
"""

import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import keras
import tensorflow as tf


class DenseChain(NamedTuple):
  """The structure of a supported model: one entry per Dense layer."""
  relu: Tuple[bool, ...]       # ReLU (True) or linear (False) activation
  use_bias: Tuple[bool, ...]


def _is_mse(loss) -> bool:
  if isinstance(loss, str):
    return loss in ("mse", "mean_squared_error", "MeanSquaredError")
  if type(loss) is keras.losses.MeanSquaredError:  # pylint: disable=unidiomatic-typecheck
    return loss.reduction in ("sum_over_batch_size", "mean")
  return loss is keras.losses.mean_squared_error


def analyse(model: keras.Model, loss) -> Optional[DenseChain]:
  """The model's :class:`DenseChain`, or ``None`` if this path cannot run it.

  Arguments:
    model: a built Keras model.
    loss: the MAML loss (object, name or function).

  Returns:
    ``None`` unless the model is a ``keras.Sequential`` of ``Dense`` layers
    (ReLU or linear activations, no regularisers or constraints, no
    non-trainable weights) and the loss is Keras' mean squared error with
    the mean reduction.
  """
  if not _is_mse(loss) or not isinstance(model, keras.Sequential):
    return None
  if model.non_trainable_variables or not model.trainable_variables:
    return None
  try:
    if len(model.input_shape) != 2:      # [batch, features] inputs only
      return None
  except (AttributeError, ValueError):
    return None
  dtype = model.trainable_variables[0].dtype
  if getattr(loss, "dtype", dtype) != dtype:   # the loss would cast
    return None
  relu, use_bias, variables = [], [], []
  for layer in model.layers:
    if type(layer) is not keras.layers.Dense:  # pylint: disable=unidiomatic-typecheck
      return None
    if layer.activation is keras.activations.relu:
      relu.append(True)
    elif layer.activation is keras.activations.linear:
      relu.append(False)
    else:
      return None
    if (layer.kernel_regularizer or layer.bias_regularizer or
        layer.activity_regularizer or layer.kernel_constraint or
        layer.bias_constraint or getattr(layer, "lora_enabled", False) or
        getattr(layer, "quantization_mode", None) or
        layer.compute_dtype != layer.variable_dtype):
      return None
    use_bias.append(bool(layer.use_bias))
    variables.append(layer.kernel)
    if layer.use_bias:
      variables.append(layer.bias)
  # The parameters must come in layer order: kernel, bias, kernel, ...
  if [id(v) for v in variables] != [id(v) for v in model.trainable_variables]:
    return None
  if not relu:
    return None
  return DenseChain(tuple(relu), tuple(use_bias))


def _layers(chain: DenseChain, params: Sequence[tf.Tensor]):
  """``[(kernel, bias or None)]`` from the flat parameter list."""
  out, i = [], 0
  for has_bias in chain.use_bias:
    out.append((params[i], params[i + 1] if has_bias else None))
    i += 2 if has_bias else 1
  return out


def _mm(a, b, transpose_a=False, transpose_b=False, plain=False):
  """``a @ b`` over the task axis, in the fewest and cheapest ops.

  ``a`` is ``[T, N, k]``; ``b`` is a per-task ``[T, k, m]`` or a shared
  ``[k, m]`` kernel (``[.., m, k]`` with ``transpose_b``); with
  ``transpose_a``, ``a^T b`` of two ``[T, N, .]`` tensors. For the graph
  executor, a shared kernel is one 2-D product over all ``T*N`` rows, and a
  contraction or output of size 1 (the sinusoid's 1-wide input and output
  layers) a broadcast product, not a batched-matmul call. ``plain``: one
  ``tf.matmul`` whatever the shapes, for XLA, which compiles those better
  than the broadcast forms (timings in BENCHMARKS.md).
  """
  if plain:
    return tf.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
  if transpose_a:                        # a^T b: per-task kernel gradients
    if a.shape[-1] == 1:
      return tf.reduce_sum(a * b, axis=1, keepdims=True)       # [T, 1, m]
    if b.shape[-1] == 1:
      return tf.expand_dims(tf.reduce_sum(a * b, axis=1), -1)  # [T, k, 1]
    return tf.matmul(a, b, transpose_a=True, transpose_b=transpose_b)
  k = a.shape[-1]
  shared = b.shape.rank == 2
  m = b.shape[-2] if transpose_b else b.shape[-1]
  if k == 1 or m == 1:
    # The kernel as a row that broadcasts against a's rows: [(T,) 1, k or m].
    row = b if (transpose_b == (m == 1)) else (
        tf.reshape(b, [1, -1]) if shared else
        tf.reshape(b, [-1, 1, b.shape[-1] * b.shape[-2]]))
    if k == 1:
      return a * row
    return tf.reduce_sum(a * row, axis=-1, keepdims=True)
  if shared:
    flat = tf.matmul(tf.reshape(a, [-1, k]), b, transpose_b=transpose_b)
    lead = (a.shape[:-1].as_list() if a.shape[:-1].is_fully_defined()
            else tf.unstack(tf.shape(a)[:-1]))
    return tf.reshape(flat, lead + [m])
  return tf.matmul(a, b, transpose_b=transpose_b)


def _relu_grad(dy, y):
  return tf.raw_ops.ReluGrad(gradients=dy, features=y)


def _sum(terms):
  terms = [t for t in terms if t is not None]
  return terms[0] if len(terms) == 1 else tf.add_n(terms)


class _Kernel:
  """One Dense kernel for every task: ``shared + per_task + sum L_i^T R_i``.

  ``shared`` is ``[in, out]`` (theta's kernel), ``per_task`` ``[T, in,
  out]``, and each term a pair ``L [T, r, in]``, ``R [T, r, out]``: the
  per-task kernel gradient ``a^T delta`` of ``r`` examples, kept as its two
  factors when ``r`` is below the kernel's width. Products with the kernel
  then go through ``[T, N, r]`` intermediates (``x W = x W_0 + (x L^T) R``)
  instead of a ``[T, in, out]`` gradient for every task, whose per-task
  outer products are the slowest kind of batched matmul on CPU; the
  meta-gradient's mean over tasks is one 2-D product over all tasks' rows.
  """

  def __init__(self, shared=None, per_task=None, terms=()):
    self.shared, self.per_task, self.terms = shared, per_task, tuple(terms)

  def right(self, x, mm):
    """``x @ W`` for ``x [T, N, in]``."""
    parts = [None if self.shared is None else mm(x, self.shared),
             None if self.per_task is None else mm(x, self.per_task)]
    parts += [tf.matmul(tf.matmul(x, l, transpose_b=True), r)
              for l, r in self.terms]
    return _sum(parts)

  def left(self, y, mm):
    """``y @ W^T`` for ``y [T, N, out]``."""
    parts = [None if self.shared is None else
             mm(y, self.shared, transpose_b=True),
             None if self.per_task is None else
             mm(y, self.per_task, transpose_b=True)]
    parts += [tf.matmul(tf.matmul(y, r, transpose_b=True), l)
              for l, r in self.terms]
    return _sum(parts)

  def plus(self, other: "_Kernel", scale: float) -> "_Kernel":
    """``self + scale * other``."""
    def add(a, b):
      if b is None:
        return a
      return scale * b if a is None else a + scale * b
    return _Kernel(add(self.shared, other.shared),
                   add(self.per_task, other.per_task),
                   self.terms + tuple((scale * l, r) for l, r in other.terms))

  def task_mean(self):
    """The mean over tasks, ``[in, out]``."""
    parts = [self.shared,
             None if self.per_task is None else
             tf.reduce_mean(self.per_task, axis=0)]
    if self.terms:
      flat = lambda t: tf.reshape(t, [-1, t.shape[-1]])
      ls = tf.concat([flat(l) for l, _ in self.terms], 0)
      rs = tf.concat([flat(r) for _, r in self.terms], 0)
      num_tasks = self.terms[0][0].shape[0] or tf.shape(self.terms[0][0])[0]
      parts.append(tf.matmul(ls, rs, transpose_a=True) /
                   tf.cast(num_tasks, ls.dtype))
    return _sum(parts)


def _outer(a, d, mm, low_rank):
  """The per-task kernel gradient ``a^T d`` (``a [T, N, in]``, ``d [T, N,
  out]``), factored when ``N`` is below both widths."""
  if low_rank and a.shape[1] is not None and (
      a.shape[1] < min(a.shape[-1], d.shape[-1])):
    return _Kernel(terms=((a, d),))
  return _Kernel(per_task=mm(a, d, transpose_a=True))


def _forward(chain, layers, x, mm):
  """Activations ``[x, a_1, ..., a_L]`` (``a_L`` the prediction)."""
  acts = [x]
  for (w, b), relu in zip(layers, chain.relu):
    z = w.right(acts[-1], mm)
    if b is not None:
      z = z + b
    acts.append(tf.nn.relu(z) if relu else z)
  return acts


def _scale(y):
  """d(mean squared error)/d(prediction) = scale * (prediction - y)."""
  return tf.constant(2.0 / (y.shape[1] * y.shape[2]), y.dtype)


def _backward(chain, layers, acts, y, mm, low_rank):
  """Per-task gradients ``[(dW kernel, db [T,1,out])]`` and the deltas."""
  delta = _scale(y) * (acts[-1] - y)
  grads, deltas = [None] * len(layers), [None] * len(layers)
  for l in reversed(range(len(layers))):
    if chain.relu[l]:
      delta = _relu_grad(delta, acts[l + 1])
    deltas[l] = delta
    db = (tf.reduce_sum(delta, axis=1, keepdims=True)
          if chain.use_bias[l] else None)
    grads[l] = (_outer(acts[l], delta, mm, low_rank), db)
    if l:
      delta = layers[l][0].left(delta, mm)
  return grads, deltas


def _hessian_vector(chain, layers, acts, deltas, y, v, mm, low_rank):
  """Per-task ``H_S v`` by the R-operator on the forward and backward pass."""
  n = len(layers)
  r_acts = [None]                     # R{x} = 0
  for l in range(n):
    vw, vb = v[l]
    rz = _sum([vw.right(acts[l], mm),
               None if r_acts[l] is None else
               layers[l][0].right(r_acts[l], mm)])
    if vb is not None:
      rz = rz + vb
    r_acts.append(_relu_grad(rz, acts[l + 1]) if chain.relu[l] else rz)
  r_delta = _scale(y) * r_acts[-1]
  out = [None] * n
  for l in reversed(range(n)):
    if chain.relu[l]:
      r_delta = _relu_grad(r_delta, acts[l + 1])
    r_db = (tf.reduce_sum(r_delta, axis=1, keepdims=True)
            if chain.use_bias[l] else None)
    r_dw = _outer(acts[l], r_delta, mm, low_rank)
    if r_acts[l] is not None:
      r_dw = r_dw.plus(_outer(r_acts[l], deltas[l], mm, low_rank), 1.0)
    out[l] = (r_dw, r_db)
    if l:
      r_delta = tf.add_n([layers[l][0].left(r_delta, mm),
                          v[l][0].left(deltas[l], mm)])
  return out


def _task_losses(pred, y):
  return tf.reduce_mean(tf.math.squared_difference(pred, y), axis=[1, 2])


def _as_3d(t):
  return t if t.shape.rank == 3 else tf.reshape(t, tf.concat(
      [tf.shape(t)[:2], [-1]], 0))


def meta_gradients(chain: DenseChain, params: Sequence[tf.Tensor], batch,
                   inner_lr, steps: int, first_order: bool,
                   record_steps: Sequence[int], xla: bool = False,
                   low_rank: bool = True):
  """The MAML meta-gradient and per-task query losses, in closed form.

  Arguments:
    chain: from :func:`analyse`.
    params: the shared weights theta, in the model's trainable order.
    batch: a :class:`maml_tf.TaskBatch` of ``[T, N, features]`` inputs and
      ``[T, N, outputs]`` (or ``[T, N]`` for one output) targets.
    inner_lr: the inner step size alpha (a scalar).
    steps: inner steps n (>= 1).
    first_order: drop the Hessian terms (FOMAML).
    record_steps: step counts whose query losses to return, among
      ``0`` and ``steps``.
    xla: write every product as one ``tf.matmul`` (fastest when the
      step is compiled by XLA); otherwise in the forms cheapest for the
      graph executor. The same numbers either way.

  Returns:
    ``(grads, losses)``: the gradient of the mean query loss after ``steps``
    steps with respect to ``params`` (same order), and ``[T, S]`` per-task
    query losses after each of ``record_steps``.
  """
  if any(s not in (0, steps) for s in record_steps):
    raise ValueError(f"record_steps must be among (0, {steps}), got "
                     f"{tuple(record_steps)}")
  sx, sy, qx, qy = (_as_3d(t) for t in batch)
  layers = [(_Kernel(shared=w), b) for w, b in _layers(chain, params)]
  mm = functools.partial(_mm, plain=xla)
  # Biases with a task axis: [T, 1, out] broadcasts against [T, N, out].
  history = []
  current = layers
  for _ in range(steps):
    acts = _forward(chain, current, sx, mm)
    grads, deltas = _backward(chain, current, acts, sy, mm, low_rank)
    history.append((current, acts, deltas))
    current = [(w.plus(dw, -inner_lr),
                None if b is None else b - inner_lr * db)
               for (w, b), (dw, db) in zip(current, grads)]
  q_acts = _forward(chain, current, qx, mm)
  v, _ = _backward(chain, current, q_acts, qy, mm, low_rank)
  if not first_order:
    for layers_k, acts, deltas in reversed(history):
      hv = _hessian_vector(chain, layers_k, acts, deltas, sy, v, mm, low_rank)
      v = [(vw.plus(hw, -inner_lr),
            None if vb is None else vb - inner_lr * hb)
           for (vw, vb), (hw, hb) in zip(v, hv)]
  losses = {steps: _task_losses(q_acts[-1], qy)}
  if 0 in record_steps and steps:
    losses[0] = _task_losses(_forward(chain, layers, qx, mm)[-1], qy)
  grads = []
  for (vw, vb), has_bias in zip(v, chain.use_bias):
    grads.append(vw.task_mean())
    if has_bias:
      grads.append(tf.reduce_mean(vb, axis=[0, 1]))
  return grads, tf.stack([losses[s] for s in record_steps], axis=1)
