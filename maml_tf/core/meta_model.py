"""``MetaModel``: MAML as a ``keras.Model`` (compile, fit, evaluate, callbacks).

::

    meta = maml_tf.MetaModel(net, "mse", inner_lr=0.01)
    meta.compile(optimizer=keras.optimizers.Adam(1e-3))
    meta.fit(dataset, epochs=10, steps_per_epoch=100,
             callbacks=[keras.callbacks.TensorBoard("runs/tb")])
    meta.evaluate(test_dataset)              # post-adaptation metrics
    adapted = meta.adapt(support_x, support_y)

Elements of the dataset (a ``tf.data.Dataset``, a generator or a
``keras.utils.PyDataset``) are :class:`maml_tf.TaskBatch` es or
``(support_x, support_y, query_x, query_y)`` tuples; NumPy arrays of many
tasks are cut into meta-batches of ``batch_size`` tasks, and
``train_on_batch``/``test_on_batch`` take one meta-batch. ``y``,
``sample_weight`` and ``class_weight`` are refused. Each ``fit`` step is
:meth:`maml_tf.MAML.meta_step` on one element, so it runs every execution
path and family member with :class:`maml_tf.MAML`'s numbers. The logs hold
``loss`` (the query loss after adaptation) and ``accuracy`` where the
learner scores it (:class:`maml_tf.MAML`'s ``accuracy`` rule; a metric a
step does not produce is left out of the logs). With
``pre_update_metrics=True`` they also hold ``loss_before``/``accuracy_before``.

``compile`` makes the learner. The rules:

* ``optimizer`` is the meta-optimizer. Under ``mixed_float16`` it is
  wrapped in a ``LossScaleOptimizer``, as ``keras.Model.compile`` does.
* Under a ``tf.distribute`` strategy (the model and the MetaModel built in
  its scope) each replica runs its share of every meta-batch through
  ``distribute.replica_meta_step``, as ``DistributedMAML`` does: ``fit`` and
  ``evaluate`` give the single-device numbers. A meta-batch whose task count
  is known and not a multiple of the replicas is refused; ``jit_compile``
  must stay False.
* ``jit_compile`` defaults to False (XLA over the meta-step is the
  learner's ``jit_compile`` option). With ``jit_compile=True``, a step whose
  loss or meta-gradient is not finite leaves every variable as it was and
  logs NaN (``keras.callbacks.TerminateOnNaN`` stops there); without XLA
  the step's check stops ``fit`` with a ``tf.errors.InvalidArgumentError``
  naming the value, before any write.

The model's weights, the learned step sizes and the optimizer are the
MetaModel's own, so ``save_weights``, ``ModelCheckpoint`` and
``BackupAndRestore`` keep all of them. ``save("x.keras")`` also keeps the
model's architecture, the task loss, the algorithm and its options, and
``keras.models.load_model`` (with ``maml_tf`` imported) returns a compiled
MetaModel that fits on where the saved one stopped. That needs each of them
serialisable as Keras serialises a model: a model with ``get_config`` (or
plain ``__init__`` arguments), a Keras loss or a registered function; a
MetaModel whose parts are not says which one in a ``ValueError`` (its
weights still save with ``save_weights``).
"""

from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from maml_tf.core import distribute
from maml_tf.core import family
from maml_tf.core import keras_compat
from maml_tf.core import losses
from maml_tf.core import numerics
from maml_tf.core import strategies
from maml_tf.core.task_batch import TaskBatch


_NO_WEIGHTS = (
    "the meta-objective is the mean query loss over the tasks of a "
    "meta-batch; weigh examples or classes inside the task loss given to "
    "MetaModel(model, loss)")


def as_task_batch(data) -> TaskBatch:
  """A dataset element as a :class:`TaskBatch`.

  Keras' packings of ``x`` alone (``(x,)``, ``(x, None, None)``: arrays
  given to ``fit``, ``train_on_batch``) are unpacked; a ``y`` or sample
  weight beside ``x`` is refused.
  """
  if isinstance(data, TaskBatch):
    return data
  if isinstance(data, dict) and set(data) == set(TaskBatch._fields):
    return TaskBatch(**data)
  if isinstance(data, (tuple, list)) and len(data) == 4:
    return TaskBatch(*data)
  if isinstance(data, (tuple, list)) and 1 <= len(data) <= 3:
    if all(part is None for part in data[1:]):
      return as_task_batch(data[0])
    raise ValueError(
        f"MetaModel got a meta-batch of {len(data)} parts; it takes each "
        "meta-batch as x alone, a TaskBatch or a flat (support_x, support_y,"
        " query_x, query_y) tuple, with no y or sample_weight beside it: "
        f"{_NO_WEIGHTS}")
  raise ValueError(
      "MetaModel takes datasets whose elements are TaskBatch or "
      "(support_x, support_y, query_x, query_y) tuples; got "
      f"{type(data).__name__} of {len(data) if hasattr(data, '__len__') else '?'}"
      " parts")


def _refuse_targets(method, args, kwargs, names):
  """A ``ValueError`` where ``y``, ``class_weight`` or ``sample_weight``
  (``names``: Keras' positions of ``method``'s arguments after ``x``) is
  given: a MetaModel's data carries its own query labels."""
  given = [name for i, name in enumerate(names) if name and (
      (i < len(args) and args[i] is not None)
      or kwargs.get(name) is not None)]
  if given:
    raise ValueError(
        f"MetaModel.{method} takes no {' or '.join(given)}: x holds the "
        f"tasks' support and query labels, and {_NO_WEIGHTS}")


class _TaskBatchPyDataset(keras.utils.PyDataset):
  """A ``PyDataset`` of TaskBatches or 4-tuples as Keras takes one: each
  item a dict of the four fields (Keras refuses tuples of four)."""

  def __init__(self, dataset: keras.utils.PyDataset):
    super().__init__(workers=dataset.workers,
                     use_multiprocessing=dataset.use_multiprocessing,
                     max_queue_size=dataset.max_queue_size)
    self.dataset = dataset

  def __len__(self):
    return len(self.dataset)

  @property
  def num_batches(self):
    return self.dataset.num_batches

  def __getitem__(self, index):
    return dict(as_task_batch(self.dataset[index])._asdict())

  def on_epoch_begin(self):
    self.dataset.on_epoch_begin()

  def on_epoch_end(self):
    self.dataset.on_epoch_end()


def _holds_arrays(data) -> bool:
  """Is ``data`` a structure of NumPy arrays (tasks Keras cuts into
  meta-batches), not a dataset, generator or PyDataset?"""
  leaves = (tf.nest.flatten(data) if isinstance(data, (tuple, list, dict))
            else [data])
  return bool(leaves) and all(isinstance(v, np.ndarray) for v in leaves)


def _keras_ready(data):
  """``data``, with a user's ``PyDataset`` wrapped for Keras."""
  if isinstance(data, keras.utils.PyDataset) and not isinstance(
      data, _TaskBatchPyDataset):
    return _TaskBatchPyDataset(data)
  return data


@keras.saving.register_keras_serializable(package="maml_tf")
class MetaModel(keras.Model):
  """A meta-learner of ``model`` that Keras can fit (see the module docstring).

  Arguments:
    model: the built Keras model to meta-train (its weights are theta).
    loss: the task loss, as for :class:`maml_tf.MAML`.
    algorithm: a member of the family (:data:`maml_tf.core.family.ALGORITHMS`:
      ``"maml"``, ``"fomaml"``, ``"anil"``, ``"metasgd"``, ``"mamlpp"``,
      ``"reptile"``).
    iterations: planned meta-iterations (MAML++'s schedules).
    pre_update_metrics: also log the metrics before adaptation (one more
      forward pass per step).
    **options: the learner's options (``inner_lr``, ``inner_steps``,
      ``vectorize``, ``task_chunk``, ...).
  """

  def __init__(self, model: keras.Model, loss, algorithm: str = "maml",
               iterations: int = 10_000, pre_update_metrics: bool = False,
               **options):
    super().__init__(name=f"meta_{model.name}")
    family.check_options(algorithm, options)      # here, not at compile
    losses.as_loss_fn(loss)                       # an unknown loss name
    self.net = model
    self._learner_args = (algorithm, loss, int(iterations), dict(options))
    self.pre_update_metrics = bool(pre_update_metrics)
    self.learner = None
    self.built = True

  def get_config(self):
    """The model, task loss, algorithm and options, as Keras serialises
    them (``save("x.keras")``); ``from_config`` makes the MetaModel again."""
    algorithm, loss, iterations, options = self._learner_args
    parts = {"model": self.net, "loss": loss,
             **{f"option {k!r}": v for k, v in options.items()}}
    config = {}
    for what, value in parts.items():
      try:
        config[what] = keras.saving.serialize_keras_object(value)
        if not isinstance(value, str):
          # Keras writes some things it cannot read back (an unregistered
          # function, a lambda, a model of an unregistered class): found
          # here, not at load time.
          keras.saving.deserialize_keras_object(config[what])
      except (NotImplementedError, TypeError, ValueError) as e:
        first = " ".join(str(e).split()).split(". ")[0]
        raise ValueError(
            f"MetaModel cannot be saved whole: its {what} ({value!r:.80}) is "
            f"not serialisable by Keras ({type(e).__name__}: {first:.200}). "
            + ("Register its class with "
               "@keras.saving.register_keras_serializable() and give it a "
               "get_config (and from_config) taking its constructor's "
               "arguments" if what == "model" else
               "Use a keras.losses object or a function registered with "
               "keras.saving.register_keras_serializable")
            + ", or keep the weights only with save_weights.") from e
    return {"model": config.pop("model"), "loss": config.pop("loss"),
            "algorithm": algorithm, "iterations": iterations,
            "pre_update_metrics": self.pre_update_metrics,
            "options": {k: config[f"option {k!r}"] for k in options}}

  @classmethod
  def from_config(cls, config, custom_objects=None):
    get = lambda c: keras.saving.deserialize_keras_object(
        c, custom_objects=custom_objects)
    options = {k: get(v) for k, v in config.get("options", {}).items()}
    return cls(get(config["model"]), get(config["loss"]),
               algorithm=config.get("algorithm", "maml"),
               iterations=config.get("iterations", 10_000),
               pre_update_metrics=config.get("pre_update_metrics", False),
               **options)

  def compile(self, optimizer="adam", jit_compile=False, **kwargs):
    """Makes the learner with ``optimizer`` as its meta-optimizer.

    Other arguments go to ``keras.Model.compile``. ``loss`` and
    ``metrics`` are not taken: the meta-objective is the learner's.
    """
    for name in ("loss", "metrics"):
      if kwargs.get(name) is not None:
        raise ValueError(f"MetaModel.compile takes no {name}: the "
                         "meta-objective is MAML's (give the task loss to "
                         "MetaModel(model, loss))")
    algorithm, loss, iterations, options = self._learner_args
    strategy = self.distribute_strategy
    distributed = not keras_compat.is_default_strategy(strategy)
    if distributed and jit_compile:
      raise ValueError(
          "MetaModel under a tf.distribute strategy runs without XLA: the "
          "replicas' synchronisation points (the optimizer's all-reduce) "
          "cannot sit inside the compiled step's guard; use "
          "compile(jit_compile=False)")
    optimizer = keras.optimizers.get(optimizer)
    if (keras.config.dtype_policy().name == "mixed_float16"
        and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)):
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    options = dict(options)
    inner_lr = options.pop("inner_lr", 0.01)
    inner_steps = options.pop("inner_steps", 1)
    first_order = options.pop("first_order", False)
    learning_rate = float(keras.ops.convert_to_numpy(
        getattr(optimizer, "learning_rate", 1e-3)))
    # A second compile keeps what was learned, as Keras keeps the weights:
    # the learned step sizes too.
    learned = [v.numpy() for v in getattr(self.learner, "inner_lr_variables",
                                          None) or ()]
    with strategy.scope():   # learned step sizes and optimizer slots
      self.learner = family.make_learner(
          algorithm, self.net, loss, inner_lr=inner_lr,
          inner_steps=inner_steps, meta_lr=learning_rate,
          iterations=iterations, first_order=first_order,
          meta_optimizer=optimizer, **options)
    if distributed:
      distribute.check_variables(self.learner, strategy, hint=(
          "Build the model, the MetaModel and its optimizer under "
          "`with strategy.scope():` and compile there."))
    now = list(self.learner.inner_lr_variables)
    if learned and [v.shape for v in learned] == [tuple(v.shape) for v in now]:
      for variable, value in zip(now, learned):
        variable.assign(value)
    # Tracked, so that weights files and checkpoints hold them.
    self.inner_lrs = now
    # The trackers are the metrics the steps produce (the learner's rule):
    # Keras reads epoch logs and evaluate's results from them when their
    # names match the steps' logs.
    accuracy = self.learner.accuracy
    if accuracy is None:
      accuracy = self.learner.scores_classes
    names = ["loss"] + (["accuracy"] if accuracy else [])
    if self.pre_update_metrics:
      names += [f"{n}_before" for n in names]
    self.trackers = [keras.metrics.Mean(name=n) for n in names]
    super().compile(optimizer=self.learner.meta_optimizer,
                    jit_compile=jit_compile, **kwargs)
    self._compile_args = {"jit_compile": jit_compile, **kwargs}

  def get_compile_config(self):
    """``compile``'s arguments, as ``save("x.keras")`` stores them."""
    if self.learner is None:
      return None
    return {"optimizer": keras.optimizers.serialize(self.optimizer),
            **keras.saving.serialize_keras_object(self._compile_args)}

  def compile_from_config(self, config):
    """Compiles as :meth:`get_compile_config` recorded (``load_model``);
    the learner builds the optimizer, whose state then loads."""
    config = dict(config)
    optimizer = keras.optimizers.deserialize(config.pop("optimizer"))
    self.compile(optimizer=optimizer,
                 **keras.saving.deserialize_keras_object(config))

  @property
  def metrics(self):
    """The running means ``fit`` and ``evaluate`` report (reset per epoch)."""
    return list(getattr(self, "trackers", []))

  def _update(self, values, weight=None):
    for tracker in self.trackers:
      if tracker.name in values:
        value = values[tracker.name]
        tracker.update_state(value, sample_weight=None if weight is None
                             else tf.cast(weight, value.dtype))
    return {t.name: t.result() for t in self.trackers if t.name in values}

  def _check_compiled(self):
    if self.learner is None:
      raise RuntimeError("MetaModel: call compile(optimizer=...) before "
                         "fit, evaluate or adapt")

  def call(self, inputs, training=False):
    """The meta-model itself (no adaptation)."""
    return self.net(inputs, training=training)

  def _prepared(self, data):
    self._check_compiled()
    return self.learner.prepare(as_task_batch(data))

  @staticmethod
  def _logs(metrics):
    names = {"loss_after": "loss", "accuracy_after": "accuracy"}
    return {names.get(k, k): v for k, v in metrics.items()}

  def train_step(self, data):
    """One meta-step on a meta-batch (``MAML.meta_step``; under a
    ``tf.distribute`` strategy each replica's share of it)."""
    batch = self._prepared(data)
    learner = self.learner
    # MAML++'s derivative-order annealing, decided in the graph.
    switch = not (learner.first_order or learner.first_order_until <= 0
                  or tf.executing_eagerly())
    if self._replicated():
      metrics = self._replica_step(batch, switch)
    elif not switch:
      metrics = self._meta_step(batch, None)
    else:
      metrics = tf.cond(
          learner.meta_optimizer.iterations < learner.first_order_until,
          lambda: self._meta_step(batch, True),
          lambda: self._meta_step(batch, False))
    # Weighed by tasks, as Keras weighs its loss by batch size (the metrics
    # are the means over the whole meta-batch, on every replica).
    tasks = tf.shape(tf.nest.flatten(batch.support_y)[0])[0]
    return self._update(self._logs(metrics), weight=tasks)

  def _replicated(self) -> bool:
    """In a replica context of a strategy other than the default one (one
    replica too: its optimizer's update is a synchronisation point)."""
    return (tf.distribute.get_replica_context() is not None
            and not keras_compat.is_default_strategy(self.distribute_strategy))

  def _replica_step(self, batch, switch: bool):
    """This replica's share of the meta-step on its share of the tasks (the
    meta-gradient, metrics and BatchNorm statistics are the means over all
    of them, as on one device: ``distribute.replica_meta_step``); with
    ``switch``, MAML++'s order decided in the graph."""
    learner = self.learner
    plan = lambda first_order: learner.plan(
        batch, first_order=first_order, distributed=True).replace(xla=False)
    order_switch = None
    if switch:
      order_switch = (
          learner.meta_optimizer.iterations < learner.first_order_until,
          plan(True))
    metrics, new_state, checked = distribute.replica_meta_step(
        learner, batch, plan(False if switch else None),
        self.pre_update_metrics, order_switch=order_switch)
    tf.distribute.get_replica_context().merge_call(
        lambda strategy, state, ok: distribute.write_replicated_state(
            self.learner, strategy, state, ok), args=(new_state, checked))
    return metrics

  def _meta_step(self, batch, first_order):
    """The metrics of ``MAML.meta_step`` (NaN where the update was
    skipped) at the derivative order ``first_order`` (None: the learner's)."""
    plan = self.learner.plan(batch, first_order=first_order)
    # Keras compiles this step (compile(jit_compile=)), not the learner;
    # under Keras' XLA the update is gated by finite flags all the same
    # (MAML.guarded_update sees the XLA context) and the logs read NaN.
    plan = plan.replace(xla=False)
    out = self.learner.meta_step(batch, plan, self.pre_update_metrics)
    metrics = out.metrics
    if out.finite is not None:
      metrics = numerics.nan_where_skipped(metrics, out.finite)
    return metrics

  def fit(self, x=None, *args, **kwargs):
    """``keras.Model.fit``; a ``keras.utils.PyDataset`` (also as
    ``validation_data``) may yield TaskBatches or 4-tuples, and ``shuffle``
    defaults to False (each element is a meta-batch drawn at random) except
    for NumPy arrays of tasks (Keras' True: meta-batches drawn anew each
    epoch)."""
    _refuse_targets("fit", args, kwargs, ("y",) + (None,) * 7 + (
        "class_weight", "sample_weight"))
    args = list(args)
    by_position = len(args) > 6       # Keras' position of validation_data
    if by_position or "validation_data" in kwargs:
      val = _keras_ready(args[6] if by_position
                         else kwargs["validation_data"])
      if isinstance(val, TaskBatch) or (
          isinstance(val, (tuple, list)) and len(val) == 4):
        # Arrays of tasks: Keras reads a tuple as (x, y[, sample_weight]).
        val = (TaskBatch(*val),)
      self._check_splits(val)
      if by_position:
        args[6] = val
      else:
        kwargs["validation_data"] = val
    self._check_splits(x)
    if len(args) < 8 and not _holds_arrays(x):
      # shuffle not given: a dataset's meta-batches are drawn at random
      # already (arrays of tasks keep Keras' shuffle=True).
      kwargs.setdefault("shuffle", False)
    return super().fit(_keras_ready(x), *args, **kwargs)

  def evaluate(self, x=None, *args, **kwargs):
    """``keras.Model.evaluate`` (a ``PyDataset`` as in :meth:`fit`)."""
    _refuse_targets("evaluate", args, kwargs,
                    ("y", None, None, "sample_weight"))
    self._check_splits(x)
    return super().evaluate(_keras_ready(x), *args, **kwargs)

  def train_on_batch(self, x, *args, **kwargs):
    """``keras.Model.train_on_batch`` on one meta-batch ``x``."""
    _refuse_targets("train_on_batch", args, kwargs,
                    ("y", "sample_weight", "class_weight"))
    return super().train_on_batch(x, *args, **kwargs)

  def test_on_batch(self, x, *args, **kwargs):
    """``keras.Model.test_on_batch`` on one meta-batch ``x``."""
    _refuse_targets("test_on_batch", args, kwargs, ("y", "sample_weight"))
    return super().test_on_batch(x, *args, **kwargs)

  def _check_splits(self, data):
    """Under a strategy of R replicas Keras gives each replica 1/R of every
    meta-batch, and it builds the model from the replicas' first meta-batches
    averaged, which fails when they differ in size: a ``tf.data.Dataset``
    whose task count is known is checked here, with a clear message. (Later
    unequal shares, e.g. a last partial batch, are weighed correctly.)"""
    replicas = self.distribute_strategy.num_replicas_in_sync
    if replicas <= 1 or not isinstance(data, tf.data.Dataset):
      return
    spec = data.element_spec
    spec = spec[1] if isinstance(spec, (tuple, list)) else (
        spec.get("support_y") if isinstance(spec, dict) else None)
    tasks = getattr(getattr(spec, "shape", None), "rank", None) and (
        spec.shape[0])
    if tasks is not None and tasks % replicas:
      raise distribute.DistributionError(
          f"the meta-batches hold {tasks} tasks, which cannot be split "
          f"evenly across {replicas} replicas (strategy.num_replicas_in_sync"
          f" = {replicas}); use a meta-batch size that is a multiple of "
          f"{replicas}")

  def test_step(self, data):
    """Query metrics after ``inner_steps`` steps of adaptation (and before
    adaptation, ``*_before``, with ``pre_update_metrics``)."""
    batch = self._prepared(data)
    # No meta-gradient: first order (as MAML.evaluate; MAML++'s annealed
    # order is not decided eagerly in Keras' compiled step).
    plan = self.learner.plan(batch, first_order=True).for_task_passes()
    first_task, tasks = 0, None
    if self._replicated():
      # Random layers draw what these tasks draw on one device.
      first_task, _, tasks = distribute.replica_tasks(batch)
    steps = ((0,) if self.pre_update_metrics else ()) + (
        self.learner.inner_steps,)
    with keras_compat.unscaled_keras_losses():   # per-task means, unscaled
      out = self.learner.task_metrics(
          batch, plan, strategies.TaskPass(steps, None, True),
          first_task=first_task)
    if tasks is None:
      tasks = tf.shape(out["loss"])[0]
    values = {k: tf.reduce_mean(v[:, -1]) for k, v in out.items()}
    if self.pre_update_metrics:   # as train_step logs them
      values.update({f"{k}_before": tf.reduce_mean(v[:, 0])
                     for k, v in out.items()})
    # Weighed by tasks: replicas (and meta-batches) of unequal sizes average
    # to the mean over every task.
    return self._update(values, weight=tasks)

  def predict_step(self, data):
    x = data[0] if isinstance(data, tuple) and len(data) == 1 else data
    return self.net(x, training=False)

  def adapt(self, support_x, support_y, steps: Optional[int] = None,
            inner_lr: Optional[float] = None) -> keras.Model:
    """A new model adapted to one task (``MAML.adapt``)."""
    self._check_compiled()
    return self.learner.adapt(support_x, support_y, steps=steps,
                              inner_lr=inner_lr)
