"""MAML: the stateful meta-learner around a Keras model.

Algorithm (Finn, Abbeel & Levine 2017, Algorithm 1), for each task ``i``::

    theta_i' = theta - alpha * grad_theta L_support_i(theta)     (inner_steps times)
    theta   <- theta - beta * grad_theta mean_i L_query_i(theta_i')

A batch runs as its :class:`~maml_tf.core.plan.ExecutionPlan`
(:meth:`MAML.plan`), through :mod:`maml_tf.core.strategies`, compiled by
:class:`~maml_tf.core.runner.Runner`; every path adapts through
:attr:`MAML.inner_loop`. Extension points (traceable): ``compute_gradients``
(Reptile overrides it), ``apply_gradients``, ``write_state`` and
``meta_step``, their composition; ``DistributedMAML`` is built on them.
The model runs with ``training=True`` in both loops (batch statistics, as
the paper); a meta-step writes the tasks' mean BatchNorm moving statistics,
advances RNG seeds and writes no other state.
"""

import math
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from maml_tf.core import cloning
from maml_tf.core import dense_chain
from maml_tf.core import fast_weights
from maml_tf.core import functional
from maml_tf.core import fused_adam
from maml_tf.core import inner_loop as inner_loop_lib
from maml_tf.core import keras_compat
from maml_tf.core import losses
from maml_tf.core import numerics
from maml_tf.core import objective as objective_lib
from maml_tf.core import plan as plan_lib
from maml_tf.core import runner as runner_lib
from maml_tf.core import strategies
from maml_tf.core.objective import StepResult
from maml_tf.core.plan import PlanWarning
from maml_tf.core.task_batch import (TaskBatch, as_tensors, prepare_batch,
                                     validate_task_batch)

INNER_LR_MODES = inner_loop_lib.INNER_LR_MODES
# train_steps warns when it has compiled loops for this many samplers.
MANY_SAMPLERS = 8
EXECUTIONS = plan_lib.EXECUTIONS
_CONV_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                keras.layers.DepthwiseConv2D, keras.layers.SeparableConv1D,
                keras.layers.SeparableConv2D, keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                keras.layers.Conv3DTranspose)


def _fixed(name: str):
  """A constructor option that plans and compiled steps depend on."""
  def get(self):
    return self._frozen[name]  # pylint: disable=protected-access

  def refuse(self, value):
    raise AttributeError(
        f"MAML.{name} is fixed when the learner is built (its execution "
        f"plan and compiled steps depend on it); build a new MAML with "
        f"{name}={value!r}")
  return property(get, refuse, doc=f"The ``{name}`` option (read-only).")


class MAML:
  """Model-Agnostic Meta-Learning for any built Keras 3 model.

  The same class runs the gradient-based family: first-order MAML
  (``first_order=True``), Meta-SGD (``learn_inner_lr="per_parameter"``),
  ANIL (``adapt="head"``), MAML++ (``learn_inner_lr="per_layer_per_step"``,
  ``multi_step_loss_iterations``, ``first_order_until``, a cosine-decayed
  meta learning rate) and, in :class:`maml_tf.core.reptile.Reptile`, Reptile.

  Arguments:
    model: a built Keras 3 model (Sequential, functional or subclassed). Its
      trainable variables are the meta-parameters theta. Their weight
      regularizers (``kernel_regularizer``, ...) are added to the
      meta-objective on theta, as Keras' ``fit`` adds them to the loss; the
      inner steps adapt on the support loss alone. Activity regularizers
      are not part of either (a :class:`PlanWarning` names them).
    loss: a Keras loss (object or name) or a callable
      ``(y_true, y_pred) -> scalar``.
    inner_lr: the inner step size alpha (the initial value when learned).
    inner_steps: inner gradient steps during meta-training (>= 1).
    first_order: drop the second-order terms of the meta-gradient (FOMAML).
    meta_optimizer: a Keras optimizer for the outer step; default Adam(1e-3).
    accuracy: report accuracy (argmax against integer labels); ``None``
      (auto) does so when labels are integers, the model has more than one
      output unit and the loss is not one of Keras' regression or binary
      losses. ``True`` needs more than one output unit. Labels equal to
      the loss's ``ignore_class`` are left out, as the loss leaves them.
    vectorize: ``"auto"`` (default: ``"batched"`` task-batched kernels
      where the model's layers allow, else ``"vectorized_map"``, else
      ``"map_fn"``), one of those three, or ``True``/``False``
      (``"vectorized_map"``/``"map_fn"``). All give the same numbers.
    conv_impl: the batched path's convolution kernel: ``"auto"``,
      ``"patches"``, ``"grouped"`` or ``"map"``. ``"grouped"`` is refused
      for a convolutional model where TensorFlow has no gradient for it
      (:func:`maml_tf.core.fast_weights.grouped_gradient_missing`: without
      a GPU, outside oneDNN's float32 and bfloat16, or where TensorFlow
      left oneDNN off).
    learn_inner_lr: meta-learn the inner step sizes: ``None`` (fixed),
      ``"scalar"``, ``"per_parameter"`` (Meta-SGD) or
      ``"per_layer_per_step"`` (MAML++ LSLR).
    adapt: which parameters the inner loop adapts: ``"all"`` (MAML),
      ``"head"`` (ANIL: the last layer with weights), layer names, or a
      predicate ``f(variable) -> bool``; the others are still meta-learned.
    multi_step_loss_iterations: MAML++ multi-step loss, annealed to the last
      step's over this many iterations (0: off).
    first_order_until: MAML++ derivative-order annealing: first order for
      this many iterations, then second order.
    recompute: gradient checkpointing of the inner loop (and, batched, of the
      query pass): memory stops growing with the inner steps' activations,
      for about one more forward and inner backward per step.
    task_chunk: meta-gradient chunks of this many tasks, one after another
      (the same update, one chunk's activations alive); ``None``: all at
      once; ``"auto"``: the plan's rule.
    closed_form: the written-out meta-gradient of Dense/ReLU chains under
      Keras' MSE with a fixed step size, every weight adapted, no multi-step
      loss or recomputation (:mod:`maml_tf.core.dense_chain`): ``"auto"``
      (whenever possible), ``True`` (a ``ValueError`` says why not) or
      ``False``. The same numbers.
    jit_compile: compile :meth:`train_step` and :meth:`train_steps` with
      XLA; ``None``: when the closed form runs. An XLA step tests for NaN/Inf
      itself; its random ops draw other (equally distributed) tasks than the
      graph executor's.

  Every "auto" is resolved in :mod:`maml_tf.core.plan`.

  Example:
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(40,
    ...     activation="relu"), keras.layers.Dense(1)])
    >>> maml = MAML(model, keras.losses.MeanSquaredError(), inner_lr=0.01)
    >>> maml.plan(batch).execution
    'batched'
    >>> metrics = maml.train_step(batch)           # one meta-update
    >>> adapted = maml.adapt(support_x, support_y)  # a new keras.Model
    >>> maml.evaluate(batch, steps=(0, 1, 10))["loss"]
  """

  inner_lr = _fixed("inner_lr")
  inner_steps = _fixed("inner_steps")
  accuracy = _fixed("accuracy")
  learn_inner_lr = _fixed("learn_inner_lr")
  multi_step_loss_iterations = _fixed("multi_step_loss_iterations")
  recompute = _fixed("recompute")
  task_chunk = _fixed("task_chunk")

  @property
  def scores_classes(self) -> bool:
    """Whether ``accuracy=None`` scores integer labels: the model has more
    than one output unit and its loss is none of Keras' regression or
    binary losses (:func:`maml_tf.core.losses.scores_classes`)."""
    return self._facts.scores_classes

  def __init__(self, model: keras.Model, loss, inner_lr: float = 0.01,
               inner_steps: int = 1, first_order: bool = False,
               meta_optimizer: Optional[keras.optimizers.Optimizer] = None,
               accuracy: Optional[bool] = None,
               vectorize: Union[str, bool] = "auto",
               conv_impl: str = "auto",
               learn_inner_lr: Optional[str] = None,
               adapt: Union[str, Sequence[str], Callable] = "all",
               multi_step_loss_iterations: int = 0,
               first_order_until: int = 0,
               recompute: bool = False,
               task_chunk: Union[str, int, None] = "auto",
               closed_form: Union[str, bool] = "auto",
               jit_compile: Optional[bool] = None):
    self.model = functional.ensure_built(model)
    self._trainable = list(self.model.trainable_variables)   # as built
    self.loss_fn = losses.as_loss_fn(loss)
    self._class_indices = losses.takes_class_indices(loss)
    self._ignore_class = losses.ignore_class_of(loss)
    mismatch = losses.logits_mismatch(loss, self.model)
    if mismatch:
      warnings.warn(mismatch, UserWarning, stacklevel=2)
    try:
      outputs = model.outputs
    except (AttributeError, ValueError):    # subclassed: no graph
      outputs = None
    if not outputs:
      outputs = _traced_outputs(model)
    count = len(outputs) if outputs else 1
    if count > 1:
      raise ValueError(
          f"model {model.name!r} has {count} outputs; MAML adapts "
          "models with one output (several inputs are supported): combine "
          "the outputs into one tensor, or meta-train a model per output")
    self._num_classes = outputs[0].shape[-1] if outputs else None
    if accuracy and self._num_classes == 1:
      raise ValueError(
          f"accuracy=True scores the argmax of the outputs, but model "
          f"{model.name!r} has one output unit; leave accuracy=None (a "
          "binary model's accuracy is not computed)")
    self._input_shape = _single_input_shape(model)
    if not isinstance(inner_steps, (int, np.integer)) or inner_steps < 1:
      raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
    inner_lr = float(inner_lr)
    if not math.isfinite(inner_lr) or inner_lr < 0:
      raise ValueError(f"inner_lr must be a finite number >= 0, got {inner_lr}")
    if learn_inner_lr not in INNER_LR_MODES:
      raise ValueError(f"learn_inner_lr must be one of {INNER_LR_MODES}, got "
                       f"{learn_inner_lr!r}")
    for name, value in (("multi_step_loss_iterations",
                         multi_step_loss_iterations),
                        ("first_order_until", first_order_until)):
      if int(value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if conv_impl not in fast_weights.CONV_IMPLS:
      raise ValueError(f"conv_impl must be one of {fast_weights.CONV_IMPLS}, "
                       f"got {conv_impl!r}")
    if jit_compile not in (None, True, False):
      raise ValueError(f"jit_compile must be None, True or False, got "
                       f"{jit_compile!r}")
    self._frozen = {
        "inner_lr": inner_lr, "inner_steps": int(inner_steps),
        "accuracy": accuracy, "learn_inner_lr": learn_inner_lr,
        "multi_step_loss_iterations": int(multi_step_loss_iterations),
        "recompute": bool(recompute),
        "task_chunk": plan_lib.check_task_chunk(task_chunk)}
    self.first_order = bool(first_order)
    self.first_order_until = int(first_order_until)
    self.adapt_mask = list(inner_loop_lib.adapt_mask(self.model, adapt))
    self.step_sizes = inner_loop_lib.StepSizes(learn_inner_lr, inner_lr,
                                               self.inner_steps)
    self.inner_lr_variables = self.step_sizes.variables(self.model)
    self.meta_optimizer = _meta_optimizer(meta_optimizer)
    self.meta_optimizer.build(self.meta_variables)
    self._fused_update = fused_adam.fused_adam_update(self.meta_optimizer,
                                                      self.meta_variables)
    self._batched_models = {}
    self._conv_impl = conv_impl
    if conv_impl == "grouped":
      for layer in keras_compat.flatten_layers(self.model):
        # The convolutions the kernel choice applies to.
        missing = isinstance(layer, (keras.layers.Conv1D,
                                     keras.layers.Conv2D)) and (
            fast_weights.grouped_gradient_missing(
                layer.dtype_policy.compute_dtype))
        if missing:
          raise ValueError(
              f"conv_impl='grouped' cannot train {self.model.name!r} here: "
              f"{missing} (layer {layer.name!r}), and every inner step takes "
              "that gradient; use 'auto', 'map' or 'patches'")
    batched_error = None
    if vectorize in ("auto", "batched"):
      try:
        self._batched_model(None)
      except fast_weights.Unsupported as e:
        batched_error = str(e)
    kinds = functional.state_kinds(self.model)
    has_conv = any(isinstance(l, _CONV_LAYERS)
                   for l in keras_compat.flatten_layers(self.model))
    not_vectorizable = _why_not_vectorizable(self.model, has_conv)
    execution = plan_lib.resolve_execution(vectorize, batched_error,
                                           not_vectorizable)
    if batched_error and vectorize == "auto":
      warnings.warn(
          f"maml_tf: model {self.model.name!r} runs task by task ({execution})"
          f", not on the faster task-batched path: {batched_error}",
          PlanWarning, stacklevel=2)
    blocker = plan_lib.closed_form_blocker(
        learned_step_sizes=learn_inner_lr is not None,
        all_adapted=all(self.adapt_mask),
        multi_step=self.multi_step_loss_iterations > 0,
        recompute=self.recompute)
    self._chain = plan_lib.resolve_closed_form(
        closed_form, blocker, lambda: dense_chain.analyse(self.model, loss))
    self._options = plan_lib.Options(
        conv_impl=conv_impl, task_chunk=self.task_chunk,
        jit_compile=jit_compile, recompute=self.recompute,
        multi_step=self.multi_step_loss_iterations > 0, accuracy=accuracy)
    self._facts = plan_lib.ModelFacts(
        execution=execution,
        has_conv=has_conv,
        closed_form=self._chain is not None,
        fused_update=self._fused_update is not None,
        not_batched=batched_error, not_vectorizable=not_vectorizable,
        scores_classes=losses.scores_classes(loss, self._num_classes))
    self._device = plan_lib.Device.local()
    self._runner = runner_lib.Runner(self.model.name)
    self._plans = {}         # (batch shape, order, distributed, fallbacks) -> plan
    self._step_plans = {}    # train_steps key -> plan of its sampled batch
    self._samplers = {}      # id -> the sample_batch functions seen (alive)
    self.state_kinds = kinds
    self.inner_loop = inner_loop_lib.InnerLoop(
        self.model, self.loss_fn, tuple(self.adapt_mask),
        self.step_sizes,
        seed_mask=tuple(kind == "seed" for kind in self.state_kinds),
        loss_scale=self._loss_scale())
    task_losses = losses.per_task_loss_fn(loss)
    self.context = strategies.Context(
        model=self.model, inner=self.inner_loop, loss_fn=self.loss_fn,
        task_loss=task_losses or (lambda y, pred: tf.vectorized_map(
            lambda a: self.loss_fn(a[0], a[1]), (y, pred))),
        batched=self._batched_model, objective=self._objective,
        chain=self._chain, loss_scale=self._loss_scale(),
        accuracy=losses.task_accuracy(self._ignore_class))
    self.objective = objective_lib.Objective(
        self.inner_steps, self.multi_step_loss_iterations, self.state_kinds,
        objective_lib.weight_penalties(self.model))
    _warn_about_call_losses(self.model)

  # ------------------------------------------------------- meta-parameters
  @property
  def meta_variables(self) -> list:
    """Everything the outer step updates: the model's trainable variables,
    then the learned inner step sizes (if any)."""
    return list(self.model.trainable_variables) + list(self.inner_lr_variables)

  def checkpoint_items(self) -> Dict[str, object]:
    """Trackables a checkpoint must hold to resume this learner."""
    items = {"model": self.model, "meta_optimizer": self.meta_optimizer}
    if self.inner_lr_variables:
      items["inner_lr"] = {str(i): v for i, v in
                           enumerate(self.inner_lr_variables)}
    return items

  def meta_values(self):
    """``(params, state, lrs)``: theta, the non-trainable state and the
    learned step sizes as tensors (reads are taped)."""
    params, state = functional.read_weights(self.model)
    return params, state, [tf.convert_to_tensor(v)
                           for v in self.inner_lr_variables]

  def task_state(self, state, first_task=0) -> list:
    """``state`` with the random layers' seeds moved on to ``first_task``."""
    return inner_loop_lib.offset_task_seeds(state, self.inner_loop.seed_mask,
                                            first_task)

  # ------------------------------------------------------------- the plan
  def _batched_model(self, conv_impl: Optional[str]):
    """The task-batched model with ``conv_impl`` (compiled once each)."""
    impl = conv_impl or fast_weights.resolve_conv_impl(self._conv_impl)
    if impl not in self._batched_models:
      self._batched_models[impl] = fast_weights.compile_batched(self.model,
                                                                impl)
    return self._batched_models[impl]

  def first_order_now(self) -> bool:
    """This step's derivative order: ``first_order``, or ``first_order_until``
    not yet reached."""
    if self.first_order:
      return True
    if self.first_order_until <= 0:
      return False
    if not tf.executing_eagerly():
      raise RuntimeError(
          "first_order_until (MAML++'s derivative-order annealing) is "
          "decided eagerly before each step; inside a tf.function pass the "
          "order yourself: plan(batch, first_order=...)")
    return int(self.meta_optimizer.iterations.numpy()) < self.first_order_until

  def plan(self, batch, first_order: Optional[bool] = None,
           distributed: bool = False) -> plan_lib.ExecutionPlan:
    """The :class:`~maml_tf.core.plan.ExecutionPlan` ``batch`` runs with.

    Arguments:
      batch: a :class:`TaskBatch` (arrays or tensors; only shapes and label
        dtypes are read).
      first_order: the derivative order; default this step's (``first_order``
        or ``first_order_until``).
      distributed: plan for one replica of a ``tf.distribute`` strategy.
    """
    return self._plan_of(validate_task_batch(batch), first_order,
                         distributed)

  def _plan_of(self, batch: TaskBatch, first_order: Optional[bool] = None,
               distributed: bool = False):
    """:meth:`plan` of a batch already validated (by :meth:`prepare`)."""
    if first_order is None:
      first_order = self.first_order_now()
    return self._plan_for(plan_lib.BatchShape.of(batch), bool(first_order),
                          distributed)

  def _plan_for(self, shape, first_order: bool, distributed: bool):
    key = (shape, first_order, distributed, len(self._runner.fallbacks))
    plan = self._plans.get(key)
    if plan is None:
      device = self._device
      if distributed:
        device = plan_lib.Device(device.gpu, device.cpus, True)
      plan = self._runner.resolved(plan_lib.resolve_plan(
          self._options, self._facts, shape, device, first_order))
      self._plans[key] = plan
    return plan

  def _model_plan(self) -> plan_lib.ExecutionPlan:
    """The plan of a batch of unknown size with float labels."""
    return self._plan_for(plan_lib.BatchShape(None, None, None, 1, False),
                          self.first_order, False)

  @property
  def execution(self) -> str:
    """``"batched"``, ``"vectorized_map"`` or ``"map_fn"`` (after any
    recorded fallback)."""
    return self._model_plan().execution

  @property
  def vectorize(self) -> bool:
    """True unless the tasks run one after another (``tf.map_fn``)."""
    return self.execution != "map_fn"

  @property
  def jit_compile(self) -> bool:
    """Whether :meth:`train_step` and :meth:`train_steps` compile with XLA
    (after fallbacks)."""
    return self._model_plan().xla

  @property
  def compiled(self) -> Dict[tuple, object]:
    """The compiled ``tf.function`` s so far, by ``(kind, ..., plan)``."""
    return self._runner.compiled

  @property
  def fallbacks(self) -> Dict[str, Tuple[object, str]]:
    """Runtime fallbacks recorded so far: ``{field: (value, why)}``."""
    return dict(self._runner.fallbacks)

  # ------------------------------------------------------------------ inputs
  def prepare(self, batch) -> TaskBatch:
    """``batch`` validated, as tensors, floats cast to the model's dtype."""
    self._check_trainable_unchanged()
    batch = prepare_batch(batch, self._trainable[0].dtype)
    self._check_inputs(batch)
    self._check_labels(batch)
    return batch

  def _check_trainable_unchanged(self) -> None:
    """The model's trainable weights must be those the learner was built
    with (its meta-parameters, adapt mask and optimizer are fixed then)."""
    now = self.model.trainable_variables
    if len(now) == len(self._trainable) and all(
        a is b for a, b in zip(now, self._trainable)):
      return
    now_ids, ids = {id(v) for v in now}, {id(v) for v in self._trainable}
    frozen = [v.path for v in self._trainable if id(v) not in now_ids]
    unfrozen = [v.path for v in now if id(v) not in ids]
    raise ValueError(
        f"the trainable weights of model {self.model.name!r} changed after "
        "the learner was built ("
        + "; ".join(part for part in (
            f"frozen since: {frozen}" if frozen else "",
            f"trainable since: {unfrozen}" if unfrozen else "") if part)
        + "); a learner keeps the weights it was built with: build a new "
        "MAML (or compile the MetaModel again) after changing `trainable`")

  def _check_inputs(self, batch: TaskBatch) -> None:
    """Inputs must have the per-example shape of a one-input model's
    ``Input`` (checked once per signature, from static shapes)."""
    expected = self._input_shape
    if expected is None:
      return
    for name in ("support_x", "query_x"):
      leaves = tf.nest.flatten(getattr(batch, name))
      if len(leaves) != 1:
        return
      got = tuple(leaves[0].shape)[2:]
      if len(got) == len(expected) + 1 and got[-1] == 1:
        got = got[:-1]         # Keras drops a trailing axis of 1 itself
      if len(got) != len(expected) or any(
          e is not None and g is not None and e != g
          for e, g in zip(expected, got)):
        raise ValueError(
            f"TaskBatch.{name} has examples of shape "
            f"{tuple(leaves[0].shape)[2:]} (after the task and example axes "
            f"of {tuple(leaves[0].shape)}), but model "
            f"{self.model.name!r} takes inputs of shape {expected}")

  def _check_labels(self, batch: TaskBatch) -> None:
    """Class-index labels must index the model's outputs (checked eagerly)."""
    if self._class_indices:
      for name in ("support_y", "query_y"):
        losses.check_class_labels(name, getattr(batch, name),
                                  self._num_classes, self._ignore_class)

  # --------------------------------------------------- the meta-step pieces
  def training_pass(self, plan: plan_lib.ExecutionPlan,
                    pre_update_metrics: bool = True) -> strategies.TaskPass:
    """Steps scored while training: the objective's, and 0 if asked."""
    return self.objective.training_pass(plan.first_order, pre_update_metrics)

  def _objective(self, task_losses, task_pass):
    return self.objective.meta_loss(task_losses, task_pass,
                                    self.meta_optimizer.iterations)

  def metric_names(self, plan: plan_lib.ExecutionPlan,
                   pre_update_metrics: bool) -> Tuple[str, ...]:
    """The keys of a meta-step's metrics."""
    return self.objective.metric_names(plan.accuracy, pre_update_metrics)

  def step_result(self, grads, out, loss, state, plan, task_pass,
                  params=None) -> StepResult:
    """The :class:`StepResult` of a task pass's outputs ``out`` (with the
    model's weight penalties on ``params``, theta, added)."""
    return self.objective.result(grads, out, loss, state, plan.accuracy,
                                 task_pass, params)

  def compute_gradients(self, batch: TaskBatch, plan: plan_lib.ExecutionPlan,
                        pre_update_metrics: bool = True,
                        first_task=0) -> StepResult:
    """The meta-gradient of ``batch`` under ``plan`` (traceable; no writes).

    ``first_task``: the index of ``batch``'s first task in a larger
    meta-batch (a replica's share): random layers then draw what those
    tasks draw in the whole batch.
    """
    params, state, lrs = self.meta_values()
    task_pass = self.training_pass(plan, pre_update_metrics)
    grads, out, loss = strategies.select(plan).meta_gradients(
        self.context, plan, task_pass, params,
        self.task_state(state, first_task), lrs, batch)
    return self.step_result(grads, out, loss, state, plan, task_pass, params)

  def apply_gradients(self, grads, plan: plan_lib.ExecutionPlan, loss=None):
    """The outer step, only if the gradients (and ``loss``) are finite.

    Returns the finite flags under ``plan.xla`` (the step is skipped where
    one is False), else ``None`` (``check_numerics`` raises instead).
    """
    return self.guarded_update(grads, plan, loss)[0]

  def guarded_update(self, grads, plan: plan_lib.ExecutionPlan, loss=None
                     ) -> Tuple[Optional[tf.Tensor], list]:
    """:meth:`apply_gradients`, returning ``(flags or None, checks)``.

    Flags (a ``tf.cond`` around the update) where ``plan.xla`` or the step
    is traced inside another XLA-compiled function
    (:func:`keras_compat.in_xla_context`), where ``check_numerics`` would
    compile to nothing. ``checks``: in the graph executor, the checked
    tensors that the step's other writes (the non-trainable state) must wait
    for, under ``tf.control_dependencies``, so that a failed check leaves
    them undone too; empty elsewhere (the flags gate those writes instead).
    """
    variables = self.meta_variables
    xla = plan.xla or keras_compat.in_xla_context()
    if isinstance(self.meta_optimizer, keras.optimizers.LossScaleOptimizer):
      # It skips steps with non-finite gradients itself (and lowers its
      # scale); it takes scaled gradients.
      # An overflowed meta-loss can leave zero gradients: make them NaN so
      # that the optimizer sees the overflow.
      scale = self._loss_scale()()
      if loss is not None:
        scale = tf.where(tf.math.is_finite(tf.cast(loss, scale.dtype)),
                         scale, tf.constant(np.nan, scale.dtype))
      self.meta_optimizer.apply_gradients(zip(
          [g * tf.cast(scale, g.dtype) for g in grads], variables))
      # Nothing to flag: an overflowed step is the optimizer's to skip,
      # under XLA as in the graph executor (a loop goes on past it).
      return (tf.ones([1 + len(grads)], tf.bool) if xla else None), []
    if xla:
      flags = numerics.finite_flags(loss, grads)

      def update():
        self._update(grads, plan)
        return tf.constant(True)
      tf.cond(tf.reduce_all(flags), update, lambda: tf.constant(False))
      return flags, []
    checked = numerics.check_gradients(grads, variables)
    if loss is not None:
      checked.append(numerics.check_meta_loss(loss))
    # The whole update (the optimizer's iteration count included) waits for
    # every check, so a failed check leaves all of it undone.
    with tf.control_dependencies(checked):
      self._update(checked[:len(grads)], plan)
    return None, checked

  def _update(self, grads, plan):
    if (plan.fused_update and self._fused_update is not None
        and not tf.distribute.has_strategy()):
      self._fused_update(grads)
    else:
      self.meta_optimizer.apply_gradients(zip(grads, self.meta_variables))

  def _loss_scale(self) -> Optional[Callable[[], tf.Tensor]]:
    """The dynamic loss scale of a ``LossScaleOptimizer``, else ``None``."""
    if not isinstance(self.meta_optimizer,
                      keras.optimizers.LossScaleOptimizer):
      return None
    return lambda: tf.convert_to_tensor(self.meta_optimizer.dynamic_scale)

  def write_state(self, new_state, ok=None) -> None:
    """Writes the non-trainable state a step computed (where ``ok``)."""
    def write():
      for var, kind, value in zip(self.model.non_trainable_variables,
                                  self.state_kinds, new_state):
        if kind != "keep":
          var.assign(value)
      return tf.constant(True)
    if ok is None:
      write()
    else:
      tf.cond(ok, write, lambda: tf.constant(False))

  def meta_step(self, batch: TaskBatch, plan: plan_lib.ExecutionPlan,
                pre_update_metrics: bool = True) -> runner_lib.StepOutput:
    """One meta-update (traceable): compute, apply, write the state."""
    result = self.compute_gradients(batch, plan, pre_update_metrics)
    flags, checks = self.guarded_update(result.grads, plan, result.loss)
    with tf.control_dependencies(checks):
      self.write_state(result.new_state,
                       None if flags is None else tf.reduce_all(flags))
    return runner_lib.StepOutput(result.metrics, flags)

  # ------------------------------------------------------------- public API
  def meta_loss(self, batch: TaskBatch) -> tf.Tensor:
    """Mean query loss after ``inner_steps`` adaptation steps (a scalar),
    plus the model's weight penalties: the objective :meth:`train_step`
    minimises.

    Differentiable with respect to ``model.trainable_variables`` (and the
    learned step sizes), including the second-order terms unless
    ``first_order=True``. Writes nothing.

    Example:
      >>> with tf.GradientTape() as tape:
      ...   loss = maml.meta_loss(batch)
      >>> grads = tape.gradient(loss, model.trainable_variables)
    """
    batch = self.prepare(batch)
    plan = self._plan_of(batch, self.first_order).for_task_passes()
    plan = plan.replace(accuracy=False)       # a loss only

    def make(plan):
      task_pass = self.training_pass(plan, pre_update_metrics=False)

      def meta_loss(batch):
        params, state, lrs = self.meta_values()
        out = strategies.select(plan).run_tasks(
            self.context, plan, task_pass, params, state, lrs, batch)
        return (self._objective(out["loss"], task_pass)
                + self.objective.penalty(params))
      return meta_loss
    return self._runner.function(("meta_loss",), make, plan, batch,
                                 second_order=not plan.first_order)(batch)

  def train_step_tensors(self, batch: TaskBatch,
                         pre_update_metrics: bool = True,
                         plan: Optional[plan_lib.ExecutionPlan] = None
                         ) -> Dict[str, tf.Tensor]:
    """As :meth:`train_step` but returns tensors (no host synchronisation
    in the graph executor; an XLA step reads its finite flags).

    ``plan`` runs the step with another plan than :meth:`plan`'s (e.g.
    ``maml.plan(batch).replace(task_chunk=None)``). A batch of eager
    tensors whose shapes and dtypes were seen before (and needed no
    conversion) is validated and planned once, not again on every call.
    """
    return self._train_step(batch, bool(pre_update_metrics), plan, False)

  def _train_step(self, batch: TaskBatch, before: bool,
                  plan: Optional[plan_lib.ExecutionPlan], floats: bool):
    """:meth:`train_step_tensors`, returning Python floats where
    ``floats`` (:meth:`train_step`)."""
    ready_key = flat = None
    # The hot path: a TaskBatch of eager tensors of a signature seen before
    # runs its registered step; every statement here runs on every call.
    if (plan is None and type(batch) is TaskBatch  # pylint: disable=unidiomatic-typecheck
        and keras_compat.can_call_directly()):
      ready_key = ("train", before, self.first_order_now(),
                   len(self._runner.fallbacks))
      flat = list(batch)
      step = self._runner.ready_step(ready_key, flat)
      if step is None:                 # nested inputs, or not seen yet
        flat = tf.nest.flatten(batch)
        if all(isinstance(t, tf.Tensor) for t in flat):
          if not all(isinstance(f, tf.Tensor) for f in batch):  # nested:
            # its structure is in the key (equal leaves, other structure)
            ready_key += (repr(tf.nest.map_structure(lambda _: 0,
                                                     tuple(batch))),)
          step = self._runner.ready_step(ready_key, flat)
        else:
          ready_key = None
      if step is not None:
        self._check_labels(batch)
        return step(flat, floats)
    prepared = self.prepare(batch)
    if ready_key is not None and not all(
        a is b for a, b in zip(flat, tf.nest.flatten(prepared))):
      ready_key = None                # converted: not this signature's step
    plan = plan or self._plan_of(prepared)
    return self._runner.call_step(
        ("train", before),
        lambda p: lambda b: self.meta_step(b, p, before),
        plan, (prepared,), second_order=not plan.first_order,
        xla_auto=self._options.jit_compile is None,
        variables=lambda: self.meta_variables, ready_key=ready_key,
        floats=floats)

  def train_step(self, batch: TaskBatch,
                 pre_update_metrics: bool = True) -> Dict[str, float]:
    """One meta-update on ``batch``; returns the metrics as Python floats.

    Keys: ``loss_after`` (mean query loss after adaptation) and, for
    classification, ``accuracy_after``; with ``pre_update_metrics`` (default)
    also ``loss_before``/``accuracy_before``, which cost one more forward
    pass over every query set (training loops can ask for them only on the
    steps they log). Compiled once per plan. Raises ``FloatingPointError``
    (and leaves the weights unchanged) if the loss or the meta-gradient is
    not finite.

    Example:
      >>> maml.train_step(batch)
      {'loss_after': 0.52, 'loss_before': 2.91}
    """
    return self._train_step(batch, bool(pre_update_metrics), None, True)

  def train_steps(self, sample_batch: Callable[[tf.Tensor], TaskBatch],
                  num_steps: int, pre_update_metrics: bool = False
                  ) -> Dict[str, tf.Tensor]:
    """``num_steps`` meta-updates in one compiled call (a ``tf.while_loop``).

    Arguments:
      sample_batch: ``iteration -> TaskBatch``, traceable TensorFlow code
        (e.g. :func:`maml_tf.tasks.sinusoid.batch_sampler`) called with the
        meta-optimizer's iteration count before each step (stateless
        sampling makes runs reproducible and resumable); called once
        eagerly per new compiled loop, to plan.
      num_steps: meta-updates per call (>= 1).
      pre_update_metrics: also average ``loss_before``/``accuracy_before``.

    Returns:
      The metrics of :meth:`train_step_tensors`, means over the steps.

    Example:
      >>> sample = sinusoid.batch_sampler(25, 10, 10, seed=0)
      >>> for _ in range(70):
      ...   metrics = maml.train_steps(sample, 1000)  # 70,000 meta-updates
    """
    num_steps = runner_lib.check_num_steps(num_steps)
    first_order = self.first_order_now()
    before = bool(pre_update_metrics)
    key = ("train_steps", id(sample_batch), num_steps, first_order, before)
    plan = self._step_plans.get(key)
    if plan is None:
      self._warn_if_many_samplers(sample_batch)
      plan = self._step_plans[key] = self.plan(
          self.prepare(sample_batch(self.meta_optimizer.iterations)),
          first_order)
    dtype = self.model.trainable_variables[0].dtype

    def make_loop(plan):
      step = lambda: self.meta_step(
          self.prepare(sample_batch(self.meta_optimizer.iterations)), plan,
          before)
      return runner_lib.steps_loop(step, num_steps,
                                   self.metric_names(plan, before), dtype,
                                   1 + len(self.meta_variables), plan.xla)
    return self._runner.call_steps(
        key, make_loop, plan, second_order=not first_order,
        xla_auto=self._options.jit_compile is None,
        variables=self.meta_variables)

  def _warn_if_many_samplers(self, sample_batch) -> None:
    """Each new ``sample_batch`` compiles a new loop (XLA: seconds and
    memory each): warn once when that looks like a new function per call."""
    # Held so that no later function gets a cached one's id.
    self._samplers[id(sample_batch)] = sample_batch
    if len(self._samplers) == MANY_SAMPLERS:
      warnings.warn(
          f"maml_tf: train_steps has compiled a loop for {MANY_SAMPLERS} "
          "different sample_batch functions: each new function (e.g. a "
          "lambda or batch_sampler(...) made inside the training loop) "
          "traces and compiles a new loop, which costs time and memory "
          "every call. Make the sampler once and pass the same function.",
          plan_lib.PlanWarning, stacklevel=3)

  def task_metrics(self, batch: TaskBatch, plan: plan_lib.ExecutionPlan,
                   task_pass: Optional[strategies.TaskPass] = None,
                   first_task=0) -> Dict[str, tf.Tensor]:
    """Per-task query metrics after adaptation (traceable; no writes).

    Arguments:
      batch: a prepared batch (:meth:`prepare`).
      plan: e.g. ``maml.plan(batch).for_task_passes()``.
      task_pass: the steps to score; default ``inner_steps`` only, first
        order (no meta-gradient is taken).
      first_task: as in :meth:`compute_gradients` (a replica's share).

    Returns:
      ``{"loss": [T, S], "accuracy": [T, S] (classification)}``.
    """
    task_pass = task_pass or strategies.TaskPass((self.inner_steps,), None,
                                                 True)
    params, state, lrs = self.meta_values()
    out = strategies.select(plan).run_tasks(
        self.context, plan, task_pass, params,
        self.task_state(state, first_task), lrs, batch)
    out.pop("state")
    return out

  def evaluate(self, batch: TaskBatch, steps: Sequence[int] = (0, 1, 5, 10),
               inner_lr: Optional[float] = None,
               per_task: bool = False) -> Dict[str, np.ndarray]:
    """Query loss (and accuracy) after each number of inner steps in ``steps``.

    The inner steps and the query pass run the model in training mode, as
    meta-training does (and as the paper evaluates): BatchNormalization
    uses each set's batch statistics, and random layers (Dropout,
    GaussianNoise, ...) are active, so a model with Dropout scores with
    dropout on. A model returned by :meth:`adapt` predicts in inference
    mode (Dropout off) when called as Keras models are.

    Arguments:
      batch: tasks to adapt to (support) and score on (query).
      steps: step counts to report, e.g. ``(0, 1, 5, 10)``.
      inner_lr: step size for this evaluation; default the learner's own
        (``self.inner_lr``, or the learned step sizes).
      per_task: return ``[len(steps), T]`` arrays instead of task means.

    Returns:
      ``{"steps": array, "loss": array, "accuracy": array (classification)}``.
    """
    steps = tuple(int(s) for s in steps)
    if not steps or min(steps) < 0:
      raise ValueError(f"steps must be non-negative integers, got {steps}")
    inner_lr = None if inner_lr is None else float(inner_lr)
    batch = self.prepare(batch)
    ordered = tuple(sorted(set(steps)))
    task_pass = strategies.TaskPass(ordered, inner_lr, True)
    plan = self._plan_of(batch, True).for_task_passes()

    def make(plan):
      return lambda batch: self.task_metrics(batch, plan, task_pass)
    out = self._runner.function(("eval", task_pass), make, plan, batch,
                                second_order=False,
                                reduce_retracing=True)(batch)
    result = {"steps": np.asarray(steps)}
    for key, value in out.items():
      value = value.numpy().T                      # [len(ordered), T]
      value = value[[ordered.index(s) for s in steps]]
      result[key] = value if per_task else value.mean(axis=1)
    return result

  def adapt(self, support_x, support_y, steps: Optional[int] = None,
            inner_lr: Optional[float] = None,
            batchnorm_statistics: str = "support") -> keras.Model:
    """Adapts to one task and returns a new ``keras.Model`` with its weights.

    The meta-model's variables are never changed. The adaptation is
    :attr:`inner_loop` (adapt mask, fixed or learned step sizes), the same
    as in training and in the adaptable SavedModel.

    Arguments:
      support_x, support_y: the task's support set ``[K, ...]`` (no task axis).
      steps: inner steps; default ``inner_steps``.
      inner_lr: step size; default the learner's own (fixed or learned).
      batchnorm_statistics: ``"support"`` sets the adapted model's BatchNorm
        moving statistics to the support set's batch statistics under the
        adapted weights, so it predicts per example in inference mode;
        ``"keep"`` leaves the meta-model's moving statistics.

    Example:
      >>> adapted = maml.adapt(x_support, y_support, steps=10)
      >>> y = adapted(x_new, training=False)
    """
    if batchnorm_statistics not in ("support", "keep"):
      raise ValueError("batchnorm_statistics must be 'support' or 'keep', "
                       f"got {batchnorm_statistics!r}")
    steps = self.inner_steps if steps is None else int(steps)
    if steps < 0:
      raise ValueError(f"steps must be >= 0, got {steps}")
    self._check_trainable_unchanged()
    dtype = self._trainable[0].dtype
    if isinstance(support_y, (list, tuple)):   # labels are one tensor
      support_y = np.asarray(support_y)
    x, y = as_tensors(support_x, dtype), as_tensors(support_y, dtype)
    if self._class_indices:     # as a batch's labels are checked
      losses.check_class_labels("support_y", y, self._num_classes,
                                self._ignore_class, what="adapt's")
    for leaf in tf.nest.flatten(x):
      if leaf.shape[0] != y.shape[0]:
        raise ValueError(
            f"support_x has {leaf.shape[0]} examples but support_y has "
            f"{y.shape[0]} (shapes {leaf.shape} vs {y.shape})")
    params, state, lrs = self.meta_values()
    fast, _ = self.inner_loop.adapt(
        params, state, x, y, steps, lrs,
        inner_lr=None if inner_lr is None else float(inner_lr))
    if batchnorm_statistics == "support":
      state = inner_loop_lib.support_statistics(self.model, fast, state, x)
    return cloning.clone_with_weights(self.model, fast, state, check_x=x)



def _warn_about_call_losses(model: keras.Model) -> None:
  """Names the layers with an activity regularizer: losses a forward pass
  adds are not part of MAML's objective (weight regularizers are, see
  :class:`maml_tf.core.objective.Objective`)."""
  names = [layer.name for layer in keras_compat.flatten_layers(model)
           if getattr(layer, "activity_regularizer", None) is not None]
  if names:
    functional.warn_dropped_losses(
        model, f"the activity regularizers of {names}", "activity")


def _why_not_vectorizable(model: keras.Model, has_conv: bool
                          ) -> Optional[str]:
  """Why ``tf.vectorized_map`` cannot run ``model`` per task, or ``None``."""
  if functional.draws_random(model):
    return ("random layers draw per-task seeds, which tf.vectorized_map "
            "cannot vectorise")
  if has_conv:
    return ("tf.vectorized_map cannot vectorise convolutions with per-task "
            "filters")
  if any(isinstance(l, keras.layers.RNN)
         for l in keras_compat.flatten_layers(model)):
    return "tf.vectorized_map cannot vectorise recurrent layers' loops"
  return None


def _traced_outputs(model) -> Optional[list]:
  """The symbolic outputs of a subclassed model's call on its build shape
  (``None`` where its call cannot be traced)."""
  try:
    return list(functional.traced_call(model, False).outputs)
  except Exception:  # pylint: disable=broad-except
    return None


def _single_input_shape(model) -> Optional[Tuple]:
  """The per-example input shape of a model with one graph input, else
  None (subclassed models, several inputs)."""
  try:
    inputs = model.inputs
  except (AttributeError, ValueError):
    return None
  if not inputs or len(inputs) != 1:
    return None
  return tuple(inputs[0].shape)[1:]


def _meta_optimizer(optimizer):
  """``optimizer``, or Adam(1e-3); loss-scaled under ``mixed_float16``.

  As ``keras.Model.compile`` does, the default optimizer is wrapped in a
  ``keras.optimizers.LossScaleOptimizer`` when the global dtype policy is
  ``mixed_float16``; a given optimizer is used as it is (a warning says
  when float16 gradients then go unscaled). A ``LossScaleOptimizer``'s
  dynamic scale multiplies the support losses of the inner loop and the
  meta-loss; a step whose scaled gradients overflow (its metrics are then
  NaN) is skipped and the scale halved, as in any loss-scaled training.
  """
  policy = keras.config.dtype_policy().name
  if optimizer is None:
    optimizer = keras.optimizers.Adam(1e-3)
    if policy == "mixed_float16":
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  elif (policy == "mixed_float16" and not isinstance(
      optimizer, keras.optimizers.LossScaleOptimizer)):
    warnings.warn(
        "maml_tf: the dtype policy is mixed_float16 but meta_optimizer is not "
        "a keras.optimizers.LossScaleOptimizer: float16 gradients may "
        "underflow; wrap it (maml_tf scales the inner and outer losses with "
        "its dynamic scale)", PlanWarning, stacklevel=3)
  return optimizer
