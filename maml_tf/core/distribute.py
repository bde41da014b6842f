"""Data-parallel meta-training with ``tf.distribute``: the meta-batch is split.

:class:`DistributedMAML` runs the meta-step of a :class:`maml_tf.MAML` on
every replica of a ``tf.distribute`` strategy (``MirroredStrategy``: the
devices of one machine; ``MultiWorkerMirroredStrategy``: several machines
described by ``TF_CONFIG``). For a meta-batch of ``T`` tasks and ``R =
strategy.num_replicas_in_sync`` replicas:

* split: replica ``r`` adapts tasks ``r*T/R .. (r+1)*T/R - 1`` (``T`` must be
  a multiple of ``R``) and differentiates the mean query loss of its own
  tasks through the learner's public ``compute_gradients`` (the same
  meta-gradient code as on one device);
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

import json
import os
from typing import Callable, Dict, Optional

import keras
import tensorflow as tf

from maml_tf.common.interrupts import UserFacingError
from maml_tf.core import keras_compat
from maml_tf.core import numerics
from maml_tf.core import runner as runner_lib
from maml_tf.core.keras_compat import unscaled_keras_losses
from maml_tf.core.learner import MAML
from maml_tf.core.task_batch import TaskBatch


class DistributionError(UserFacingError, ValueError):
  """A cluster or meta-batch that the strategy cannot run (the message
  says what to set)."""


STRATEGIES = ("none", "mirrored", "multi_worker")


def make_strategy(name: str = "none") -> tf.distribute.Strategy:
  """The ``tf.distribute`` strategy behind a launcher's ``--distribute`` flag.

  Call it before anything else creates TensorFlow tensors or variables:
  ``MultiWorkerMirroredStrategy`` configures the collective ops of the
  process when it is created.

  Arguments:
    name: ``"none"`` (the default strategy: one device, a no-op scope),
      ``"mirrored"`` (``MirroredStrategy`` over every local GPU,
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
    raise DistributionError(
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
    raise DistributionError(
        f"TF_CONFIG must be JSON with cluster.worker (a list of host:port) and "
        f"task.type / task.index ({type(e).__name__}: {e}); got {raw!r}"
    ) from None
  if not workers:
    raise DistributionError(f"TF_CONFIG lists no workers: {raw!r}")
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


def _raw_variable(v):
  return v.value if isinstance(v, keras.Variable) else v


def check_variables(maml: MAML, strategy: tf.distribute.Strategy,
                    hint: Optional[str] = None) -> None:
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
  hint = hint or (
      "Create the model, its meta-optimizer and the MAML learner under "
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
  opt_strategy = keras_compat.optimizer_strategy(maml.meta_optimizer, strategy)
  if opt_strategy is not strategy:
    raise ValueError(
        f"the meta-optimizer {type(maml.meta_optimizer).__name__} was created "
        f"outside this {type(strategy).__name__}'s scope (it belongs to "
        f"{type(opt_strategy).__name__}). {hint}")


class DistributedMAML:
  """A :class:`maml_tf.MAML` whose meta-batch is split across replicas.

  ``train_step`` / ``train_step_tensors`` / ``train_steps`` return the same
  metrics as the wrapped learner's (the means over all ``T`` tasks). The
  learner's training API is offered explicitly (``model``,
  ``meta_optimizer``, ``checkpoint_items``, ``evaluate``, ``adapt``,
  ``plan``), so a ``DistributedMAML`` can be passed wherever training code
  expects a learner (e.g. :func:`maml_tf.training.loop.meta_train`); anything
  else is on ``.maml``.

  Per meta-step, replica ``r`` of ``R`` takes tasks ``[r*T/R, (r+1)*T/R)``
  of the ``T``-task batch and runs the learner's public
  :meth:`~maml_tf.MAML.compute_gradients` on them (so every member of the
  family, Reptile included, distributes); the gradients are averaged over
  replicas (scaled by ``1/R`` and summed by the Keras optimizer's
  all-reduce, Keras' convention for custom distributed loops), which equals
  the single-device meta-gradient of the mean over all ``T`` tasks; the
  meta-optimizer applies it once (:meth:`~maml_tf.MAML.apply_gradients`).
  BatchNorm moving statistics become the mean over all tasks, as on one
  device. ``train_steps`` runs many such steps in one compiled loop, the
  batches sampled in the graph and split the same way (never under XLA).

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
    check_variables(maml, strategy)
    self.maml = maml
    self.strategy = strategy
    self._runner = runner_lib.Runner(maml.model.name)
    self._step_plans = {}

  # ------------------------------------------- the learner's training API
  @property
  def model(self) -> keras.Model:
    return self.maml.model

  @property
  def meta_optimizer(self) -> keras.optimizers.Optimizer:
    return self.maml.meta_optimizer

  def checkpoint_items(self) -> Dict[str, object]:
    return self.maml.checkpoint_items()

  def evaluate(self, *args, **kwargs):
    """The wrapped learner's :meth:`~maml_tf.MAML.evaluate` (one device)."""
    return self.maml.evaluate(*args, **kwargs)

  def adapt(self, *args, **kwargs):
    """The wrapped learner's :meth:`~maml_tf.MAML.adapt` (one device)."""
    return self.maml.adapt(*args, **kwargs)

  @property
  def num_replicas(self) -> int:
    """``strategy.num_replicas_in_sync`` (all workers together)."""
    return int(self.strategy.num_replicas_in_sync)

  def plan(self, batch, first_order: Optional[bool] = None):
    """The plan each replica runs its share of ``batch`` with."""
    local = self._local_shape(self.maml.prepare(batch))
    return self.maml.plan(local, first_order, distributed=True)

  # ------------------------------------------------------------- the step
  def _per_replica(self, tasks: int) -> int:
    replicas = self.num_replicas
    if tasks % replicas:
      raise DistributionError(
          f"the meta-batch has {tasks} tasks, which cannot be split evenly "
          f"across {replicas} replicas (strategy.num_replicas_in_sync = "
          f"{replicas}); use a meta-batch size that is a multiple of "
          f"{replicas}")
    return tasks // replicas

  def _local_shape(self, batch: TaskBatch) -> TaskBatch:
    n = self._per_replica(batch.num_tasks)
    return TaskBatch(*(t[:n] for t in batch))

  def _split(self, batch: TaskBatch):
    """The per-replica slices of ``batch`` (a TaskBatch of PerReplica)."""
    per_replica = self._per_replica(batch.num_tasks)

    def slice_for(context):
      start = context.replica_id_in_sync_group * per_replica
      return TaskBatch(*(t[start:start + per_replica] for t in batch))
    return self.strategy.experimental_distribute_values_from_function(
        slice_for)

  def _step(self, plan, before: bool) -> Callable:
    """``per-replica batch -> metrics``: one distributed meta-step."""
    maml, strategy = self.maml, self.strategy

    def step(per_replica_batch):
      metrics, new_state, checked = strategy.run(
          lambda local: replica_meta_step(maml, local, plan, before),
          args=(per_replica_batch,))
      write_replicated_state(maml, strategy, new_state, checked)
      return tf.nest.map_structure(
          lambda v: strategy.experimental_local_results(v)[0], metrics)
    return step

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
    batch = self.maml.prepare(batch)
    plan = self.plan(batch)
    distributed = self._split(batch)
    before = bool(pre_update_metrics)
    fn = self._runner.function(
        ("distributed_train", id(self.strategy), before),
        lambda p: self._step(p, before), plan, distributed,
        second_order=not plan.first_order)
    with numerics.floating_point_errors():
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

  def train_steps(self, sample_batch: Callable[[tf.Tensor], TaskBatch],
                  num_steps: int, pre_update_metrics: bool = False
                  ) -> Dict[str, tf.Tensor]:
    """``num_steps`` distributed meta-updates in one compiled loop.

    As :meth:`maml_tf.MAML.train_steps`: ``sample_batch(iteration)`` draws
    the full meta-batch in the graph before each step; each replica runs its
    share. Never under XLA.

    Raises:
      ValueError: the sampled meta-batch does not split evenly.
    """
    num_steps = runner_lib.check_num_steps(num_steps)
    maml = self.maml
    before = bool(pre_update_metrics)
    first_order = maml.first_order_now()
    key = ("distributed_steps", id(self.strategy), id(sample_batch),
           num_steps, first_order, before)
    plan = self._step_plans.get(key)
    if plan is None:
      plan = self._step_plans[key] = self.plan(
          sample_batch(maml.meta_optimizer.iterations), first_order)
    dtype = maml.model.trainable_variables[0].dtype

    def make_loop(plan):
      step = self._step(plan, before)
      sample = lambda: self._split(
          maml.prepare(sample_batch(maml.meta_optimizer.iterations)))
      return runner_lib.steps_loop(
          lambda: runner_lib.StepOutput(step(sample())), num_steps,
          maml.metric_names(plan, before), dtype,
          1 + len(maml.meta_variables), xla=False)
    return self._runner.call_steps(key, make_loop, plan,
                                   second_order=not first_order,
                                   xla_auto=False,
                                   variables=maml.meta_variables)


def replica_tasks(local_batch: TaskBatch):
  """``(first_task, share, tasks)`` of a replica's tasks (in a replica
  context): the index of its first task in the whole meta-batch (replica
  ``r`` holds the tasks after those of replicas ``0 .. r-1``), its fraction
  of all the tasks (a float64 scalar) and its task count.

  The replicas' counts come from one all-reduce (no all-gather, which some
  cross-device backends lack). A replica without tasks is an error naming
  the cause, raised before any of its work.
  """
  context = tf.distribute.get_replica_context()
  replicas = context.num_replicas_in_sync
  tasks = tf.shape(tf.nest.flatten(local_batch.support_y)[0])[0]
  check = tf.debugging.assert_positive(
      tasks, message=(
          "a replica got no tasks: the meta-batch holds fewer tasks than the "
          "strategy's replicas (strategy.num_replicas_in_sync)"))
  with tf.control_dependencies([check]):
    tasks = tf.identity(tasks)
  mine = tf.one_hot(context.replica_id_in_sync_group, replicas,
                    dtype=tf.float64) * tf.cast(tasks, tf.float64)
  counts = context.all_reduce(tf.distribute.ReduceOp.SUM, mine)
  first_task = tf.cast(
      tf.reduce_sum(counts[:context.replica_id_in_sync_group]), tf.int64)
  share = tf.cast(tasks, tf.float64) / tf.reduce_sum(counts)
  return first_task, share, tasks


def replica_meta_step(maml: MAML, local_batch: TaskBatch, plan,
                      pre_update_metrics: bool, order_switch=None):
  """One replica's share of a distributed meta-step (in a replica context).

  What :class:`DistributedMAML` runs under ``strategy.run`` and
  :class:`maml_tf.MetaModel` runs in ``fit``'s ``train_step`` under a
  strategy. The replica differentiates the mean query loss of its own tasks
  (:meth:`~maml_tf.MAML.compute_gradients`, Keras losses unscaled), weighs
  the meta-gradient by its share of all the replicas' tasks and hands it to
  the meta-optimizer, whose all-reduce sums the shares: the mean over every
  task, as one device computes it, also when the replicas hold unequal
  shares. Metrics and BatchNorm moving statistics are summed by the same
  shares. Random layers draw what these tasks draw in the whole meta-batch
  (replica ``r`` holds the tasks after those of replicas ``0 .. r-1``).

  ``order_switch``: ``(use_first_order, first_order_plan)`` for MAML++'s
  derivative-order annealing decided in the graph: the meta-gradient comes
  from ``first_order_plan`` where the boolean tensor holds. Only the
  gradients sit inside that ``tf.cond``: the replicas' synchronisation
  points (all-reduce, the optimizer's update) cannot.

  Returns:
    ``(metrics, new_state, checked)``: the metrics and the non-trainable
    state (already the means over all tasks) for
    :func:`write_replicated_state`, and a tensor that exists once this
    replica's finite checks passed.
  """
  context = tf.distribute.get_replica_context()
  first_task, share, _ = replica_tasks(local_batch)

  def gradients(plan):
    with unscaled_keras_losses():   # traced in the replica's own thread
      if any(maml.inner_loop.seed_mask):
        return maml.compute_gradients(local_batch, plan, pre_update_metrics,
                                      first_task)
      return maml.compute_gradients(local_batch, plan, pre_update_metrics)
  if order_switch is None:
    result = gradients(plan)
  else:
    use_first_order, first_order_plan = order_switch
    result = tf.cond(use_first_order, lambda: gradients(first_order_plan),
                     lambda: gradients(plan))
  weigh = lambda t: t * tf.cast(share, t.dtype)
  # The Keras optimizer all-reduces gradients with SUM in a replica context.
  _, checks = maml.guarded_update([weigh(g) for g in result.grads], plan,
                                  result.loss)
  with tf.control_dependencies(checks):
    checked = tf.identity(tf.constant(True))
  kinds = maml.state_kinds
  means = [s for s, kind in zip(result.new_state, kinds) if kind == "mean"]
  metrics, means = context.all_reduce(
      tf.distribute.ReduceOp.SUM,
      tf.nest.map_structure(weigh, (result.metrics, means)))
  means = iter(means)
  new_state = [next(means) if kind == "mean" else s
               for s, kind in zip(result.new_state, kinds)]
  return metrics, new_state, checked


def write_replicated_state(maml: MAML, strategy: tf.distribute.Strategy,
                           new_state, checked) -> None:
  """Writes :func:`replica_meta_step`'s non-trainable state (cross-replica
  context: after ``strategy.run``, or in a ``merge_call``).

  BatchNorm moving statistics (and random layers' seeds): every replica
  writes its own copy with its replica's (already averaged) value, after
  every replica's finite checks passed.
  """
  with tf.control_dependencies(strategy.experimental_local_results(checked)):
    for var, kind, value in zip(maml.model.non_trainable_variables,
                                maml.state_kinds, new_state):
      if kind != "keep":
        strategy.extended.update(
            _raw_variable(var), lambda v, x: v.assign(x), args=(value,),
            group=False)


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
  if strategy is None or keras_compat.is_default_strategy(strategy):
    return maml
  return DistributedMAML(maml, strategy)
