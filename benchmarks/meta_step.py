"""Meta-step benchmark: seconds per meta-iteration, GFLOP/s, peak memory.

  python -m benchmarks.meta_step --workload sinusoid --iters 200 --warmup 20
  python -m benchmarks.meta_step --workload omniglot_5w1s --iters 5 --warmup 2
  python -m benchmarks.meta_step --workload mobilenetv2_5w1s --vectorize map_fn
  python -m benchmarks.meta_step --workload transformer_5w1s --dropout 0.1
  python -m benchmarks.meta_step --workload lstm_5w1s --vectorize map_fn

  python -m benchmarks.meta_step --workload sinusoid --steps_per_call 100

Prints one JSON line: workload, median seconds per meta-iteration,
meta-iterations per second, peak RSS, GFLOP per iteration (counted by TF's
profiler on the compiled step's graph), achieved GFLOP/s, the machine's matmul
GFLOP/s measured in the same run, and their ratio. Batches are random tensors
of the workload's shapes (the input pipeline is measured separately), built
once so that the timing is of the meta-step alone. Steps run with
TensorFlow's default CPU allocator, as a user's do; ``tensor_peak_mb`` (the
allocator's peak) needs its BFC allocator, which ``benchmarks.memory`` turns on
for its runs (``TF_CPU_ALLOCATOR_USE_BFC=true``), and is NaN without it.

One meta-iteration is the meta-update only, as the peers compute it
(``pre_update_metrics=False``; ``--pre_update_metrics`` adds the query
forward pass before adaptation that training logs), one
:meth:`maml_tf.MAML.train_step` call returning Python floats, as a user's
loop calls it. ``--steps_per_call N``
runs N meta-iterations per compiled call (:meth:`maml_tf.MAML.train_steps`);
for the sinusoid the tasks are then sampled in the graph
(:func:`maml_tf.tasks.sinusoid.batch_sampler`), a fresh batch every
iteration, for the other workloads the fixed batch is reused.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from maml_tf import MAML, TaskBatch  # pylint: disable=g-import-not-at-top
from maml_tf.core import keras_compat  # pylint: disable=g-import-not-at-top
from maml_tf.models import mlp as mlp_lib  # pylint: disable=g-import-not-at-top
from maml_tf.tasks import sinusoid  # pylint: disable=g-import-not-at-top

# name: (input shape, way, shot, query per class, meta-batch, inner lr,
#        inner steps, network)
WORKLOADS = {
    "sinusoid": None,
    "omniglot_5w1s": ((28, 28, 1), 5, 1, 15, 32, 0.4, 1, "omniglot"),
    "omniglot_20w1s": ((28, 28, 1), 20, 1, 15, 16, 0.1, 5, "omniglot"),
    "miniimagenet_5w1s": ((84, 84, 3), 5, 1, 15, 4, 0.01, 5, "miniimagenet"),
    # keras.applications.MobileNetV2 (alpha 0.35, untrained) on 64x64 images.
    "mobilenetv2_5w1s": ((64, 64, 3), 5, 1, 5, 8, 1e-4, 1, "mobilenet_v2"),
    # Two inputs: the Omniglot net's image features and an 8-value vector
    # (Dense 16) concatenated before the head.
    "omniglot_vector_5w1s": ((28, 28, 1), 5, 1, 15, 32, 0.4, 1,
                             "omniglot_vector"),
}
VECTOR_FEATURES = 8
WORKLOADS["transformer_5w1s"] = ((16, 32), 5, 1, 15, 16, 0.1, 1,
                                 "transformer")

# Sequences of 20 steps of 16 features: two stacked LSTMs of 32 units.
WORKLOADS["lstm_5w1s"] = ((20, 16), 5, 1, 15, 16, 0.1, 1, "lstm")


def lstm(way: int, dropout: float) -> keras.Model:
  """Two stacked LSTMs (32 units), ``Dropout(dropout)`` between them, and
  a Dense head on the last output."""
  inp = keras.Input(WORKLOADS["lstm_5w1s"][0])
  h = keras.layers.LSTM(32, return_sequences=True)(inp)
  h = keras.layers.LSTM(32)(keras.layers.Dropout(dropout)(h))
  return keras.Model(inp, keras.layers.Dense(way)(h), name="lstm")


def transformer(way: int, dropout: float) -> keras.Model:
  """Two post-norm transformer blocks (4 heads of 16, feed-forward 128,
  ``dropout`` after attention, in it and after the feed-forward) on
  sequences of 16 x 32, mean-pooled, a linear head."""
  inp = keras.Input((16, 32))
  x = keras.layers.Dense(64)(inp)
  for _ in range(2):
    a = keras.layers.MultiHeadAttention(4, 16, dropout=dropout)(x, x)
    x = keras.layers.LayerNormalization()(x + keras.layers.Dropout(dropout)(a))
    f = keras.layers.Dense(128, activation="gelu")(x)
    f = keras.layers.Dropout(dropout)(keras.layers.Dense(64)(f))
    x = keras.layers.LayerNormalization()(x + f)
  x = keras.layers.GlobalAveragePooling1D()(x)
  return keras.Model(inp, keras.layers.Dense(way)(x), name="transformer")


def image_and_vector(way: int) -> keras.Model:
  """The Omniglot net with a second input, ``{"image", "vector"}``."""
  from maml_tf.models import paper_nets  # pylint: disable=g-import-not-at-top
  body = paper_nets.omniglot_conv(way)
  image = keras.Input((28, 28, 1), name="image")
  vector = keras.Input((VECTOR_FEATURES,), name="vector")
  h = image
  for layer in body.layers[:-1]:
    h = layer(h)
  h = keras.layers.Concatenate()(
      [h, keras.layers.Dense(16, activation="relu")(vector)])
  return keras.Model({"image": image, "vector": vector},
                     keras.layers.Dense(way)(h), name="image_and_vector")


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
  """The machine's float32 matmul rate through TensorFlow."""
  a = tf.random.normal((n, n))
  b = tf.random.normal((n, n))
  f = tf.function(lambda a, b: tf.matmul(a, b))
  f(a, b).numpy()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).numpy()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(times) / 1e9


def count_gflop(concrete_function) -> float:
  """Float operations of a concrete function's graph (TF profiler)."""
  profiler = tf.compat.v1.profiler
  tf.get_logger().setLevel("ERROR")     # the v1 profiler's deprecation notes
  opts = (profiler.ProfileOptionBuilder(
      profiler.ProfileOptionBuilder.float_operation())
          .with_empty_output().build())
  graph = concrete_function.graph
  flops = profiler.profile(graph, options=opts).total_float_ops
  # Function bodies (while loops of map_fn, vectorised subgraphs) are not
  # always walked by the profiler: add their graphs' counts too.
  for sub_graph in keras_compat.function_graphs(graph):
    try:
      sub = profiler.profile(sub_graph, options=opts).total_float_ops
      flops += sub
    except Exception:  # pylint: disable=broad-except
      pass
  return flops / 1e9


def with_dropout(model: keras.Sequential, rate: float) -> keras.Sequential:
  """``model`` with ``Dropout(rate)`` before its last layer (its weights)."""
  if not rate:
    return model
  return keras.Sequential(
      [keras.Input(model.input_shape[1:])] + model.layers[:-1]
      + [keras.layers.Dropout(rate), model.layers[-1]], name=model.name)


def build(workload: str, first_order: bool, vectorize, inner_steps=None,
          recompute=False, meta_batch=None, task_chunk="auto", query=None,
          closed_form="auto", jit_compile=None, dropout=0.0):
  rng = np.random.default_rng(0)
  keras.utils.set_random_seed(0)
  if workload == "sinusoid":
    model = with_dropout(mlp_lib.mlp(1, 1), dropout)
    learner = MAML(model, "mse", inner_lr=0.01, first_order=first_order,
                   vectorize=vectorize, inner_steps=inner_steps or 1,
                   recompute=recompute, task_chunk=task_chunk,
                   closed_form=closed_form, jit_compile=jit_compile)
    batch = sinusoid.sample_batch(meta_batch or 25, 10, 10, rng)[0]
    return learner, batch
  from maml_tf.models import paper_nets  # pylint: disable=g-import-not-at-top
  shape, way, shot, default_query, tasks, lr, steps, net = WORKLOADS[workload]
  query = query or default_query
  steps = inner_steps or steps
  tasks = meta_batch or tasks
  if net == "mobilenet_v2":
    model = keras.applications.MobileNetV2(
        input_shape=shape, alpha=0.35, weights=None, classes=way,
        classifier_activation=None)
  elif net == "omniglot_vector":
    model = image_and_vector(way)
  elif net == "transformer":
    model = transformer(way, dropout)
  elif net == "lstm":
    model = lstm(way, dropout)
  else:
    model = with_dropout(paper_nets.omniglot_conv(way) if net == "omniglot"
                         else paper_nets.miniimagenet_conv(way), dropout)
  learner = MAML(model, keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), inner_lr=lr, inner_steps=steps,
                 first_order=first_order, vectorize=vectorize,
                 recompute=recompute, task_chunk=task_chunk,
                 closed_form=closed_form, jit_compile=jit_compile)
  labels = lambda n: np.tile(np.repeat(np.arange(way), n), (tasks, 1))

  def inputs(n):
    images = rng.random((tasks, n) + shape, dtype=np.float32)
    if net != "omniglot_vector":
      return images
    return {"image": images, "vector": rng.normal(
        size=(tasks, n, VECTOR_FEATURES)).astype(np.float32)}
  batch = TaskBatch(inputs(way * shot), labels(shot).astype(np.int32),
                    inputs(way * query), labels(query).astype(np.int32))
  return learner, batch


def _rss_now_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
  """Resets VmHWM (Linux: ``echo 5 > /proc/self/clear_refs``)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def run(workload: str, iters: int, warmup: int, first_order: bool = False,
        vectorize="auto", inner_steps=None, recompute=False, meta_batch=None,
        count_flops=True, steps_per_call=1, pre_update_metrics=False,
        task_chunk="auto", query=None, closed_form="auto",
        jit_compile=None, dropout=0.0) -> dict:
  learner, batch = build(workload, first_order, vectorize, inner_steps,
                         recompute, meta_batch, task_chunk, query,
                         closed_form, jit_compile, dropout)
  batch = learner.prepare(batch)
  plan = learner.plan(batch)
  if steps_per_call > 1:
    if workload == "sinusoid":
      sample = sinusoid.batch_sampler(int(batch.support_x.shape[0]), 10, 10)
    else:
      sample = lambda iteration: batch
    call = lambda: learner.train_steps(sample, steps_per_call,
                                       pre_update_metrics)
  else:
    call = lambda: learner.train_step(batch, pre_update_metrics)
  rss_before = _rss_now_mb()
  t0 = time.perf_counter()
  float(call()["loss_after"])                     # trace + first run
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    float(call()["loss_after"])
  # Steady-state memory: reset the kernel's peak-RSS mark after compilation
  # and the first step (graph building dominates the process peak otherwise).
  run_base = _rss_now_mb()
  hwm_reset = _reset_peak_rss()
  try:
    tf.config.experimental.reset_memory_stats("CPU:0")
    allocator_stats = True
  except ValueError:        # TF's default CPU allocator keeps no statistics
    allocator_stats = False
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    out = call()
    float(out["loss_after"])                      # loops read a metric
    times.append((time.perf_counter() - t) / steps_per_call)
  median = statistics.median(times)
  # Peak bytes held by TF's CPU allocator during the timed steps: weights,
  # batch, optimizer slots and every tensor a meta-step keeps alive (what
  # inner steps, recomputation and task chunks change); no graph or runtime.
  tensor_peak = (tf.config.experimental.get_memory_info("CPU:0")["peak"]
                 / 2**20 if allocator_stats else float("nan"))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  run_peak = _peak_rss_mb() if hwm_reset else float("nan")
  gflop = float("nan")
  if count_flops:
    try:
      gflop = _count_step_gflop(learner, batch, plan, pre_update_metrics)
    except Exception:  # pylint: disable=broad-except
      pass
  mm = matmul_gflops()
  achieved = gflop / median if gflop == gflop else float("nan")
  return {
      "workload": workload, "first_order": first_order,
      "plan": plan.describe(),
      "execution": plan.execution,
      "task_chunk": plan.task_chunk,
      "conv_impl": plan.conv_impl,
      "closed_form": plan.closed_form,
      "jit_compile": bool(plan.xla),
      "steps_per_call": steps_per_call,
      "pre_update_metrics": pre_update_metrics,
      "median_s_per_iter": median, "iters_per_s": 1.0 / median,
      "compile_s": compile_s,
      "peak_rss_mb": peak, "rss_before_step_mb": rss_before,
      "step_peak_mb": peak - rss_before,
      "run_peak_mb": run_peak, "run_extra_mb": run_peak - run_base,
      "tensor_peak_mb": tensor_peak,
      "query_per_class": None if workload == "sinusoid" else int(
          batch.query_y.shape[1]) // WORKLOADS[workload][1],
      "inner_steps": learner.inner_steps, "recompute": recompute,
      "dropout": dropout,
      "meta_batch": int(batch.support_y.shape[0]),
      "gflop_per_iter": gflop, "achieved_gflops": achieved,
      "matmul_gflops": mm, "ratio_to_matmul": achieved / mm,
      "iters": iters, "machine": f"{platform.machine()} {os.cpu_count()} cpus",
      "tensorflow": tf.__version__, "keras": keras.__version__,
      "onednn": keras_compat.onednn_enabled(),
      "date": time.strftime("%Y-%m-%d"),
  }


def _count_step_gflop(learner, batch, plan, pre_update_metrics):
  """GFLOP of one meta-step, counted on an all-tasks-at-once graph.

  The profiler counts a loop body once, not once per iteration, so the
  count is taken on the same step planned without task chunks (identical
  arithmetic) and never on the ``train_steps`` loop. Only traced, never run.
  """
  plan = plan.replace(task_chunk=None, split_gradients=False, xla=False)
  fn = tf.function(lambda b: learner.meta_step(b, plan,
                                               pre_update_metrics).metrics)
  return count_gflop(fn.get_concrete_function(batch))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--first_order", action="store_true")
  parser.add_argument("--vectorize", default="auto",
                      choices=["auto", "batched", "vectorized_map", "map_fn"])
  parser.add_argument("--inner_steps", type=int, default=None,
                      help="override the workload's inner steps")
  parser.add_argument("--meta_batch", type=int, default=None,
                      help="override the workload's meta-batch")
  parser.add_argument("--recompute", action="store_true",
                      help="gradient checkpointing through the inner loop")
  parser.add_argument("--no_flops", action="store_true",
                      help="skip counting GFLOP (saves time)")
  parser.add_argument("--steps_per_call", type=int, default=1,
                      help="meta-iterations per compiled call (train_steps)")
  parser.add_argument("--pre_update_metrics", action="store_true",
                      help="also score the query sets before adaptation")
  parser.add_argument("--task_chunk", default="auto",
                      help="'auto', 'none' or tasks per chunk")
  parser.add_argument("--query", type=int, default=None,
                      help="override the query images per class")
  parser.add_argument("--closed_form", default="auto",
                      choices=["auto", "true", "false"],
                      help="closed-form meta-gradient of Dense/MSE models")
  parser.add_argument("--jit_compile", default="auto",
                      choices=["auto", "true", "false"],
                      help="XLA for train_steps (--steps_per_call > 1)")
  parser.add_argument("--dropout", type=float, default=0.0,
                      help="a Dropout layer of this rate before the head "
                      "(transformer_5w1s: the blocks' dropout rate; "
                      "lstm_5w1s: between the LSTMs)")
  args = parser.parse_args()
  closed_form = {"auto": "auto", "true": True, "false": False}
  jit_compile = {"auto": None, "true": True, "false": False}
  print(json.dumps(run(args.workload, args.iters, args.warmup,
                       args.first_order, args.vectorize, args.inner_steps,
                       args.recompute, args.meta_batch,
                       not args.no_flops, args.steps_per_call,
                       args.pre_update_metrics,
                       _task_chunk_arg(args.task_chunk), args.query,
                       closed_form[args.closed_form],
                       jit_compile[args.jit_compile], args.dropout)))


def _task_chunk_arg(value: str):
  if value == "auto":
    return value
  if value == "none":
    return None
  return int(value)


if __name__ == "__main__":
  main()
