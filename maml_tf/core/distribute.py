"""Data-parallel meta-training with ``tf.distribute``: the meta-batch is split.

:class:`DistributedMAML` runs the meta-step of a :class:`maml_tf.MAML` on
every replica of a ``tf.distribute`` strategy (``MirroredStrategy``: the
devices of one machine; ``MultiWorkerMirroredStrategy``: several machines
described by ``TF_CONFIG``). For a meta-batch of ``T`` tasks and ``R =
strategy.num_replicas_in_sync`` replicas:

* split: replica ``r`` adapts tasks ``r*T/R .. (r+1)*T/R - 1`` (``T`` must be
  a multiple of ``R``) and differentiates the mean query loss of its own
  tasks, second order unless the learner is first order (the same
  ``MAML._run_tasks`` as on one device);
* averaged: the meta-gradients (all-reduced, the mean over replicas), the
  metrics, and the BatchNorm moving statistics (each replica's mean over its
  tasks, then the mean over replicas). With equal task counts every mean over
  replicas equals the mean over all ``T`` tasks, so one distributed meta-step
  computes what :meth:`MAML.train_step` computes on one device, up to
  float rounding;
* applied once: the meta-optimizer takes one step; every replica (and
  worker) ends with the same weights.

The model, the meta-optimizer and the learned inner step sizes (if any) are
variables that every replica updates, so they must be created under
``strategy.scope()`` - build the model *and* the :class:`MAML` there.
:class:`DistributedMAML` checks this and names the first variable that is not
a variable of the strategy.

Evaluation and adaptation (``evaluate``, ``adapt``) are not distributed; they
are forwarded to the wrapped learner and run on one device. Call them outside
``strategy.scope()``: within it, Keras divides the value of ``keras.losses``
objects by the number of replicas (see :func:`unscaled_keras_losses`).

Example:
  >>> strategy = make_strategy("mirrored")
  >>> with strategy.scope():
  ...   maml = MAML(mlp(1, 1), "mse", inner_lr=0.01)
  >>> learner = DistributedMAML(maml, strategy)
  >>> learner.train_step(batch)            # T tasks split over the replicas
  {'loss_before': 2.91, 'loss_after': 1.87}
"""

# This module drives MAML's meta-step pieces (_read_meta, _run_tasks, ...).
# pylint: disable=protected-access

import contextlib
import json
import os
import threading
import warnings
from typing import Dict, Optional

import keras
import tensorflow as tf
from tensorflow.python.distribute import distribute_lib  # pylint: disable=g-direct-tensorflow-import

from maml_tf.core import maml as maml_lib
from maml_tf.core.maml import MAML
from maml_tf.core.task_batch import TaskBatch

STRATEGIES = ("none", "mirrored", "multi_worker")
_PATCH_LOCK = threading.RLock()


def make_strategy(name: str = "none") -> tf.distribute.Strategy:
  """The ``tf.distribute`` strategy behind a launcher's ``--distribute`` flag.

  Call it before anything else creates TensorFlow tensors or variables:
  ``MultiWorkerMirroredStrategy`` configures the collective ops of the
  process when it is created.

  Arguments:
    name: ``"none"`` (the default strategy: one device, a no-op scope),
      ``"mirrored"`` (``MirroredStrategy`` over every GPU of this machine,
      else its CPU) or ``"multi_worker"`` (``MultiWorkerMirroredStrategy``;
      the cluster and this process's place in it come from ``TF_CONFIG``).

  Returns:
    a ``tf.distribute.Strategy``.

  Raises:
    ValueError: an unknown name, or ``"multi_worker"`` without a valid
      ``TF_CONFIG``.

  Example:
    >>> strategy = make_strategy("mirrored")
    >>> strategy.num_replicas_in_sync       # e.g. the number of GPUs
    2
  """
  if name not in STRATEGIES:
    raise ValueError(f"distribute must be one of {list(STRATEGIES)}, got "
                     f"{name!r}")
  if name == "none":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  raw = os.environ.get("TF_CONFIG")
  if not raw:
    raise ValueError(
        "distribute='multi_worker' reads the cluster from the TF_CONFIG "
        "environment variable, which is not set. Set it on every worker, e.g. "
        'TF_CONFIG=\'{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
        '"task": {"type": "worker", "index": 0}}\'')
  try:
    config = json.loads(raw)
    workers = config["cluster"]["worker"]
    task = config["task"]
    task["type"], int(task["index"])  # pylint: disable=expression-not-assigned
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"TF_CONFIG must be JSON with cluster.worker (a list of host:port) and "
        f"task.type / task.index ({type(e).__name__}: {e}); got {raw!r}"
    ) from None
  if not workers:
    raise ValueError(f"TF_CONFIG lists no workers: {raw!r}")
  return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True unless this process is a non-chief worker of a multi-worker cluster.

  The chief is the task of type ``chief`` if the cluster has one, else
  worker 0. Non-chief workers should write checkpoints and logs elsewhere
  (see :func:`worker_workdir`).

  Example:
    >>> is_chief(make_strategy("none"))
    True
  """
  resolver = getattr(strategy, "cluster_resolver", None)
  task_type = getattr(resolver, "task_type", None)
  if resolver is None or task_type is None:
    return True
  if task_type == "chief":
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return task_type == "worker" and not has_chief and resolver.task_id == 0


def worker_workdir(workdir: str, strategy: tf.distribute.Strategy) -> str:
  """``workdir`` for the chief; ``workdir/workers/<type>_<index>`` for others.

  Every worker of a multi-worker run saves checkpoints (the weights are the
  same on all of them); only the chief's go to ``workdir``, so that workers
  sharing a file system do not overwrite each other.

  Example:
    >>> worker_workdir("runs/x", make_strategy("none"))
    'runs/x'
  """
  if is_chief(strategy):
    return workdir
  resolver = strategy.cluster_resolver
  return os.path.join(workdir, "workers",
                      f"{resolver.task_type}_{resolver.task_id}")


def _is_default(strategy: tf.distribute.Strategy) -> bool:
  """True for TensorFlow's default (no-op, one device) strategy."""
  return strategy is distribute_lib._get_default_strategy()


def _raw_variable(v):
  return v.value if isinstance(v, keras.Variable) else v


def check_variables(maml: MAML, strategy: tf.distribute.Strategy) -> None:
  """Raises ``ValueError`` unless ``maml`` was built under ``strategy.scope()``.

  Checks the model's variables, the learned inner step sizes, the
  meta-optimizer's variables and the strategy the meta-optimizer was created
  under.

  Arguments:
    maml: the learner.
    strategy: the strategy it is to be trained with.

  Example:
    >>> with strategy.scope():
    ...   maml = MAML(model_fn(), "mse")
    >>> check_variables(maml, strategy)      # passes
  """
  hint = ("Create the model, its meta-optimizer and the MAML learner under "
          "`with strategy.scope():` (e.g. `with strategy.scope(): maml = "
          "MAML(build_model(), loss, meta_optimizer=keras.optimizers.Adam())"
          "`), then wrap it: DistributedMAML(maml, strategy).")
  groups = (("model", maml.model.variables),
            ("learned inner step size", maml.inner_lr_variables),
            ("meta-optimizer", maml.meta_optimizer.variables))
  for what, variables in groups:
    for v in variables:
      if not strategy.extended.variable_created_in_scope(_raw_variable(v)):
        raise ValueError(
            f"{what} variable {getattr(v, 'path', v.name)!r} is not a "
            f"variable of this {type(strategy).__name__}: it was created "
            f"outside strategy.scope(). {hint}")
  opt_strategy = getattr(maml.meta_optimizer, "_distribution_strategy",
                         strategy)
  if opt_strategy is not strategy:
    raise ValueError(
        f"the meta-optimizer {type(maml.meta_optimizer).__name__} was created "
        f"outside this {type(strategy).__name__}'s scope (it belongs to "
        f"{type(opt_strategy).__name__}). {hint}")


@contextlib.contextmanager
def unscaled_keras_losses():
  """Within this context Keras losses do not divide by the replica count.

  Under a ``tf.distribute`` strategy with ``R > 1`` replicas, Keras 3's
  ``Loss`` objects (``reduction="sum_over_batch_size"``) multiply their value
  by ``1/R``, Keras' convention for ``model.fit``. MAML's losses are per-task
  means (the inner loop steps on them, so scaling them would also shrink
  every inner step); :class:`DistributedMAML` traces its replica step in this
  context and averages across replicas itself.

  Example:
    >>> with strategy.scope(), unscaled_keras_losses():
    ...   loss = keras.losses.MeanSquaredError()(y, pred)   # not divided by R
  """
  try:
    from keras.src.losses import loss as loss_module  # pylint: disable=g-import-not-at-top
    original = loss_module.scale_loss_for_distribution
  except (ImportError, AttributeError):  # pragma: no cover - other Keras
    warnings.warn(
        "maml_tf could not turn off Keras' 1/num_replicas loss scaling; with "
        f"Keras {keras.__version__}, keras.losses.Loss objects may be divided "
        "by the number of replicas in DistributedMAML (plain loss functions "
        "such as 'mse' are not affected).")
    yield
    return
  with _PATCH_LOCK:
    loss_module.scale_loss_for_distribution = lambda value: value
    try:
      yield
    finally:
      loss_module.scale_loss_for_distribution = original


class DistributedMAML:
  """A :class:`maml_tf.MAML` whose meta-batch is split across replicas.

  ``train_step`` / ``train_step_tensors`` return the same metrics as
  :meth:`MAML.train_step` (the means over all ``T`` tasks); every other
  attribute (``model``, ``meta_optimizer``, ``evaluate``, ``adapt``,
  ``checkpoint_items``, ...) is the wrapped learner's, so a
  ``DistributedMAML`` can be passed wherever training code expects a learner
  (e.g. :func:`maml_tf.training.loop.meta_train`).

  Per meta-step, replica ``r`` of ``R`` takes tasks ``[r*T/R, (r+1)*T/R)``
  of the ``T``-task batch, computes the meta-gradient of the mean query loss
  of those tasks, and the gradients are averaged over replicas (scaled by
  ``1/R`` and summed by the Keras optimizer's all-reduce, Keras' convention
  for custom distributed loops), which equals the single-device
  meta-gradient of the mean over all ``T`` tasks. The meta-optimizer applies
  it once. BatchNorm moving statistics become the mean over all tasks, as on
  one device.

  Every worker of a multi-worker run must call ``train_step`` with the same
  full meta-batch (e.g. drawn from the same seed and iteration number, as
  the training families do); each keeps only its replicas' tasks.

  Arguments:
    maml: a :class:`maml_tf.MAML` whose model and meta-optimizer were created
      under ``strategy.scope()`` (checked: ``ValueError`` otherwise).
    strategy: a ``tf.distribute.MirroredStrategy`` or
      ``MultiWorkerMirroredStrategy`` (any strategy with replica contexts
      and all-reduce should do).

  Example:
    >>> strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    >>> with strategy.scope():
    ...   maml = MAML(mlp(1, 1), "mse", inner_lr=0.01,
    ...               meta_optimizer=keras.optimizers.Adam(1e-3))
    >>> learner = DistributedMAML(maml, strategy)
    >>> learner.train_step(batch)           # batch.num_tasks even
    >>> maml.evaluate(test_batch)           # one device
  """

  def __init__(self, maml: MAML, strategy: tf.distribute.Strategy):
    if not isinstance(maml, MAML):
      raise TypeError(f"DistributedMAML wraps a maml_tf.MAML, got "
                      f"{type(maml).__name__}")
    if type(maml)._make_train_step is not MAML._make_train_step:
      raise TypeError(
          f"{type(maml).__name__} has its own meta-step, which DistributedMAML "
          "does not reproduce; it distributes MAML's (including first-order "
          "MAML, Meta-SGD, ANIL and MAML++, which are MAML options)")
    check_variables(maml, strategy)
    self.maml = maml
    self.strategy = strategy

  def __getattr__(self, name):
    # Only called for attributes this wrapper does not have.
    if name in ("maml", "strategy"):
      raise AttributeError(name)
    return getattr(self.maml, name)

  @property
  def num_replicas(self) -> int:
    """``strategy.num_replicas_in_sync`` (all workers together)."""
    return int(self.strategy.num_replicas_in_sync)

  # ------------------------------------------------------------- the step
  def _split(self, batch: TaskBatch) -> TaskBatch:
    """The per-replica slices of ``batch`` (a TaskBatch of PerReplica)."""
    replicas = self.num_replicas
    tasks = batch.num_tasks
    if tasks % replicas:
      raise ValueError(
          f"the meta-batch has {tasks} tasks, which cannot be split evenly "
          f"across {replicas} replicas (strategy.num_replicas_in_sync = "
          f"{replicas}); use a meta-batch size that is a multiple of "
          f"{replicas}")
    per_replica = tasks // replicas

    def slice_for(context):
      start = context.replica_id_in_sync_group * per_replica
      return TaskBatch(*(t[start:start + per_replica] for t in batch))
    return self.strategy.experimental_distribute_values_from_function(
        slice_for)

  def _make_train_step(self, with_acc: bool, first_order: bool,
                       before: bool = True):
    maml, strategy = self.maml, self.strategy
    plan = maml._train_plan(first_order, before)
    scale = 1.0 / self.num_replicas

    def replica_step(local_batch):
      context = tf.distribute.get_replica_context()
      params, state, lrs = maml._read_meta()
      grads, out, loss = maml._meta_gradients(plan, params, state, lrs,
                                              local_batch, with_acc)
      # The Keras optimizer all-reduces gradients with SUM in a replica
      # context; 1/R makes that the mean over replicas (= over all tasks).
      maml._apply([g * tf.cast(scale, g.dtype) for g in grads])
      metrics = maml._metrics(out, loss, with_acc, plan)
      new_state = maml._new_state(state, out["state"])
      means = [s for s, kind in zip(new_state, maml._state_kinds)
               if kind == "mean"]
      metrics, means = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                          (metrics, means))
      means = iter(means)
      new_state = [next(means) if kind == "mean" else s
                   for s, kind in zip(new_state, maml._state_kinds)]
      return metrics, new_state

    def train_step(per_replica_batch):
      with unscaled_keras_losses():   # the replica threads trace in here
        metrics, new_state = strategy.run(replica_step,
                                          args=(per_replica_batch,))
      # BatchNorm moving statistics (and RNG seeds): every replica writes
      # its own copy with the (already averaged) value of its replica.
      for var, kind, value in zip(maml.model.non_trainable_variables,
                                  maml._state_kinds, new_state):
        if kind != "keep":
          strategy.extended.update(
              _raw_variable(var), lambda v, x: v.assign(x), args=(value,),
              group=False)
      return tf.nest.map_structure(
          lambda v: strategy.experimental_local_results(v)[0], metrics)
    return train_step

  def train_step_tensors(self, batch: TaskBatch,
                         pre_update_metrics: bool = True
                         ) -> Dict[str, tf.Tensor]:
    """As :meth:`train_step` but returns tensors (no host synchronisation).

    Arguments:
      batch: the full meta-batch (``T`` tasks, a multiple of the replicas).

    Example:
      >>> metrics = learner.train_step_tensors(batch)
      >>> float(metrics["loss_after"])
    """
    maml = self.maml
    batch = maml._prepare(batch)
    with_acc = maml._wants_accuracy(batch)
    first_order = maml._first_order_now()
    distributed = self._split(batch)
    before = bool(pre_update_metrics)
    key = ("distributed_train", id(self.strategy), with_acc, first_order,
           before)
    fn = maml._compile(key, lambda: self._make_train_step(with_acc,
                                                          first_order, before),
                       distributed, second_order=not first_order)
    with maml_lib._floating_point_errors():  # pylint: disable=protected-access
      return fn(distributed)

  def train_step(self, batch: TaskBatch,
                 pre_update_metrics: bool = True) -> Dict[str, float]:
    """One meta-update on ``batch``, its tasks split across the replicas.

    Returns the same metrics as :meth:`MAML.train_step` (``loss_before``,
    ``loss_after`` and, for classification, ``accuracy_before/after``: the
    means over all tasks) as Python floats. Raises ``FloatingPointError``
    and leaves the weights unchanged if the loss or the meta-gradient of a
    replica is not finite.

    Arguments:
      batch: the full meta-batch; ``batch.num_tasks`` must be a multiple of
        ``strategy.num_replicas_in_sync`` (``ValueError`` naming both
        otherwise).

    Example:
      >>> learner.train_step(batch)
      {'loss_before': 2.91, 'loss_after': 1.87}
    """
    return {k: float(v) for k, v in
            self.train_step_tensors(batch, pre_update_metrics).items()}


def distributed_learner(maml: MAML, strategy: Optional[tf.distribute.Strategy]):
  """``maml`` itself for the default strategy, else ``DistributedMAML``.

  What the training families pass to ``meta_train``.

  Arguments:
    maml: a learner built under ``strategy.scope()``.
    strategy: from :func:`make_strategy` (``None``: the default strategy).

  Example:
    >>> strategy = make_strategy(config.distribute)
    >>> with strategy.scope():
    ...   maml = build_learner(config)
    >>> trainer = distributed_learner(maml, strategy)
    >>> meta_train(trainer, batches, iterations, workdir)
  """
  if strategy is None or _is_default(strategy):
    return maml
  return DistributedMAML(maml, strategy)
