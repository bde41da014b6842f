"""Functional evaluation of any Keras 3 model with explicit weights.

MAML needs the model as a pure function ``f(params, state, x)`` so that the
inner loop can evaluate it at fast weights ``theta'`` without touching the
model's variables. Keras 3 offers exactly that as ``model.stateless_call``;
this module wraps it and fixes one trap of the TensorFlow backend:

Keras computes the moments of BatchNormalization and LayerNormalization with
``tf.nn.moments``, which subtracts a ``stop_gradient(mean)`` when computing the
variance. The first derivative is unaffected (its missing term is zero), but
the *second* derivative is wrong: the Hessian of the variance loses its
``-11^T/n`` term. MAML differentiates the inner gradient, so every call made
through :func:`functional_call` swaps in exact moments while it traces.
``tests/core/test_meta_gradients.py`` checks this against finite differences.
"""

import inspect
import warnings
import weakref
from typing import Sequence, Tuple

import keras
import tensorflow as tf

from maml_tf.core import keras_compat
from maml_tf.core.keras_compat import exact_moments  # pylint: disable=unused-import


def functional_call(model: keras.Model,
                    params: Sequence[tf.Tensor],
                    state: Sequence[tf.Tensor],
                    x,
                    training: bool = True) -> Tuple[tf.Tensor, list]:
  """Runs ``model`` on ``x`` with weights ``params`` and state ``state``.

  Arguments:
    model: a built Keras 3 model.
    params: tensors in the order of ``model.trainable_variables``.
    state: tensors in the order of ``model.non_trainable_variables``
      (BatchNorm moving statistics, frozen layers' weights, RNG seeds).
    x: the input batch.
    training: forwarded to the layers (``True`` uses batch statistics). As
      Keras does, it is passed to ``model.call`` only when ``call`` takes a
      ``training`` argument; otherwise the model runs through ``model(x)``
      with ``training`` set for its layers (Dropout, BatchNorm, ...).

  Returns:
    ``(outputs, new_state)``. The model's own variables are never written.
    Losses the call adds (``Layer.add_loss``, activity regularizers) are
    not returned: the first call that adds any warns with a
    :class:`maml_tf.PlanWarning` (weight regularizers are part of MAML's
    objective, see :class:`maml_tf.core.objective.Objective`).

  Example:
    >>> params = [v.value for v in model.trainable_variables]
    >>> state = [v.value for v in model.non_trainable_variables]
    >>> y, state = functional_call(model, params, state, x)
  """
  with exact_moments():
    if call_takes_training(model):
      outputs, new_state, call_losses = model.stateless_call(
          list(params), list(state), x, training=training, return_losses=True)
      _warn_about_dropped_losses(
          model, keras_compat.added_losses(model, call_losses))
      return outputs, list(new_state)
    mapping = (list(zip(model.trainable_variables, params))
               + list(zip(model.non_trainable_variables, state)))
    with keras.StatelessScope(state_mapping=mapping,
                              collect_losses=True) as scope:
      outputs = model(x, training=training)
    _warn_about_dropped_losses(model, scope.losses)
  new_state = []
  for variable, old in zip(model.non_trainable_variables, state):
    value = scope.get_current_value(variable)
    new_state.append(old if value is None else value)
  return outputs, new_state


def call_takes_training(model: keras.Model) -> bool:
  """Does ``model.call`` accept ``training`` (by name or ``**kwargs``)?"""
  try:
    parameters = inspect.signature(model.call).parameters.values()
  except (TypeError, ValueError):
    return True
  return any(p.name == "training" or p.kind is inspect.Parameter.VAR_KEYWORD
             for p in parameters)


_WARNED_LOSSES = weakref.WeakKeyDictionary()   # model -> kinds warned of


def warn_dropped_losses(model, what: str, kind: str) -> None:
  """A :class:`maml_tf.PlanWarning` (once per model and ``kind``) that
  ``what`` (losses a forward pass of ``model`` adds) is left out of MAML's
  objective."""
  kinds = _WARNED_LOSSES.setdefault(model, set())
  if kind in kinds:
    return
  kinds.add(kind)
  from maml_tf.core.plan import PlanWarning  # pylint: disable=g-import-not-at-top
  warnings.warn(
      f"maml_tf: {what} are not part of the meta-objective or the inner "
      "steps, which use the loss function (and the weight regularizers, "
      "added on the meta-parameters) only; add such a penalty to the loss "
      "function instead", PlanWarning, stacklevel=3)


def _warn_about_dropped_losses(model, call_losses) -> None:
  """Warns of losses a call added beyond one per activity regularizer
  (named when the learner is built)."""
  if not call_losses:
    return
  regularized = sum(
      1 for layer in keras_compat.flatten_layers(model)
      if getattr(layer, "activity_regularizer", None) is not None)
  if len(call_losses) > regularized:
    warn_dropped_losses(model, f"the {len(call_losses)} loss term(s) that "
                        f"{model.name!r} adds in its call (Layer.add_loss or "
                        "activity regularizers)", "call")


class NoInputShape(ValueError):
  """:func:`traced_call` has no single input shape of known rank to trace
  a model on."""


class CallAddsLosses(ValueError):
  """A call traced by :func:`traced_call` adds losses (``add_loss``)."""


def traced_call(model: keras.layers.Layer, training: bool,
                shape=None, refuse_losses: bool = False) -> keras.Model:
  """``model.call`` run on a symbolic input of ``shape`` (default the shape
  it was built on) inside Keras' call context of ``training`` (also passed
  to a call that takes it), as a functional model of the same layers and
  variables.

  Raises:
    NoInputShape: (a ``ValueError``) no single input shape to trace on.
    ValueError: what the call raises on symbolic inputs (TensorFlow ops,
      Python on values).
    CallAddsLosses: (a ``ValueError``) with ``refuse_losses``, the call
      adds losses with ``add_loss`` (removed from its layers again either
      way: a functional model of its layers leaves them out).
  """
  if shape is None:
    shape = keras_compat.build_input_shape(model)
  if not isinstance(shape, (tuple, list)) or len(shape) < 2 or not all(
      d is None or isinstance(d, int) for d in shape):
    raise NoInputShape(f"{model.name!r} was not built on one input of known "
                     f"shape (built with {shape!r})")
  inputs = keras.Input(tuple(shape)[1:],
                       dtype=model.dtype_policy.compute_dtype)
  with keras_compat.eager_losses_undone(model) as added, (
      keras_compat.name_scopes_restored_on_error()):
    with keras_compat.call_context(model, training):
      outputs = (model.call(inputs, training=training)
                 if call_takes_training(model) else model.call(inputs))
  if added[0] and refuse_losses:
    raise CallAddsLosses(
        f"the call of {model.name!r} adds {added[0]} loss term(s) "
        "(Layer.add_loss), which a functional model of its layers would "
        "leave out")
  return keras.Model(inputs, outputs, name=f"{model.name}_traced")


def read_weights(model: keras.Model):
  """Current ``(params, state)`` tensors of ``model`` (reads are taped)."""
  params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
  state = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
  return params, state


def state_kinds(model: keras.Model) -> Tuple[str, ...]:
  """How a meta-step writes each non-trainable variable of ``model``.

  ``"mean"``: BatchNorm moving statistics, the mean over the tasks;
  ``"seed"``: the state of a random layer's ``keras.random.SeedGenerator``
  (Dropout, GaussianNoise, ...), advanced once per meta-step;
  ``"first"``: other non-float state, the first task's; ``"keep"``:
  anything else (frozen weights), never written.
  """
  bn_ids, seed_ids = set(), set()
  for layer in keras_compat.flatten_layers(model):
    if isinstance(layer, keras.layers.BatchNormalization):
      bn_ids.update(id(v) for v in (layer.moving_mean, layer.moving_variance))
    for value in vars(layer).values():
      if isinstance(value, keras.random.SeedGenerator):
        seed_ids.add(id(value.state))
  return tuple("mean" if id(v) in bn_ids else
               "seed" if id(v) in seed_ids else
               "first" if not v.dtype.startswith("float") else "keep"
               for v in model.non_trainable_variables)


_RATES = ("rate", "stddev", "dropout", "recurrent_dropout")


def draws_random(model: keras.Model) -> bool:
  """Does a layer of ``model`` draw random numbers in training mode?

  A layer with a ``keras.random.SeedGenerator`` draws unless all of its
  rates (``rate``, ``stddev``, ``dropout``, ``recurrent_dropout``) are 0
  (e.g. a GRU without dropout).
  """
  for layer in keras_compat.flatten_layers(model):
    if not any(isinstance(v, keras.random.SeedGenerator)
               for v in vars(layer).values()):
      continue
    rates = [getattr(layer, name) for name in _RATES
             if isinstance(getattr(layer, name, None), (int, float))]
    if not rates or any(r > 0 for r in rates):
      return True
  return False


def ensure_built(model: keras.Model) -> keras.Model:
  """Raises a clear error when ``model`` has no weights yet."""
  if not isinstance(model, keras.Model):
    raise TypeError(
        f"maml_tf needs a keras.Model (Sequential, functional or subclassed); "
        f"got {type(model).__name__}")
  if not model.built or not model.weights:
    raise ValueError(
        f"model {model.name!r} has no trainable weights yet: build it first, "
        "e.g. give Sequential an keras.Input or call model(example_batch) once")
  if not model.trainable_variables:
    raise ValueError(
        f"model {model.name!r} has no trainable weights: all of its "
        f"{len(model.weights)} weights are frozen (trainable=False), so there "
        "is nothing to meta-learn; set trainable=True on the layers MAML "
        "should learn")
  return model
