"""The one place where maml_tf touches private Keras and TensorFlow names.

Everything here depends on internals of the pinned versions (Keras 3.15, TF
2.21; see BUILD_NOTES.md). Each function says what it needs and what it does
when a future version moves it: warn and fall back where a fallback keeps
results right, else raise naming the missing piece. No other module of
maml_tf reads a private Keras/TF attribute.
"""

import contextlib
import itertools
import threading
import warnings
from typing import Callable, Iterator, List, Optional, Tuple

import keras
import tensorflow as tf

# MirroredStrategy traces replica functions in their own threads, which
# take the moments patch. The loss-scaling patch is entered by every replica
# thread and held across their synchronisation points, so it is counted
# (the lock guards the count) rather than held.
_MOMENTS_LOCK = threading.RLock()
_LOSS_SCALE_LOCK = threading.Lock()
_loss_scale_patch = {"depth": 0, "original": None}


# ----------------------------------------------------------------- layers
def flatten_layers(model: keras.Model) -> List[keras.layers.Layer]:
  """Every layer inside ``model`` (nested models' layers too), not the model.

  In the order Keras tracks them (creation order for subclassed models).
  """
  return list(model._flatten_layers(include_self=False))  # pylint: disable=protected-access


def nodes_by_depth(model: keras.Model) -> Optional[dict]:
  """A functional model's ``{depth: [node]}`` layer graph, else ``None``."""
  return getattr(model, "_nodes_by_depth", None)


def graph_nodes(graph: keras.Model):
  """The call nodes of a functional ``graph``, from its inputs on (by
  depth), without the input nodes."""
  by_depth = nodes_by_depth(graph)
  for depth in sorted(by_depth, reverse=True):
    for node in by_depth[depth]:
      if node.operation is not None and not node.is_input:
        yield node


def functional_graph(model: keras.Model) -> Optional[keras.Model]:
  """The functional graph a model runs: itself (functional), the one a
  Sequential builds on its ``Input``, else ``None`` (subclassed, or a
  Sequential built without an ``Input``)."""
  graph = getattr(model, "_functional", None)
  graph = model if graph is None else graph
  return graph if nodes_by_depth(graph) is not None else None


def autocast_dtype(layer) -> Optional[str]:
  """The dtype ``layer.__call__`` casts floating inputs to (Keras'
  autocast), or ``None`` where it casts none (functional models, layers
  with ``autocast=False``)."""
  if not getattr(layer, "_convert_input_args", True) or not getattr(
      layer, "autocast", True):
    return None
  dtype = getattr(layer, "input_dtype", None)
  return dtype if dtype is not None and "float" in str(dtype) else None


def keras_mask(tensor):
  """The Keras mask a (symbolic) tensor carries, or ``None``."""
  return getattr(tensor, "_keras_mask", None)


@contextlib.contextmanager
def eager_losses_undone(model: keras.layers.Layer) -> Iterator[list]:
  """Losses that ``model``'s layers add outside a stateless scope within
  the block (``add_loss`` of a tensor computed from variables while a call
  is traced on symbolic inputs) are removed again at its end; the yielded
  list then holds their count."""
  layers = [model] + flatten_layers(model)
  before = [len(l._losses) for l in layers]  # pylint: disable=protected-access
  count = []
  try:
    yield count
  finally:
    added = 0
    for layer, n in zip(layers, before):
      extra = layer._losses[n:]  # pylint: disable=protected-access
      added += len(extra)
      for x in extra:
        layer._loss_ids.discard(id(x))  # pylint: disable=protected-access
      del layer._losses[n:]  # pylint: disable=protected-access
    count.append(added)


def added_losses(model: keras.Model, losses: list) -> list:
  """The losses of ``model.stateless_call(..., return_losses=True)`` that its
  call added (``add_loss``, activity regularizers), without the weight
  regularizers' terms, which Keras appends last, one per regularized
  trainable weight."""
  regularized = sum(1 for v in model.trainable_weights
                    if getattr(v, "regularizer", None) is not None)
  return list(losses)[:max(0, len(losses) - regularized)]


def build_input_shape(model: keras.Model):
  """The input shape a subclassed model was built with, or ``None``."""
  shapes = getattr(model, "_build_shapes_dict", None) or {}
  return next(iter(shapes.values()), None)


# Keras operations (``keras.ops``, ``x + y`` on KerasTensors) that act on
# each example alone whatever their arguments: elementwise, with every
# tensor operand of the output's rank (so the batch axes line up).
_ELEMENTWISE_OPS = frozenset("""
    Abs Absolute Add Subtract Multiply Divide TrueDivide DivideNoNan
    FloorDivide Mod Fmod Power Maximum Minimum Fmax Fmin Negative Reciprocal
    Exp Exp2 Expm1 Log Log1p Log2 Log10 Sqrt Rsqrt Square Cbrt Sign Sin Cos
    Tan Sinh Cosh Tanh Arctan Arcsin Arccos Arctanh Arcsinh Arccosh Floor
    Ceil Round Trunc Clip Cast Erf Erfc Logaddexp Hypot Heaviside
    Relu Relu6 Sigmoid Softplus Softsign Silu Gelu Elu Selu Celu LeakyRelu
    HardSigmoid HardSilu HardTanh LogSigmoid SoftShrink HardShrink TanhShrink
    Squareplus SparsePlus SparseSigmoid Threshold StopGradient Equal
    NotEqual Greater GreaterEqual Less LessEqual LogicalAnd LogicalOr
    LogicalNot LogicalXor Isnan Isinf Isfinite NanToNum""".split())
# Operations over the axes given by their ``axis``: per example when no
# axis is the batch axis (0) and an axis is given.
_AXIS_OPS = frozenset("""
    Mean Sum Max Min Prod Amax Amin Std Var Any All Logsumexp Softmax
    LogSoftmax Concatenate ExpandDims Squeeze Cumsum Cumprod Argmax Argmin
    Sort Flip Glu Normalize""".split())


def per_example_operation(node) -> Optional[str]:
  """Why a functional model's node of a Keras operation (not a layer) may
  not act on each example alone, or ``None`` when it does.

  Such nodes come from ``keras.ops`` calls and operators on KerasTensors
  (``x + y``, ``x[:, 0]``). ``None`` for: elementwise operations whose
  tensor operands have the output's rank; reductions, softmax,
  concatenation and the like over given axes other than the batch axis;
  ``reshape`` keeping an unknown batch axis; ``transpose`` keeping the batch
  axis first; ``x[:, ...]`` indexing; ``matmul`` of two batched tensors of
  one rank, 3 or more; never with a weight or tensor among its arguments
  (only KerasTensors, Python values and NumPy arrays). Such an operation
  gives, on the task and example axes merged, each task's own result.
  """
  op = node.operation
  kind = type(op).__name__
  if len(node.outputs) != 1:
    return "several outputs"
  out = tuple(node.outputs[0].shape)        # KerasTensor shapes: tuples
  ranks = [len(t.shape) for t in node.input_tensors]
  if not out or out[0] is not None or any(
      not t.shape or t.shape[0] is not None for t in node.input_tensors):
    return ("its inputs and output must keep the batch axis (an unknown "
            "first axis)")
  if any(isinstance(v, (keras.Variable, tf.Variable, tf.Tensor))
         or keras.ops.is_tensor(v)
         for v in tf.nest.flatten(node.arguments.convert(
             lambda v: None if isinstance(v, keras.KerasTensor) else v))):
    return ("a weight or tensor argument (the task-batched path reads "
            "weights only through layers)")
  if kind in _ELEMENTWISE_OPS:
    if all(r == len(out) for r in ranks):
      return None
    return "elementwise on operands of different ranks (broadcast batches)"
  if kind in _AXIS_OPS:
    axis = getattr(op, "axis", None)
    if axis is None:
      return "over every axis, the batch axis included"
    axes = axis if isinstance(axis, (list, tuple)) else (axis,)
    # (expand_dims counts its axes in the output, the others in the input)
    rank = len(out) if kind == "ExpandDims" else ranks[0]
    if any(int(a) % rank == 0 for a in axes):
      return f"over axis {axis}, the batch axis"
    return None
  if kind == "Reshape":
    newshape = tuple(getattr(op, "newshape", None) or ())
    if None in newshape and (None in newshape[1:] or (
        -1 in newshape and None in node.input_tensors[0].shape[1:])):
      return (f"reshape to {newshape}: an unknown size past the batch "
              "axis")
    return None               # the output's first axis is unknown (above)
  if kind == "Transpose":
    axes = getattr(op, "axes", None)
    if axes is not None and int(axes[0]) == 0:
      return None
    return f"transpose with axes={axes} moves the batch axis"
  if kind == "GetItem":
    key = node.arguments.args[1] if len(node.arguments.args) > 1 else None
    first = key[0] if isinstance(key, tuple) and key else key
    if isinstance(first, slice) and first == slice(None):
      return None
    return f"indexing with {key!r} does not keep the batch axis whole"
  if kind == "Matmul":
    if len(ranks) == 2 and ranks[0] == ranks[1] >= 3:
      return None
    return ("matmul across examples (operands of rank 2, or of different "
            "ranks)")
  return "this operation is not known to act on each example alone"


def batchnorm_rank(layer: keras.layers.BatchNormalization) -> int:
  """The rank (batch axis included) of the inputs ``layer`` was built on."""
  return len(layer._reduction_axes) + 1  # pylint: disable=protected-access


# -------------------------------------------------------------- attention
_ATTENTION_PARTS = ("_query_dense", "_key_dense", "_value_dense",
                    "_output_dense", "_dropout_layer", "_compute_attention",
                    "_compute_causal_mask", "_masked_softmax",
                    "_dot_product_equation", "_combine_equation",
                    "_inverse_sqrt_key_dim")


def attention_parts(layer) -> Optional[dict]:
  """The sublayers of a built ``keras.layers.MultiHeadAttention``:
  ``{"query", "key", "value", "output": EinsumDense, "gate": EinsumDense or
  None, "dropout": Dropout}``; ``None`` where this Keras names them
  otherwise (the layer then runs task by task)."""
  if not all(hasattr(layer, name) for name in _ATTENTION_PARTS):
    return None
  return {"query": layer.query_dense, "key": layer.key_dense,
          "value": layer.value_dense, "output": layer.output_dense,
          "gate": getattr(layer, "_gate_dense", None)  # pylint: disable=protected-access
                  if getattr(layer, "_use_gate", False) else None,
          "dropout": layer._dropout_layer}  # pylint: disable=protected-access


def attention_mask(layer, query, value, masks: dict, causal: bool):
  """The ``[B, T, S]`` boolean mask ``MultiHeadAttention.call`` attends
  with, from the raw ``query``/``value`` (``[B, T, ...]``, ``[B, S, ...]``)
  and ``masks`` (``query_mask``, ``value_mask``, ``key_mask``,
  ``attention_mask``: those given), the causal mask included."""
  return layer._compute_attention_mask(  # pylint: disable=protected-access
      query, value, use_causal_mask=causal, **masks)


def attention(layer, query, key, value, causal: bool, training: bool,
              dropout_mask: Optional[Callable] = None, mask=None):
  """``layer``'s attention of projected ``query``/``key``/``value``
  (``[B, S, heads, dim]``), computed as ``MultiHeadAttention.call`` does:
  its fused dot-product attention without dropout; else its explicit
  scores, with ``dropout_mask(scores)`` (the factor to multiply them by, in
  training mode) in place of its own Dropout draw. ``mask``: the
  :func:`attention_mask` (which holds the causal mask), or ``None`` for
  the causal mask alone (``causal``) or none."""
  # pylint: disable=protected-access
  if not layer.dropout:
    extra = {"use_causal_mask": True} if causal and mask is None else {}
    return layer._compute_attention(query, key, value, mask, training,
                                    False, **extra)[0]
  if mask is None and causal:
    mask = layer._compute_causal_mask(query, value)
  query = keras.ops.multiply(
      query, keras.ops.cast(layer._inverse_sqrt_key_dim, query.dtype))
  scores = keras.ops.einsum(layer._dot_product_equation, key, query)
  scores = layer._masked_softmax(scores, mask)
  if training and dropout_mask is not None:
    scores = scores * dropout_mask(scores)
  return keras.ops.einsum(layer._combine_equation, scores, value)


# ---------------------------------------------------------------- moments
def _exact_moments(x, axes, keepdims=False):
  """Mean and (biased) variance with exact first and second derivatives."""
  mean = tf.reduce_mean(x, axis=axes, keepdims=True)
  variance = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
  if not keepdims:
    mean = tf.squeeze(mean, axis=axes)
    variance = tf.squeeze(variance, axis=axes)
  return mean, variance


@contextlib.contextmanager
def call_context(layer, training: bool) -> Iterator[None]:
  """Within this context the layers ``layer.call`` calls take ``training``
  where not given one, as inside ``layer(x, training=training)`` (Keras'
  call context, which its ``__call__`` opens)."""
  from keras.src.backend.common import global_state  # pylint: disable=g-import-not-at-top
  from keras.src.layers.layer import CallContext  # pylint: disable=g-import-not-at-top
  previous = global_state.get_global_attribute("current_call_ctx")
  context = CallContext(entry_layer=layer)
  context.set_value("training", training)
  global_state.set_global_attribute("current_call_ctx", context)
  try:
    yield
  finally:
    global_state.set_global_attribute("current_call_ctx", previous)


@contextlib.contextmanager
def name_scopes_restored_on_error() -> Iterator[None]:
  """Within this context, an error leaves Keras' variable name scopes as it
  found them. (A model call that raises while TensorFlow traces it can
  leave its scope open, and every variable built afterwards, in any model,
  would take its name as a path prefix.)"""
  from keras.src.backend.common import global_state  # pylint: disable=g-import-not-at-top
  stack = global_state.get_global_attribute("name_scope_stack")
  depth = len(stack) if isinstance(stack, list) else 0
  try:
    yield
  except BaseException:
    stack = global_state.get_global_attribute("name_scope_stack")
    if isinstance(stack, list):
      del stack[depth:]
    raise


@contextlib.contextmanager
def exact_moments() -> Iterator[None]:
  """Within this context Keras' TF backend computes moments exactly.

  Keras computes the moments of BatchNormalization and LayerNormalization
  with ``tf.nn.moments``, which subtracts a ``stop_gradient(mean)``: first
  derivatives are right, second derivatives lose the ``-11^T/n`` term of
  the variance's Hessian. This swaps Keras' private ``_compute_moments`` for
  an exact one. If a future Keras moves it, a warning says so and the stock
  moments are used (the finite-difference tests then fail loudly).

  Example:
    >>> with exact_moments():
    ...   y = keras.layers.LayerNormalization()(tf.ones((2, 3)))
  """
  try:
    from keras.src.backend.tensorflow import nn as tf_nn  # pylint: disable=g-import-not-at-top
    original = tf_nn._compute_moments  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # pragma: no cover - other Keras versions
    warnings.warn(
        "maml_tf could not patch Keras' moments; second-order meta-gradients "
        "through BatchNormalization/LayerNormalization may be inexact with "
        f"Keras {keras.__version__}.")
    yield
    return
  with _MOMENTS_LOCK:
    tf_nn._compute_moments = _exact_moments  # pylint: disable=protected-access
    try:
      yield
    finally:
      tf_nn._compute_moments = original  # pylint: disable=protected-access


# ------------------------------------------------------------------ losses
def loss_function_parts(loss: keras.losses.Loss
                        ) -> Optional[Tuple[object, dict]]:
  """``(fn, fn_kwargs)`` of a Keras ``LossFunctionWrapper`` loss, else None.

  ``None`` too when the loss class overrides ``call`` (then ``fn`` alone
  does not say what it computes).
  """
  wrapper = next((c for c in type(loss).__mro__
                  if c.__name__ == "LossFunctionWrapper"), None)
  if wrapper is None or type(loss).call is not wrapper.call:
    return None
  return getattr(loss, "fn", None), dict(getattr(loss, "_fn_kwargs", {}))


@contextlib.contextmanager
def unscaled_keras_losses() -> Iterator[None]:
  """Within this context Keras losses do not divide by the replica count.

  Under a ``tf.distribute`` strategy with ``R > 1`` replicas, Keras 3's
  ``Loss`` objects (``reduction="sum_over_batch_size"``) multiply their value
  by ``1/R``, Keras' convention for ``model.fit``. MAML's losses are per-task
  means (the inner loop steps on them, so scaling them would also shrink
  every inner step); a replica's share of a distributed meta-step
  (:func:`maml_tf.core.distribute.replica_meta_step`) computes its losses in
  this context and averages across replicas itself. Threads may enter it
  together and nest it: Keras' scaling comes back when the last one leaves.

  Example:
    >>> with strategy.scope(), unscaled_keras_losses():
    ...   loss = keras.losses.MeanSquaredError()(y, pred)   # not divided by R
  """
  try:
    from keras.src.losses import loss as loss_module  # pylint: disable=g-import-not-at-top
    if not hasattr(loss_module, "scale_loss_for_distribution"):
      raise AttributeError("scale_loss_for_distribution")
  except (ImportError, AttributeError):  # pragma: no cover - other Keras
    warnings.warn(
        "maml_tf could not turn off Keras' 1/num_replicas loss scaling; with "
        f"Keras {keras.__version__}, keras.losses.Loss objects may be divided "
        "by the number of replicas in distributed meta-steps (plain loss "
        "functions such as 'mse' are not affected).")
    yield
    return
  with _LOSS_SCALE_LOCK:
    if _loss_scale_patch["depth"] == 0:
      _loss_scale_patch["original"] = loss_module.scale_loss_for_distribution
      loss_module.scale_loss_for_distribution = lambda value: value
    _loss_scale_patch["depth"] += 1
  try:
    yield
  finally:
    with _LOSS_SCALE_LOCK:
      _loss_scale_patch["depth"] -= 1
      if _loss_scale_patch["depth"] == 0:
        loss_module.scale_loss_for_distribution = (
            _loss_scale_patch["original"])


# -------------------------------------------------------------- optimizers
def tf_variable(variable) -> tf.Variable:
  """The ``tf.Variable`` behind a Keras variable (TF backend)."""
  return getattr(variable, "_value", variable)


def adam_slots(optimizer: keras.optimizers.Adam, variables
               ) -> Optional[List[Tuple[object, object]]]:
  """``[(momentum, velocity)]`` slot variables of a built Keras Adam, or None."""
  try:
    return [(optimizer._momentums[optimizer._get_variable_index(v)],  # pylint: disable=protected-access
             optimizer._velocities[optimizer._get_variable_index(v)])  # pylint: disable=protected-access
            for v in variables]
  except (KeyError, AttributeError, IndexError):
    return None


def optimizer_strategy(optimizer: keras.optimizers.Optimizer, default):
  """The ``tf.distribute`` strategy ``optimizer`` was created under."""
  return getattr(optimizer, "_distribution_strategy", default)


# ------------------------------------------------------------ distribution
def is_default_strategy(strategy: tf.distribute.Strategy) -> bool:
  """True for TensorFlow's default (no-op, one device) strategy."""
  from tensorflow.python.distribute import distribute_lib  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  return strategy is distribute_lib._get_default_strategy()  # pylint: disable=protected-access


# ------------------------------------------------------------------ graphs
def function_graphs(graph) -> list:
  """The graphs of the functions defined in ``graph`` (loop bodies, ...)."""
  return [f.graph for f in graph._functions.values()  # pylint: disable=protected-access
          if getattr(f, "graph", None) is not None]


# ------------------------------------------------------------- fast calls
def direct_caller(concrete) -> Optional[Callable]:
  """``f(flat_tensors) -> outputs`` running the traced ``concrete`` function.

  It skips ``tf.function``'s per-call Python (argument binding, signature
  matching, the tape bookkeeping of a differentiable call): the function
  runs as one op, with the call attributes ``tf.function`` gives it, its inputs the flat tensors of the arguments it was traced
  with followed by its captured variables. Valid only where
  :func:`can_call_directly`, for arguments of the traced shapes and dtypes.
  Needs ``ConcreteFunction._inference_function`` and TensorFlow's
  ``execute``; ``None`` (the caller keeps the ``tf.function``) when a
  future version moves them.
  """
  try:
    from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
    from tensorflow.python.eager import execute  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
    name = concrete._inference_function.name  # pylint: disable=protected-access
    captured = list(concrete.captured_inputs)
    structure = concrete.structured_outputs
    num_outputs = len(concrete.outputs)
  except (AttributeError, ImportError):
    return None
  if num_outputs != len(tf.nest.flatten(structure, expand_composites=True)):
    return None              # outputs that are not all tensors (None, ...)
  run = execute.execute
  ctx = context.context()
  # The attributes tf.function passes (executor, session config): the same
  # function instantiation, so the same numbers.
  attrs = tuple(itertools.chain(
      *ctx.function_call_options.as_attrs().items()))
  pack = _packer(structure)

  def call(flat):
    return pack(run(name, num_outputs, flat + captured, attrs, ctx))
  return call


def _packer(structure) -> Callable[[list], object]:
  """``flat -> structure`` with the flat outputs in ``tf.nest`` order: fast
  for tuples of tensors and of dicts of tensors, ``tf.nest`` otherwise."""
  if isinstance(structure, tuple) and not hasattr(structure, "_fields"):
    parts, start = [], 0
    for item in structure:
      if isinstance(item, tf.Tensor):
        parts.append((None, start))
        start += 1
      elif (type(item) is dict  # pylint: disable=unidiomatic-typecheck
            and all(isinstance(v, tf.Tensor) for v in item.values())):
        keys = sorted(item)
        parts.append((keys, start))
        start += len(keys)
      else:
        break
    else:
      def pack(flat):
        return tuple(flat[i] if keys is None else
                     dict(zip(keys, flat[i:i + len(keys)]))
                     for keys, i in parts)
      return pack
  return lambda flat: tf.nest.pack_sequence_as(structure, flat,
                                               expand_composites=True)


try:
  from tensorflow.python.eager import record as _record  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  _could_possibly_record = _record.could_possibly_record
except (ImportError, AttributeError):
  _could_possibly_record = None


def quiet_failed_restores() -> None:
  """Stops TF's "deleted with unrestored values" warnings for restores that
  raised.

  A ``tf.train.Checkpoint.restore`` that fails part-way (a variable of
  another shape) returns no status to call ``expect_partial`` on, and TF
  logs every unrestored value when the objects go, usually at exit, after
  the error that already named the cause. This marks TF's pending restore
  coordinators (``_CheckpointRestoreCoordinatorDeleter``) as expecting a
  partial restore; if TF moves that class, nothing is done (the warnings
  come back, results are unaffected).
  """
  import gc  # pylint: disable=g-import-not-at-top
  from tensorflow.python.checkpoint import checkpoint as tf_checkpoint  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  kind = getattr(tf_checkpoint, "_CheckpointRestoreCoordinatorDeleter", None)
  if kind is None or not hasattr(kind, "set_expect_partial"):
    return
  for obj in gc.get_objects():
    if type(obj) is kind:  # pylint: disable=unidiomatic-typecheck
      obj.set_expect_partial(True)


def can_call_directly() -> bool:
  """Eager, and no gradient tape is recording (which would need the call's
  gradient): the case where :func:`direct_caller` may be used. Needs TF's
  ``record.could_possibly_record``; ``False`` when a future version moves it.
  """
  return (_could_possibly_record is not None and tf.executing_eagerly()
          and not _could_possibly_record())


try:
  from tensorflow.python.util import _pywrap_util_port as _util_port  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  _mkl_enabled = _util_port.IsMklEnabled
except (ImportError, AttributeError):
  _mkl_enabled = None


def onednn_enabled() -> Optional[bool]:
  """Whether TensorFlow runs its oneDNN CPU kernels in this process.

  TensorFlow decides once per process: ``TF_ENABLE_ONEDNN_OPTS`` when set,
  else on for x86-64 CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX and
  off on others (plain AVX2 CPUs among them). Needs TF's
  ``_pywrap_util_port.IsMklEnabled``; ``None`` when a future version moves it.
  """
  return None if _mkl_enabled is None else bool(_mkl_enabled())


try:
  from tensorflow.python.ops import control_flow_util as _control_flow_util  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  _in_xla = _control_flow_util.GraphOrParentsInXlaContext
except (ImportError, AttributeError):
  _in_xla = None


def in_xla_context() -> bool:
  """Whether the code being traced will be compiled by XLA: inside a
  ``tf.function(jit_compile=True)`` (Keras' ``compile(jit_compile=True)``
  included) or a function nested in one, where ``check_numerics`` compiles
  to nothing. Needs TF's ``GraphOrParentsInXlaContext``; when a future
  version moves it, warns once and answers ``False``.
  """
  global _in_xla
  if _in_xla is None:
    return False
  try:
    return bool(_in_xla(tf.compat.v1.get_default_graph()))
  except (AttributeError, TypeError) as e:
    warnings.warn(f"maml_tf: cannot tell whether a step is traced under XLA "
                  f"({e}); a tf.function(jit_compile=True) of your own "
                  "around meta_step would not skip non-finite updates.")
    _in_xla = None
    return False


def eager_signature(flat) -> Optional[tuple]:
  """``((shape, dtype enum), ...)`` of a list of eager tensors, or ``None``
  if an item is not one (a NumPy array, a nested structure, a symbolic
  tensor). What a traced function is for: equal signatures, same function.

  Reads ``EagerTensor._shape_tuple`` and ``_datatype_enum``, which skip
  building a ``TensorShape`` and ``DType`` per tensor; ``None`` (the
  caller takes its general path) when a future version moves them.
  """
  try:
    return tuple([(t._shape_tuple(), t._datatype_enum()) for t in flat])  # pylint: disable=protected-access
  except (AttributeError, TypeError, ValueError):
    return None



def _int32_seeds(seeds) -> tf.Tensor:
  """Seed states as Keras' TensorFlow backend hands them to TF's stateless
  random ops (``_cast_seed``: an int64 state ``floormod``-ed into int32)."""
  seeds = tf.convert_to_tensor(seeds)
  if seeds.dtype != tf.int32:
    seeds = tf.cast(tf.math.floormod(seeds, tf.int32.max - 1), tf.int32)
  return seeds


def dropout_masks(seeds, shape, rate: float, dtype) -> tf.Tensor:
  """What ``keras.layers.Dropout(rate)`` multiplies its inputs by, per task.

  Row ``t`` of the result (``[T, *shape]``: ``1 / (1 - rate)`` where kept,
  0 where dropped) is the mask Keras' TensorFlow backend draws for inputs of
  ``shape`` when the layer's ``SeedGenerator`` holds ``seeds[t]``
  (``tf.nn.experimental.stateless_dropout``), mirrored here so that the
  task-batched path's random layers draw what the per-task path draws.

  Arguments:
    seeds: ``[T, 2]`` seed states, one per task.
    shape: one task's input shape (a list or a 1-D integer tensor).
    rate: the layer's rate.
    dtype: the inputs' dtype.
  """
  seeds = _int32_seeds(seeds)
  ones = tf.ones(shape, dtype)
  if rate >= 1.0:
    return tf.zeros(tf.concat([tf.shape(seeds)[:1], tf.shape(ones)], 0),
                    dtype)
  return tf.map_fn(
      lambda seed: tf.nn.experimental.stateless_dropout(ones, rate, seed=seed),
      seeds, fn_output_signature=dtype)


def uniform_noise(seeds, shape) -> tf.Tensor:
  """``[T, *shape]`` uniform draws in ``[0, 1)``, row ``t`` the one
  ``keras.random.uniform(shape, seed=generator)`` makes on TensorFlow (in
  ``floatx``) when the generator holds ``seeds[t]`` (AlphaDropout's)."""
  seeds = _int32_seeds(seeds)
  dtype = keras.config.floatx()
  return tf.map_fn(
      lambda seed: tf.random.stateless_uniform(
          shape, minval=tf.cast(0.0, dtype), maxval=tf.cast(1.0, dtype),
          dtype=dtype, seed=seed),
      seeds, fn_output_signature=dtype)


def normal_noise(seeds, shape, mean: float, stddev: float, dtype
                 ) -> tf.Tensor:
  """``[T, *shape]`` normal draws, row ``t`` the one ``keras.random.normal``
  makes on TensorFlow when its ``SeedGenerator`` holds ``seeds[t]`` (what
  ``GaussianNoise`` adds and ``GaussianDropout`` multiplies by)."""
  seeds = _int32_seeds(seeds)
  return tf.map_fn(
      lambda seed: tf.random.stateless_normal(shape, mean=mean, stddev=stddev,
                                              dtype=dtype, seed=seed),
      seeds, fn_output_signature=dtype)
