"""Export adapted models as TensorFlow SavedModels.

``export_adapted(model, path)`` writes a SavedModel whose ``serve`` signature
returns the model's outputs in inference mode, so that::

    loaded = tf.saved_model.load(path)
    loaded.serve(x)            # == adapted(x, training=False)

works in any TF runtime (TF Serving, TFLite converter, a process without
maml_tf or Keras). Models from :meth:`maml_tf.MAML.adapt` carry BatchNorm
statistics refreshed from the support set, so inference mode predicts as the
adapted network did during adaptation.
"""

import os
import re
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from maml_tf.core import functional
from maml_tf.core import cloning


# Ops that call back into the Python process that traced them.
PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})


def check_portable(concrete_function, what: str) -> None:
  """Raises ``ValueError`` if ``concrete_function`` (or a function it calls)
  runs Python (``tf.py_function``, ``tf.numpy_function``): a SavedModel
  holding it reloads only inside the process that wrote it."""
  graph = concrete_function.graph.as_graph_def()
  ops = {node.op for node in graph.node}
  for function in graph.library.function:
    ops.update(node.op for node in function.node_def)
  found = sorted(ops & PYTHON_OPS)
  if found:
    raise ValueError(
        f"{what} calls Python ({', '.join(found)}: tf.py_function or "
        "tf.numpy_function in a layer); a SavedModel of it cannot run in "
        "another process, so it is not written. Replace the Python call with "
        "TensorFlow ops")


def _leaf_paths(structure, prefix: str = "") -> list:
  """``"a_b"``-style paths of the leaves of nested dicts and sequences, in
  ``tf.nest.flatten``'s order (dict keys sorted)."""
  if isinstance(structure, dict):
    items = [(str(k), structure[k]) for k in sorted(structure)]
  elif isinstance(structure, (list, tuple)):
    items = [(str(i), v) for i, v in enumerate(structure)]
  else:
    return [prefix]
  return [path for key, value in items
          for path in _leaf_paths(value, f"{prefix}_{key}" if prefix else key)]


_AUTOMATIC_NAME = re.compile(r"(keras_tensor|input_layer)(_\d+)?$")


def _input_names(model: keras.Model, inputs) -> list:
  """The serving signature's argument names: ``x`` for one input; for a
  model whose inputs are a dict, its keys (nested ones joined by ``_``);
  else the names given to its ``keras.Input``s; else, or where those are
  not distinct, ``x0``, ``x1``, ... Characters other than letters, digits
  and ``_`` become ``_``."""
  if len(inputs) == 1:
    return ["x"]
  try:
    structure = model.input
  except (AttributeError, ValueError):
    structure = None
  names = None
  if isinstance(structure, dict):
    paths = _leaf_paths(structure)
    flat = tf.nest.flatten(structure)
    # Only where the graph's input order is the flattened dict's.
    if len(paths) == len(inputs) and all(
        a is b for a, b in zip(flat, inputs)):
      names = paths
  elif not any(_AUTOMATIC_NAME.match(getattr(i, "name", "") or "")
               for i in inputs):
    names = [getattr(i, "name", None) or "" for i in inputs]
  if names is not None:
    names = [re.sub(r"[^A-Za-z0-9_]", "_", n) for n in names]
  if names is None or len(set(names)) != len(names) or not all(
      re.match(r"[A-Za-z]", n) for n in names):
    names = [f"x{j}" for j in range(len(inputs))]
  return names


def _default_signature(model: keras.Model):
  inputs = getattr(model, "inputs", None)
  if inputs:
    return [tf.TensorSpec((None,) + tuple(i.shape[1:]), i.dtype, name=name)
            for i, name in zip(inputs, _input_names(model, inputs))]
  shape = cloning.example_input_shape(model)
  if shape is None or not all(d is None or isinstance(d, int)
                              for d in shape):   # (several inputs: nested)
    raise ValueError(
        f"cannot infer the input signature of model {model.name!r} (a "
        "subclassed model without keras.Input, built on "
        f"{shape!r}); pass input_signature=[tf.TensorSpec((None, ...), "
        "tf.float32)] (one spec per input)")
  return [tf.TensorSpec((None,) + tuple(shape[1:]), model.compute_dtype,
                        name="x")]


def export_adapted(model: keras.Model, path: str,
                   input_signature: Optional[Sequence[tf.TensorSpec]] = None,
                   verify_with: Optional[np.ndarray] = None,
                   atol: float = 1e-5,
                   batchnorm: str = "inference") -> str:
  """Saves ``model`` as a SavedModel with a ``serve`` signature.

  Arguments:
    model: typically the result of ``MAML.adapt``.
    path: output folder (created; an existing SavedModel is replaced).
    input_signature: ``tf.TensorSpec`` list; inferred from ``model.inputs``
      (or the build shape) when omitted.
    verify_with: optional input batch (for several inputs: their tuple,
      list or dict): reload the SavedModel and check its outputs equal
      ``model(verify_with, training=False)`` within ``atol``.
    atol: tolerance of that check.
    batchnorm: ``"inference"`` (default): ``serve`` normalises with the
      model's moving statistics (for ``MAML.adapt`` models: the support set's
      statistics), so it predicts one example at a time. ``"transductive"``:
      ``serve`` normalises with the statistics of the batch it is given, as
      MAML's evaluation (and the paper) does with the query set: give it the
      whole query batch. The model's variables are not written either way.

  Returns:
    ``path``.

  Example:
    >>> adapted = maml.adapt(support_x, support_y, steps=10)
    >>> export_adapted(adapted, "/tmp/adapted", verify_with=query_x)
    >>> loaded = tf.saved_model.load("/tmp/adapted")   # keep a reference
    >>> loaded.serve(query_x)
  """
  if not isinstance(model, keras.Model):
    raise TypeError(
        "export_adapted takes a keras.Model (e.g. maml.adapt(support_x, "
        f"support_y)'s result), got a {type(model).__name__}"
        + ("; export_adaptable(maml, path, support_x, support_y) exports a "
           "model that adapts itself" if hasattr(model, "inner_loop") else ""))
  if batchnorm not in ("inference", "transductive"):
    raise ValueError("batchnorm must be 'inference' or 'transductive', got "
                     f"{batchnorm!r}")
  signature = list(input_signature or _default_signature(model))
  archive = keras.export.ExportArchive()
  archive.track(model)
  if batchnorm == "transductive":
    call = lambda x: functional.functional_call(
        model, model.trainable_variables, model.non_trainable_variables, x,
        training=True)[0]
  else:
    call = lambda x: model(x, training=False)
  try:
    structure = model.input        # the inputs' nesting (list, dict)
  except (AttributeError, ValueError):
    structure = None
  if not tf.nest.is_nested(structure):
    structure = None
  if len(signature) == 1 and structure is None:
    fn = call
  else:                            # several inputs, or one in a dict
    fn = lambda *xs: call(tf.nest.pack_sequence_as(structure, list(xs))
                          if structure is not None else list(xs))
  serve = archive.add_endpoint("serve", fn, input_signature=signature)
  check_portable(serve.get_concrete_function(), f"model {model.name!r}")
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  archive.write_out(path, verbose=False)
  if verify_with is not None:
    loaded = tf.saved_model.load(path)
    xs = [tf.cast(x, spec.dtype) for x, spec in
          zip(tf.nest.flatten(verify_with), signature)]
    if len(xs) != len(signature):
      raise ValueError(f"verify_with has {len(xs)} inputs; the model takes "
                       f"{len(signature)}")
    got = np.asarray(loaded.serve(*xs))
    want = np.asarray(fn(*xs))
    if not np.allclose(got, want, atol=atol):
      raise AssertionError(
          f"exported SavedModel at {path} differs from the model by "
          f"{np.max(np.abs(got - want)):.3g} (> {atol})")
  return path
