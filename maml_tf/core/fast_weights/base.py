"""What the compiled layer ops of :mod:`maml_tf.core.fast_weights` share.

:class:`Unsupported` (what :func:`~maml_tf.core.fast_weights.compile_batched`
raises), the per-call :class:`_Context` of variable values and the
:class:`_Op` base class of one compiled layer.
"""

from typing import Tuple

import tensorflow as tf


class Unsupported(Exception):
  """What :func:`~maml_tf.core.fast_weights.compile_batched` cannot batch.

  The message names the layer and says why; callers fall back to a per-task
  loop (``tf.map_fn`` over :func:`maml_tf.core.functional.functional_call`).
  """


def _unsupported(layer, why: str) -> Unsupported:
  """Names ``layer`` (or a Keras operation of a functional graph)."""
  import keras  # pylint: disable=g-import-not-at-top
  what = "layer" if isinstance(layer, keras.layers.Layer) else "operation"
  return Unsupported(
      f"maml_tf.fast_weights cannot batch {what} {layer.name!r} "
      f"({type(layer).__name__}): {why}")


class _Context:
  """The values one call of a compiled model works on.

  (One call of a :class:`~maml_tf.core.fast_weights.BatchedModel`.)
  """

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


class _Op:
  """One compiled layer: ``op(ctx, inputs) -> output`` (inputs: a list).

  ``input_dtype``: where set, the program casts floating inputs to it
  first, as Keras' ``Layer.__call__`` does (its autocast).
  ``promotes_integers``: the layer's Keras ops promote integer inputs to
  its compute dtype (a matmul of ids and a float kernel); the program
  casts them first.
  """

  input_dtype = None
  promotes_integers = False

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, ctx: _Context, inputs: list):
    raise NotImplementedError
