"""Meta-iterations per second on one device versus R replicas (one machine).

  python -m benchmarks.distribute_step --workload sinusoid --replicas 2
  python -m benchmarks.distribute_step --workload omniglot --replicas 2 \
      --meta_batch 8 --iters 10

With ``--replicas 1`` the plain ``MAML.train_step`` is timed; with ``R > 1``
``DistributedMAML`` under ``MirroredStrategy`` over R devices: the GPUs if
there are at least R, else R logical CPU devices carved out of the one CPU
(they share its cores and thread pools, so on a CPU this measures what
splitting costs or gains, not what R machines would give). Prints one JSON
line: workload, replicas, devices, meta-batch, median seconds per
meta-iteration, meta-iterations per second. Batches are random tensors of
the workload's shapes, built once.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top


def devices_for(replicas: int) -> list:
  """R GPUs if there are that many, else R logical CPU devices."""
  gpus = tf.config.list_physical_devices("GPU")
  if len(gpus) >= replicas:
    return [f"/gpu:{i}" for i in range(replicas)]
  if replicas > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
  return [f"/cpu:{i}" for i in range(replicas)]


def build(workload: str, meta_batch: int):
  """``(make_maml, batch)`` for a workload."""
  import keras  # pylint: disable=g-import-not-at-top
  from maml_tf import MAML, TaskBatch  # pylint: disable=g-import-not-at-top
  from maml_tf.models import mlp as mlp_lib  # pylint: disable=g-import-not-at-top
  from maml_tf.models import paper_nets  # pylint: disable=g-import-not-at-top
  from maml_tf.tasks import sinusoid  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  if workload == "sinusoid":
    batch = sinusoid.sample_batch(meta_batch, 10, 10, rng)[0]

    def make():
      keras.utils.set_random_seed(0)
      return MAML(mlp_lib.mlp(1, 1), keras.losses.MeanSquaredError(),
                  inner_lr=0.01, meta_optimizer=keras.optimizers.Adam(1e-3))
    return make, batch
  way, shot, query = 5, 1, 15          # omniglot_5w1s shapes
  batch = TaskBatch(
      rng.random((meta_batch, way * shot, 28, 28, 1), dtype=np.float32),
      np.tile(np.arange(way).repeat(shot), (meta_batch, 1)),
      rng.random((meta_batch, way * query, 28, 28, 1), dtype=np.float32),
      np.tile(np.arange(way).repeat(query), (meta_batch, 1)))

  def make():
    keras.utils.set_random_seed(0)
    return MAML(paper_nets.omniglot_conv(way),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                inner_lr=0.4, meta_optimizer=keras.optimizers.Adam(1e-3))
  return make, batch


def run(workload: str, replicas: int, meta_batch: int, iters: int,
        warmup: int) -> dict:
  """Times ``iters`` meta-steps after ``warmup`` (compilation) ones."""
  devices = devices_for(replicas)
  make, batch = build(workload, meta_batch)
  if replicas == 1:
    learner = make()
  else:
    from maml_tf.core.distribute import DistributedMAML  # pylint: disable=g-import-not-at-top
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
      maml = make()
    learner = DistributedMAML(maml, strategy)
  for _ in range(warmup):
    learner.train_step(batch)
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    learner.train_step(batch)          # floats: waits for the step
    times.append(time.perf_counter() - t)
  median = statistics.median(times)
  return {"workload": workload, "replicas": replicas, "devices": devices,
          "meta_batch": meta_batch, "iters": iters,
          "seconds_per_iteration": median,
          "iterations_per_second": 1.0 / median}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", choices=["sinusoid", "omniglot"],
                      required=True)
  parser.add_argument("--replicas", type=int, default=2)
  parser.add_argument("--meta_batch", type=int, default=None,
                      help="default: 24 (sinusoid), 8 (omniglot)")
  parser.add_argument("--iters", type=int, default=50)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()
  meta_batch = args.meta_batch or (24 if args.workload == "sinusoid" else 8)
  print(json.dumps(run(args.workload, args.replicas, meta_batch, args.iters,
                       args.warmup)))


if __name__ == "__main__":
  main()
