"""Finite guards: a NaN/Inf meta-loss or meta-gradient stops the step.

Graph-executor steps check with ``tf.debugging.check_numerics`` (the step's
update never runs) and :func:`floating_point_errors` turns the error into a
``FloatingPointError`` naming the tensor. XLA compiles ``check_numerics`` to
nothing, so XLA loops compute :func:`finite_flags` instead, take the update
only where every flag holds, and :func:`raise_for_flags` names the first
non-finite one after the call.
"""

import contextlib
from typing import Sequence

import numpy as np
import tensorflow as tf

META_LOSS = "the meta-loss (query loss after adaptation)"


def meta_gradient_name(variable) -> str:
  return f"the meta-gradient of {variable.path}"


def check_meta_loss(loss, what: str = META_LOSS):
  """``loss``, raising at run time when it is NaN or Inf."""
  return tf.debugging.check_numerics(loss, f"maml_tf: {what} is NaN or Inf")


def check_gradients(grads, variables) -> list:
  """``grads``, raising at run time naming the first non-finite one."""
  return [tf.debugging.check_numerics(
      g, f"maml_tf: {meta_gradient_name(v)} is NaN or Inf")
          for g, v in zip(grads, variables)]


def finite_flags(loss, grads) -> tf.Tensor:
  """``[1 + len(grads)]`` bools: the loss (True if None) and each gradient."""
  loss_ok = (tf.constant(True) if loss is None
             else tf.reduce_all(tf.math.is_finite(loss)))
  return tf.stack([loss_ok] + [tf.reduce_all(tf.math.is_finite(g))
                               for g in grads])


def nan_where_skipped(metrics: dict, flags: tf.Tensor) -> dict:
  """``metrics`` with the floating ones NaN where ``flags`` (an XLA step's
  :func:`finite_flags`) are not all true: a reader of the metrics alone sees
  that the step was skipped. Raises ``TypeError`` if none is floating."""
  if not any(v.dtype.is_floating for v in metrics.values()):
    raise TypeError("a step with finite flags needs a floating metric "
                    f"(got {sorted(metrics)})")
  ok = tf.reduce_all(flags)
  return {k: tf.where(ok, v, tf.constant(float("nan"), v.dtype))
          if v.dtype.is_floating else v for k, v in metrics.items()}


def message(msg: str) -> str:
  return (f"maml_tf:{msg}. The meta-parameters were not updated by this "
          "step. Lower inner_lr or the meta learning rate, or check the "
          "data for NaN/Inf.")


def raise_for_flags(flags, variables: Sequence) -> None:
  """Raises ``FloatingPointError`` naming the first False of ``flags``."""
  flags = np.asarray(flags)
  if flags.all():
    return
  names = [META_LOSS] + [meta_gradient_name(v) for v in variables]
  raise FloatingPointError(message(f" {names[int(np.argmin(flags))]} is NaN "
                                   "or Inf"))


def raise_floating_point_error(e: tf.errors.InvalidArgumentError) -> None:
  """Raises ``FloatingPointError`` if ``e`` is one of the graph's NaN/Inf
  checks; returns otherwise (the caller re-raises ``e``)."""
  if "maml_tf:" in str(e):
    msg = str(e).split("maml_tf:")[1].split("\n")[0].split(" : ")[0]
    raise FloatingPointError(message(msg)) from None


@contextlib.contextmanager
def floating_point_errors():
  """Turns the graph's NaN/Inf checks into ``FloatingPointError``."""
  try:
    yield
  except tf.errors.InvalidArgumentError as e:
    raise_floating_point_error(e)
    raise
