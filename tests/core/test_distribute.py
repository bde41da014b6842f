"""DistributedMAML: a meta-step split across replicas equals the one-device step.

TensorFlow fixes its devices when it first uses them, so every check that
needs two replicas runs in a fresh Python process (this file run as a
script): two logical CPU devices under ``MirroredStrategy``, and two worker
processes on 127.0.0.1 under ``MultiWorkerMirroredStrategy``. Each process
also runs the same meta-step on one device and reports the largest
differences, which the tests check.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
TOL = 1e-5


# ------------------------------------------------ code run in subprocesses
def _cases():
  """``(name, build_maml, batch)``: conv + BatchNorm classifier, sinusoid MLP."""
  import keras  # pylint: disable=g-import-not-at-top
  from maml_tf import MAML  # pylint: disable=g-import-not-at-top
  from maml_tf.models.mlp import mlp  # pylint: disable=g-import-not-at-top
  from maml_tf.tasks import sinusoid  # pylint: disable=g-import-not-at-top
  from maml_tf.core.task_batch import TaskBatch  # pylint: disable=g-import-not-at-top

  def conv_bn():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(3)], name="conv_bn")
    # SGD: Adam's first step is ~lr * sign(g), which would blow float noise
    # on (near) zero gradients up to lr.
    return MAML(model,
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                inner_lr=0.1, meta_optimizer=keras.optimizers.SGD(0.5))

  def sine():
    keras.utils.set_random_seed(3)
    # A keras.losses.Loss object: Keras divides those by the replica count
    # under a strategy unless DistributedMAML turns that off.
    # Learned per-layer per-step inner step sizes and the multi-step loss
    # (MAML++): more meta-variables and a "meta_loss" metric to average.
    return MAML(mlp(1, 1, hidden=(16, 16)), keras.losses.MeanSquaredError(),
                inner_lr=0.05, inner_steps=2,
                learn_inner_lr="per_layer_per_step",
                multi_step_loss_iterations=10,
                meta_optimizer=keras.optimizers.Adam(0.01))

  rng = np.random.default_rng(0)
  images = TaskBatch(rng.normal(size=(4, 3, 8, 8, 1)).astype("float32"),
                     np.tile(np.arange(3), (4, 1)),
                     rng.normal(size=(4, 6, 8, 8, 1)).astype("float32"),
                     np.tile(np.arange(3).repeat(2), (4, 1)))
  sines = [sinusoid.sample_batch(4, 5, 7, np.random.default_rng(s))[0]
           for s in (1, 2)]
  return [("conv_bn", conv_bn, [images]), ("sinusoid_mlp", sine, sines)]


def _reptile_and_steps(strategy):
  """Reptile distributed (it overrides only the public compute_gradients),
  and train_steps split over the replicas: each equals one device."""
  import keras  # pylint: disable=g-import-not-at-top
  from maml_tf import MAML  # pylint: disable=g-import-not-at-top
  from maml_tf.core.distribute import DistributedMAML  # pylint: disable=g-import-not-at-top
  from maml_tf.core.reptile import Reptile  # pylint: disable=g-import-not-at-top
  from maml_tf.models.mlp import mlp  # pylint: disable=g-import-not-at-top
  from maml_tf.tasks import sinusoid  # pylint: disable=g-import-not-at-top
  traced = []

  class Spy(MAML):
    """Records the tasks each traced replica step differentiates."""

    def compute_gradients(self, batch, plan, pre_update_metrics=True):
      traced.append(int(batch.support_x.shape[0]))
      return super().compute_gradients(batch, plan, pre_update_metrics)

  def build(cls, **kwargs):
    keras.utils.set_random_seed(4)
    if cls is Spy:      # optimizers are variables: made in the caller's scope
      kwargs["meta_optimizer"] = keras.optimizers.SGD(0.1)
    return cls(mlp(1, 1, hidden=(8,)), keras.losses.MeanSquaredError(),
               inner_lr=0.05, **kwargs)
  report = {}
  batch = sinusoid.sample_batch(4, 5, 5, np.random.default_rng(3))[0]
  sampler = sinusoid.batch_sampler(4, 5, 5, seed=1)
  for name, cls, kwargs, run in (
      # Reptile on the mapped path (per-task functional_call traced in the
      # replica threads while the main thread holds the loss patch).
      ("reptile", Reptile, {"outer_step_size": 0.5, "vectorize": False},
       lambda learner: [learner.train_step(batch) for _ in range(2)][-1]),
      ("train_steps", Spy, {"jit_compile": False},
       lambda learner: {k: float(v) for k, v in
                        learner.train_steps(sampler, 3, True).items()})):
    with strategy.scope():
      distributed = build(cls, **kwargs)
    learner = DistributedMAML(distributed, strategy)
    got = run(learner)
    replica_traces = list(traced)
    single = build(cls, **kwargs)
    want = run(single)
    report[name] = {
        "metric_diff": max(abs(got[k] - want[k]) for k in want),
        "weight_diff": max(float(np.abs(a.numpy() - b.numpy()).max())
                           for a, b in zip(distributed.model.variables,
                                           single.model.variables)),
        "iterations": int(distributed.meta_optimizer.iterations.numpy()),
        "replica_tasks": replica_traces}
    traced.clear()
  return report


def _sinusoid_launcher(workdir):
  """The sinusoid experiment with distribute='mirrored' and its default
  steps_per_call (in-graph train_steps): runs on both replicas, refuses a
  meta-batch that does not split."""
  from maml_tf.training import sinusoid as experiment  # pylint: disable=g-import-not-at-top
  lines = []
  config = experiment.make_config("smoke", distribute="mirrored",
                                  meta_batch=4, iterations=200, baseline=False,
                                  plot=False, eval_tasks=10)
  assert config.steps_per_call > 1
  experiment.train_and_evaluate(config, os.path.join(workdir, "sin"),
                                log=lines.append)
  try:
    experiment.train_and_evaluate(
        experiment.make_config("smoke", distribute="mirrored", meta_batch=25,
                               baseline=False, plot=False),
        os.path.join(workdir, "odd"), log=lines.append)
    odd = None
  except ValueError as e:
    odd = str(e)
  return {"log": lines, "odd": odd}


def _compare(strategy, weights_out):
  """Runs each case distributed and on one device; returns the differences."""
  from maml_tf.core.distribute import DistributedMAML  # pylint: disable=g-import-not-at-top
  report = {}
  for name, build, batches in _cases():
    with strategy.scope():
      distributed = build()
    single = build()
    learner = DistributedMAML(distributed, strategy)
    metrics = [(learner.train_step(b), single.train_step(b)) for b in batches]
    variables = lambda m: m.model.variables + m.inner_lr_variables
    weights = [v.numpy() for v in variables(distributed)]
    report[name] = {
        "replicas": learner.num_replicas,
        "metric_keys": sorted(metrics[0][0]),
        "metric_diff": max(abs(a[k] - b[k]) for a, b in metrics for k in b),
        "weight_diff": max(
            float(np.abs(w - v.numpy()).max())
            for w, v in zip(weights, variables(single))),
        "moved": max(float(np.abs(w - v.numpy()).max())
                     for w, v in zip(weights, variables(build()))),
        "iterations": [int(distributed.meta_optimizer.iterations.numpy()),
                       int(single.meta_optimizer.iterations.numpy())],
    }
    weights_out[name] = weights
  return report


def _non_finite_step_changes_nothing(strategy, errors):
  """A finite loss whose meta-gradient is not finite (only the outer loop
  differentiates ``sqrt(w)`` at ``w = 0``): the distributed step raises and
  leaves every variable, BatchNorm's moving statistics (written after the
  replicas' steps) and the iteration count included."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from maml_tf import MAML  # pylint: disable=g-import-not-at-top
  from maml_tf.core.distribute import DistributedMAML  # pylint: disable=g-import-not-at-top
  from maml_tf.tasks import sinusoid  # pylint: disable=g-import-not-at-top

  class SqrtShift(keras.layers.Layer):

    def build(self, input_shape):
      self.w = self.add_weight(shape=(), initializer="zeros", name="w")

    def call(self, x):
      return x + tf.sqrt(self.w)

  with strategy.scope():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((1,))
    hidden = keras.layers.BatchNormalization()(keras.layers.Dense(4)(
        SqrtShift(name="shift")(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))
    learner = DistributedMAML(MAML(
        model, keras.losses.MeanSquaredError(), inner_lr=0.05, adapt=["head"],
        meta_optimizer=keras.optimizers.SGD(0.1)), strategy)
  snapshot = lambda: ([v.numpy().copy() for v in model.variables]
                      + [learner.maml.meta_optimizer.iterations.numpy()])
  before = snapshot()
  try:
    learner.train_step(sinusoid.sample_batch(
        4, 5, 5, np.random.default_rng(6))[0])
  except FloatingPointError as e:
    errors["nan"] = str(e)
  return all(np.array_equal(a, b) for a, b in zip(before, snapshot()))


def _meta_model_compare(strategy):
  """``MetaModel.fit`` / ``evaluate`` under the strategy against one device:
  the conv + BatchNorm and sinusoid cases, a Dropout MLP, MAML++ across its
  switch (also under a one-replica strategy), and conv + BatchNorm on a
  stream whose second meta-batch (3 tasks) splits into shares of 2 and 1."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from maml_tf import MetaModel  # pylint: disable=g-import-not-at-top
  from maml_tf.tasks import sinusoid  # pylint: disable=g-import-not-at-top
  cases = {name: (build, batches) for name, build, batches in _cases()}

  def like(name):
    """A MetaModel with the model, loss and options of a ``_cases`` MAML."""
    def make():
      maml = cases[name][0]()
      if name == "conv_bn":
        meta = MetaModel(maml.model, keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), inner_lr=0.1)
      else:
        meta = MetaModel(maml.model, keras.losses.MeanSquaredError(),
                         inner_lr=0.05, inner_steps=2,
                         learn_inner_lr="per_layer_per_step",
                         multi_step_loss_iterations=10)
      meta.compile(optimizer=type(maml.meta_optimizer).from_config(
          maml.meta_optimizer.get_config()))
      return meta
    return make

  def dropout():
    keras.utils.set_random_seed(9)
    net = keras.Sequential([keras.Input((1,)),
                            keras.layers.Dense(12, activation="tanh"),
                            keras.layers.Dropout(0.3), keras.layers.Dense(1)])
    meta = MetaModel(net, keras.losses.MeanSquaredError(), inner_lr=0.05)
    meta.compile(optimizer=keras.optimizers.SGD(0.2))
    return meta

  def mamlpp():
    # First order for its first 2 of 6 steps (decided in the graph).
    keras.utils.set_random_seed(2)
    net = keras.Sequential([keras.Input((1,)),
                            keras.layers.Dense(8, activation="tanh"),
                            keras.layers.Dense(1)])
    meta = MetaModel(net, "mse", algorithm="mamlpp", inner_lr=0.01,
                     inner_steps=2, iterations=6)
    meta.compile(optimizer=keras.optimizers.SGD(0.002))
    assert meta.learner.first_order_until == 2
    return meta

  four = [sinusoid.sample_batch(4, 5, 5, np.random.default_rng(s))[0]
          for s in (8, 9)]
  six = [sinusoid.sample_batch(4, 5, 5, np.random.default_rng(s))[0]
         for s in range(20, 26)]
  report = {}
  stack = lambda batches: tf.data.Dataset.from_tensor_slices(tuple(
      np.stack([np.asarray(b[i]) for b in batches]) for i in range(4)))
  images = cases["conv_bn"][1][0]
  uneven = tf.data.Dataset.from_tensors(tuple(images)).concatenate(
      tf.data.Dataset.from_tensors(tuple(t[1:] for t in images)))
  one_replica = tf.distribute.MirroredStrategy(["/cpu:0"])
  for name, make, data, scope in (
      ("conv_bn", like("conv_bn"), stack(cases["conv_bn"][1]), strategy),
      ("sinusoid_mlp", like("sinusoid_mlp"), stack(cases["sinusoid_mlp"][1]),
       strategy),
      ("dropout", dropout, stack(four), strategy),
      ("mamlpp", mamlpp, stack(six), strategy),
      ("mamlpp_one_replica", mamlpp, stack(six), one_replica),
      ("conv_bn_uneven", like("conv_bn"), uneven, strategy)):
    with scope.scope():
      distributed = make()
    single = make()
    start = [v.numpy() for v in single.variables]
    got = distributed.fit(data, verbose=0).history["loss"]
    want = single.fit(data, verbose=0).history["loss"]
    scores = [m.evaluate(data, verbose=0, return_dict=True)
              for m in (distributed, single)]
    report[name] = {
        "loss_diff": max(abs(a - b) for a, b in zip(got, want)),
        "weight_diff": max(float(np.abs(a.numpy() - b.numpy()).max())
                           for a, b in zip(distributed.variables,
                                           single.variables)),
        "moved": max(float(np.abs(a - b.numpy()).max())
                     for a, b in zip(start, single.variables)),
        "eval_diff": max(abs(scores[0][k] - scores[1][k]) for k in scores[1]),
        "iterations": int(distributed.optimizer.iterations.numpy())}
  # Keras cannot split 3 tasks over 2 replicas in fit: said up front.
  with strategy.scope():
    meta = dropout()
  try:
    meta.fit(tf.data.Dataset.from_tensors(tuple(four[0][i][:3]
                                                for i in range(4))), verbose=0)
    report["odd_fit"] = None
  except ValueError as e:
    report["odd_fit"] = str(e)
  return report


def _unequal_shares(strategy):
  """``replica_meta_step`` with replica shares of 2 and 1 tasks (Dropout:
  each replica draws what its tasks draw on one device) equals one device."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from maml_tf import MAML, TaskBatch  # pylint: disable=g-import-not-at-top
  from maml_tf.core import distribute  # pylint: disable=g-import-not-at-top
  from maml_tf.tasks import sinusoid  # pylint: disable=g-import-not-at-top

  def build():
    keras.utils.set_random_seed(9)
    net = keras.Sequential([keras.Input((1,)),
                            keras.layers.Dense(12, activation="tanh"),
                            keras.layers.Dropout(0.3), keras.layers.Dense(1)])
    return MAML(net, keras.losses.MeanSquaredError(), inner_lr=0.05,
                meta_optimizer=keras.optimizers.SGD(0.2))
  batch = sinusoid.sample_batch(3, 5, 5, np.random.default_rng(10))[0]
  with strategy.scope():
    maml = build()
  batch = maml.prepare(batch)
  bounds = ((0, 2), (2, 3))
  local = strategy.experimental_distribute_values_from_function(
      lambda ctx: TaskBatch(*(t[slice(*bounds[ctx.replica_id_in_sync_group])]
                              for t in batch)))
  plan = maml.plan(TaskBatch(*(t[:2] for t in batch)), distributed=True)

  @tf.function
  def step(local):
    metrics, state, checked = strategy.run(
        lambda b: distribute.replica_meta_step(maml, b, plan, True),
        args=(local,))
    distribute.write_replicated_state(maml, strategy, state, checked)
    return [strategy.experimental_local_results(metrics)[i]
            for i in range(2)]
  got = step(local)
  single = build()
  want = single.train_step(batch)
  return {
      "metric_diff": max(abs(float(g[k]) - want[k]) for g in got
                         for k in want),
      "weight_diff": max(float(np.abs(a.numpy() - b.numpy()).max())
                         for a, b in zip(maml.model.variables,
                                         single.model.variables))}


def _mirrored_main(out_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  from maml_tf.core.distribute import DistributedMAML  # pylint: disable=g-import-not-at-top
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  report = _compare(strategy, {})
  # Clear errors: an odd meta-batch, a learner built outside the scope,
  # a learner with its own meta-step.
  _, build, batches = _cases()[1]
  with strategy.scope():
    learner = DistributedMAML(build(), strategy)
  odd = type(batches[0])(*(t[:3] for t in batches[0]))
  errors = {}
  try:
    learner.train_step(odd)
  except ValueError as e:
    errors["odd"] = str(e)
  try:
    DistributedMAML(build(), strategy)
  except ValueError as e:
    errors["outside_scope"] = str(e)
  report["nan_unchanged"] = _non_finite_step_changes_nothing(strategy, errors)
  report["errors"] = errors
  report.update(_reptile_and_steps(strategy))
  report["meta_model"] = _meta_model_compare(strategy)
  report["unequal_shares"] = _unequal_shares(strategy)
  with open(out_path, "w") as f:
    json.dump(report, f)


def _launcher_main(out_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  report = _sinusoid_launcher(os.path.dirname(out_path))
  with open(out_path, "w") as f:
    json.dump(report, f)


def _worker_main(out_path):
  from maml_tf.core import distribute  # pylint: disable=g-import-not-at-top
  strategy = distribute.make_strategy("multi_worker")   # reads TF_CONFIG
  weights = {}
  report = _compare(strategy, weights)
  report["chief"] = distribute.is_chief(strategy)
  np.savez(out_path + ".npz", **{f"{name}_{i}": w for name, ws in
                                 weights.items() for i, w in enumerate(ws)})
  with open(out_path, "w") as f:
    json.dump(report, f)


# ------------------------------------------------------------------- tests
def _env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("TF_CONFIG", None)
  env.update(extra)
  return env


def _check_case(report, replicas=2):
  assert report["replicas"] == replicas
  assert report["metric_diff"] < TOL, report
  assert report["weight_diff"] < TOL, report
  assert report["moved"] > 1e-3, report          # the step did something
  assert report["iterations"][0] == report["iterations"][1] > 0


def _run_mode(mode, tmp_path):
  """Runs this file as a script in ``mode``; returns its JSON report."""
  out = str(tmp_path / f"{mode}.json")
  proc = subprocess.run([sys.executable, HERE, mode, out], cwd=REPO,
                        env=_env(), capture_output=True, text=True,
                        timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out) as f:
    return json.load(f)


def test_mirrored_two_replicas_equal_one_device(tmp_path):
  report = _run_mode("mirrored", tmp_path)
  _check_case(report["conv_bn"])
  assert report["conv_bn"]["metric_keys"] == [
      "accuracy_after", "accuracy_before", "loss_after", "loss_before"]
  _check_case(report["sinusoid_mlp"])
  assert report["sinusoid_mlp"]["metric_keys"] == [
      "loss_after", "loss_before", "meta_loss"]
  assert "3 tasks" in report["errors"]["odd"]
  assert "2 replicas" in report["errors"]["odd"]
  assert "outside strategy.scope()" in report["errors"]["outside_scope"]
  assert "meta-gradient of shift/w is NaN or Inf" in report["errors"]["nan"]
  assert report["nan_unchanged"]
  # Reptile distributes (its compute_gradients is public) and equals one device.
  assert report["reptile"]["metric_diff"] < TOL, report["reptile"]
  assert report["reptile"]["weight_diff"] < TOL, report["reptile"]
  assert report["reptile"]["iterations"] == 2
  # train_steps: every replica differentiated half of the 4-task meta-batch
  # (the replica function is traced once per replica), 3 steps were taken,
  # and the result equals one device's train_steps on the same tasks.
  steps = report["train_steps"]
  assert steps["replica_tasks"] == [2, 2], steps
  assert steps["iterations"] == 3, steps
  assert steps["metric_diff"] < TOL and steps["weight_diff"] < TOL, steps
  # keras.Model.fit under the strategy (MetaModel): the same meta-steps as
  # one device (not R times the meta-gradient, Keras losses unscaled),
  # BatchNorm statistics and Dropout draws included, also with replica
  # shares of 2 and 1 tasks; evaluate likewise.
  meta_model = dict(report["meta_model"])
  assert "3 tasks" in (meta_model.pop("odd_fit") or ""), meta_model
  # The replica step weighs each replica by its share of the tasks.
  shares = report["unequal_shares"]
  assert shares["metric_diff"] < TOL and shares["weight_diff"] < TOL, shares
  for name, case in meta_model.items():
    assert case["loss_diff"] < TOL and case["weight_diff"] < TOL, (name, case)
    assert case["eval_diff"] < TOL and case["moved"] > 1e-3, (name, case)
    assert case["iterations"] == {"conv_bn": 1, "mamlpp": 6,
                                  "mamlpp_one_replica": 6}.get(name, 2), (
                                      name, case)


def test_sinusoid_launcher_distributes_its_in_graph_steps(tmp_path):
  """distribute='mirrored' with the default steps_per_call (train_steps)."""
  launcher = _run_mode("launcher", tmp_path)
  assert any("on 2 replicas" in line for line in launcher["log"]), launcher
  assert "25 tasks" in launcher["odd"] and "2 replicas" in launcher["odd"]


def test_make_strategy_and_configs_name_bad_values(monkeypatch):
  from maml_tf.core import distribute  # pylint: disable=g-import-not-at-top
  from maml_tf.training import classification, sinusoid  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="'none', 'mirrored', 'multi_worker'"):
    distribute.make_strategy("tpu")
  monkeypatch.delenv("TF_CONFIG", raising=False)
  with pytest.raises(distribute.DistributionError, match="TF_CONFIG"):
    distribute.make_strategy("multi_worker")   # a launcher prints it alone
  monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
  with pytest.raises(ValueError, match="cluster.worker"):
    distribute.make_strategy("multi_worker")
  for make in (classification.make_config, sinusoid.make_config):
    with pytest.raises(ValueError, match="distribute must be one of"):
      make("smoke", distribute="gpus")
  default = distribute.make_strategy("none")
  assert default.num_replicas_in_sync == 1 and distribute.is_chief(default)
  assert distribute.worker_workdir("runs/x", default) == "runs/x"
  from maml_tf import MAML  # pylint: disable=g-import-not-at-top
  from maml_tf.models.mlp import mlp  # pylint: disable=g-import-not-at-top
  maml = MAML(mlp(1, 1, hidden=(4,)), "mse")
  assert distribute.distributed_learner(maml, default) is maml


def _free_ports(n):
  socks = []
  for _ in range(n):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def test_multi_worker_two_processes_equal_one_device(tmp_path):
  workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
  procs, outs = [], []
  for index in range(2):
    tf_config = {"cluster": {"worker": workers},
                 "task": {"type": "worker", "index": index}}
    outs.append(str(tmp_path / f"worker{index}.json"))
    procs.append(subprocess.Popen(
        [sys.executable, HERE, "worker", outs[-1]], cwd=REPO,
        env=_env(TF_CONFIG=json.dumps(tf_config)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=240)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log[-4000:]
  reports = []
  for out in outs:
    with open(out) as f:
      reports.append(json.load(f))
  assert [r["chief"] for r in reports] == [True, False]
  for report in reports:
    _check_case(report["conv_bn"])
    _check_case(report["sinusoid_mlp"])
  w0, w1 = (np.load(out + ".npz") for out in outs)
  assert sorted(w0.files) == sorted(w1.files)
  for key in w0.files:
    np.testing.assert_array_equal(w0[key], w1[key], err_msg=key)


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  {"mirrored": _mirrored_main, "worker": _worker_main,
   "launcher": _launcher_main}[sys.argv[1]](sys.argv[2])
