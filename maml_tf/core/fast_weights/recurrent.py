"""Recurrent layers with per-task weights: SimpleRNN, GRU, LSTM (and
``keras.layers.RNN`` over one of their cells, or over a stack of them),
Bidirectional over them, and
TimeDistributed over a supported layer without batch statistics or random
draws.

A recurrent layer runs all tasks at once: the input projection of every time
step as one batched matmul ``[T, N, L, D] x [T, D, G]``, then one
``tf.scan`` over time whose step is the cell's recurrence on ``[T, N, U]``
states (a batched matmul ``[T, N, U] x [T, U, G]``). The cell equations are
Keras' own (``LSTMCell``, ``GRUCell`` with either ``reset_after``,
``SimpleRNNCell``); a scan differentiates to every order, as Keras' own loop
does.
"""

import keras
import tensorflow as tf

from maml_tf.core.fast_weights.base import _Op, _unsupported
from maml_tf.core.fast_weights.kernels import (
    _dims, _per_task_vector, batched_dense)

_CELLS = (keras.layers.SimpleRNNCell, keras.layers.GRUCell,
          keras.layers.LSTMCell)
_LAYERS = (keras.layers.SimpleRNN, keras.layers.GRU, keras.layers.LSTM)


def recurrent_cells(layer):
  """The cells of a recurrent layer the task-batched path runs (a list,
  first cell first), else None: SimpleRNN, GRU, LSTM, or
  ``keras.layers.RNN`` over one of their cells or a StackedRNNCells of
  them."""
  # pylint: disable=unidiomatic-typecheck
  if type(layer) in _LAYERS:
    return [layer.cell]
  if type(layer) is not keras.layers.RNN:
    return None
  cells = (layer.cell.cells if type(layer.cell) is keras.layers.StackedRNNCells
           else [layer.cell])
  return cells if all(type(c) in _CELLS for c in cells) else None


def check_recurrent(layer):
  """Raises Unsupported where the batched recurrence would differ from the
  layer's: statefulness, dropout inside a cell, returned states."""
  if layer.stateful:
    raise _unsupported(layer, "stateful=True")
  if layer.return_state:
    raise _unsupported(layer, "return_state=True (several outputs)")
  if any(c.dropout or c.recurrent_dropout for c in recurrent_cells(layer)):
    raise _unsupported(layer, "dropout or recurrent_dropout inside the cell "
                       "(a Dropout layer before it is task-batched)")


class _Recurrent(_Op):
  """One recurrent layer over ``[T, N, L, D]`` inputs: ``[T, N, L, U]``
  (``return_sequences``, in the order processed, as Keras returns it) or
  the last output ``[T, N, U]``.

  A second input, a ``[T, N, L]`` Keras mask, skips masked steps as Keras'
  loop does: their states are the previous step's, their output the
  previous output (zeros with ``zero_output_for_mask``).

  ``cell``, ``go_backwards``, ``return_sequences``, ``zero_output``: the
  layer's own unless given (one cell of a stack).
  """

  promotes_integers = True

  def __init__(self, layer, kernel_ref, recurrent_ref, bias_ref, cell=None,
               go_backwards=None, return_sequences=None, zero_output=None):
    super().__init__(layer)
    self.kernel_ref, self.recurrent_ref, self.bias_ref = (
        kernel_ref, recurrent_ref, bias_ref)
    given = lambda value, default: default if value is None else value
    self.cell = given(cell, layer.cell)
    self.go_backwards = given(go_backwards, layer.go_backwards)
    self.return_sequences = given(return_sequences, layer.return_sequences)
    self.zero_output = given(zero_output, layer.zero_output_for_mask)
    self.units = int(self.cell.units)

  def __call__(self, ctx, inputs):
    x = inputs[0]
    if x.shape.rank != 4 or x.shape[-1] is None:
      raise _unsupported(self.layer, f"needs inputs [T, N, L, D] with static "
                         f"D; got {x.shape}")
    kernel, per_task = ctx.read(self.kernel_ref)
    projected = batched_dense(x, kernel, per_task)           # [T, N, L, G]
    input_bias = recurrent_bias = None
    if self.bias_ref is not None:
      bias, bias_per_task = ctx.read(self.bias_ref)
      input_bias = bias
      if isinstance(self.cell, keras.layers.GRUCell) and self.cell.reset_after:
        # [(T,) 2, 3U]: the input and the recurrent biases.
        input_bias, recurrent_bias = tf.unstack(bias, axis=int(bias_per_task))
        recurrent_bias = _per_task_vector(recurrent_bias, bias_per_task, 3)
      projected += _per_task_vector(input_bias, bias_per_task, 4)
    mask = inputs[1] if len(inputs) > 1 else None
    if self.go_backwards:
      projected = tf.reverse(projected, [2])
      mask = None if mask is None else tf.reverse(mask, [2])
    recurrent, rec_per_task = ctx.read(self.recurrent_ref)
    step = self._step(recurrent, rec_per_task, recurrent_bias)
    zeros = tf.zeros(_dims(projected)[:2] + [self.units], projected.dtype)
    carry = ((zeros, zeros) if isinstance(self.cell, keras.layers.LSTMCell)
             else (zeros,))
    time_major = tf.transpose(projected, [2, 0, 1, 3])
    if mask is None:
      outputs = tf.scan(step, time_major, initializer=carry)[0]
    else:                      # (output, *states): [L, T, N, U] each
      keep_zero = self.zero_output

      def masked_step(carry, elems):
        output, states = carry[0], carry[1:]
        x_t, m_t = elems
        new = step(states, x_t)
        m_t = m_t[..., None]
        output = tf.where(m_t, new[0], zeros if keep_zero else output)
        return (output,) + tuple(tf.where(m_t, a, b)
                                 for a, b in zip(new, states))
      outputs = tf.scan(masked_step, (time_major, tf.transpose(
          tf.cast(mask, tf.bool), [2, 0, 1])), initializer=(zeros,) + carry)[0]
    if self.return_sequences:
      return tf.transpose(outputs, [1, 2, 0, 3])
    return outputs[-1]

  def _step(self, recurrent, per_task, recurrent_bias):
    """``(carry, x_t) -> carry`` of the cell; ``x_t`` holds the input
    projection (and input bias) of one time step, ``[T, N, G]``."""
    cell, units = self.cell, self.units
    act, gate = cell.activation, getattr(cell, "recurrent_activation", None)
    matmul = lambda h, k: batched_dense(h, k, per_task)
    if isinstance(cell, keras.layers.LSTMCell):
      def lstm(carry, x_t):
        h, c = carry
        z = x_t + matmul(h, recurrent)
        z0, z1, z2, z3 = tf.split(z, 4, axis=-1)
        c = gate(z1) * c + gate(z0) * act(z2)
        return gate(z3) * act(c), c
      return lstm
    if isinstance(cell, keras.layers.GRUCell):
      def gru(carry, x_t):
        h, = carry
        x_z, x_r, x_h = tf.split(x_t, 3, axis=-1)
        if cell.reset_after:
          inner = matmul(h, recurrent)
          if recurrent_bias is not None:
            inner += recurrent_bias
          r_z, r_r, r_h = tf.split(inner, 3, axis=-1)
          z, r = gate(x_z + r_z), gate(x_r + r_r)
          hh = act(x_h + r * r_h)
        else:
          r_z, r_r = tf.split(matmul(h, recurrent[..., :2 * units]), 2,
                              axis=-1)
          z, r = gate(x_z + r_z), gate(x_r + r_r)
          hh = act(x_h + matmul(r * h, recurrent[..., 2 * units:]))
        return (z * h + (1 - z) * hh,)
      return gru

    def simple(carry, x_t):
      h, = carry
      y = x_t + matmul(h, recurrent)
      return (act(y) if act is not None else y,)
    return simple


class _Stacked(_Op):
  """``keras.layers.RNN`` over StackedRNNCells: the cells as recurrent ops
  one after another, each over the whole sequence the one before returns
  (in the order processed: the first cell goes backwards if the layer
  does, the mask then goes reversed to the others). A stack's cell at a
  masked step keeps its states, as here, so the outputs are Keras'."""

  promotes_integers = True

  def __init__(self, layer, parts):
    super().__init__(layer)
    self.parts = parts

  def __call__(self, ctx, inputs):
    x, mask = inputs[0], (inputs[1] if len(inputs) > 1 else None)
    for i, part in enumerate(self.parts):
      x = part(ctx, [x] + ([mask] if mask is not None else []))
      if i == 0 and mask is not None and self.layer.go_backwards:
        mask = tf.reverse(mask, [2])
    return x


class _Bidirectional(_Op):
  """Bidirectional over two recurrent ops: the backward layer's sequence
  flipped back to the inputs' order, then merged (concat, sum, ave, mul)."""

  promotes_integers = True

  def __init__(self, layer, forward, backward):
    super().__init__(layer)
    self.forward, self.backward = forward, backward

  def __call__(self, ctx, inputs):     # inputs: x (and its mask)
    y, y_rev = self.forward(ctx, inputs), self.backward(ctx, inputs)
    if self.layer.return_sequences:
      y_rev = tf.reverse(y_rev, [2])
    mode = self.layer.merge_mode
    if mode == "concat":
      return tf.concat([y, y_rev], axis=-1)
    if mode == "sum":
      return y + y_rev
    if mode == "ave":
      return (y + y_rev) / 2
    return y * y_rev                                          # "mul"


class _TimeDistributed(_Op):
  """TimeDistributed: the inner layer's op on ``[T, N*L, ...]`` (each
  task's examples and time steps merged), then ``[T, N, L, ...]`` again.
  Keras calls the layer once per time step: the same numbers for a layer
  without batch statistics or random draws (the compiler refuses
  those)."""

  def __init__(self, layer, inner):
    super().__init__(layer)
    self.inner = inner

  @property
  def promotes_integers(self):
    return self.inner.promotes_integers

  def __call__(self, ctx, inputs):
    x = inputs[0]
    if x.shape.rank < 4:
      raise _unsupported(self.layer, f"needs inputs [T, N, L, ...]; got "
                         f"{x.shape}")
    dims = _dims(x)
    merged = tf.reshape(x, [dims[0], -1] + dims[3:])
    y = self.inner(ctx, [merged])
    return tf.reshape(y, dims[:3] + _dims(y)[2:])

