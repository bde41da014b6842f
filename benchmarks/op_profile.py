"""Where a meta-step's time goes: TensorFlow's profiler, summed per op type.

  python -m benchmarks.op_profile --workload omniglot_5w1s
  taskset -c 0 python -m benchmarks.op_profile --workload omniglot_5w1s
  python -m benchmarks.op_profile --workload omniglot_20w1s --top 20

Builds the workload of :mod:`benchmarks.meta_step` (same model, batch and
learner; the meta-update without pre-update metrics, as it times), runs ``--warmup`` steps, then traces ``--steps`` steps with
``tf.profiler.experimental`` and reads the trace (the ``.xplane.pb`` protobuf
TensorFlow writes; no TensorBoard plugin needed). It prints a Markdown table of
op time per meta-step by op type (oneDNN's ``_MklNative``/``_Mkl`` prefixes
dropped), split into the convolutions, matmuls and the rest, with each
type's share of the op time and of the step's wall time; then the ``--top``
single ops. ``--json_out FILE`` appends the same as one JSON line.

Op time is the sum of kernel durations on TensorFlow's compute threads; with
two threads it can exceed the wall time, and with one it falls short of it by
the executor's own cost (scheduling, memory).
"""

import argparse
import collections
import glob
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from benchmarks import meta_step  # pylint: disable=g-import-not-at-top
from maml_tf.core import keras_compat  # pylint: disable=g-import-not-at-top

# Host events that are not kernels: the executor, the thread pool, Python.
_NOT_OPS = ("ExecutorState::", "ThreadpoolListener::", "EagerExecute",
            "EagerLocalExecute", "TFE_Py_", "FunctionRun", "Iterator::")
GROUPS = (("convolutions", ("Conv2D", "Conv1D", "DepthwiseConv", "Conv3D")),
          ("matmuls", ("MatMul", "BatchMatMul", "Einsum")))


def op_type(event_name: str) -> str:
  """``scope/name:_MklNativeConv2D`` -> ``Conv2D``."""
  kind = event_name.rsplit(":", 1)[-1]
  for prefix in ("_MklNative", "_MklFused", "_Mkl"):
    if kind.startswith(prefix):
      return kind[len(prefix):]
  return kind


def group_of(kind: str) -> str:
  for group, names in GROUPS:
    if any(kind.startswith(n) for n in names):
      return group
  return "other"


def read_trace(logdir: str) -> dict:
  """Op name -> (summed picoseconds, calls) from the newest xplane file."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"),
                           recursive=True), key=os.path.getmtime)
  if not files:
    raise RuntimeError(f"the profiler wrote no trace under {logdir}")
  space = xplane_pb2.XSpace()
  with open(files[-1], "rb") as f:
    space.ParseFromString(f.read())
  ops = collections.defaultdict(lambda: [0, 0])
  for plane in space.planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if ":" not in name or name.startswith(_NOT_OPS):
          continue
        ops[name][0] += event.duration_ps
        ops[name][1] += 1
  if not ops:
    raise RuntimeError(f"the trace in {files[-1]} holds no op events")
  return ops


def profile(workload: str, steps: int = 3, warmup: int = 2,
            top: int = 15, **build_kwargs) -> dict:
  learner, batch = meta_step.build(workload, **build_kwargs)
  batch = learner.prepare(batch)
  plan = learner.plan(batch)
  for _ in range(warmup + 1):
    float(learner.train_step(batch, False)["loss_after"])
  walls = []
  with tempfile.TemporaryDirectory() as logdir:
    tf.profiler.experimental.start(
        logdir, options=tf.profiler.experimental.ProfilerOptions(
            host_tracer_level=3))
    try:
      for _ in range(steps):
        t = time.perf_counter()
        float(learner.train_step(batch, False)["loss_after"])
        walls.append(time.perf_counter() - t)
    finally:
      tf.profiler.experimental.stop()
    ops = read_trace(logdir)
  ms = lambda ps: ps / 1e9 / steps
  by_type = collections.defaultdict(lambda: [0.0, 0])
  for name, (ps, calls) in ops.items():
    entry = by_type[op_type(name)]
    entry[0] += ms(ps)
    entry[1] += calls / steps
  total = sum(v[0] for v in by_type.values())
  groups = collections.Counter()
  for kind, (t, _) in by_type.items():
    groups[group_of(kind)] += t
  wall = statistics.median(walls) * 1e3
  return {
      "workload": workload, "plan": plan.describe(),
      "wall_ms_per_step": wall, "op_ms_per_step": total,
      "groups_ms": dict(groups),
      "types": sorted(([k, v[0], v[1]] for k, v in by_type.items()),
                      key=lambda r: -r[1]),
      "top_ops": sorted(([n, ms(ps), c / steps] for n, (ps, c) in ops.items()),
                        key=lambda r: -r[1])[:top],
      "onednn": keras_compat.onednn_enabled(),
      "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(),
      "tensorflow": tf.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
  }


def markdown(result: dict, types: int = 20) -> str:
  wall, total = result["wall_ms_per_step"], result["op_ms_per_step"]
  lines = [f"{result['workload']} ({result['plan']}), {result['cpus']} CPU(s), "
           f"oneDNN {'on' if result['onednn'] else 'off'}: wall "
           f"{wall:.1f} ms per step, op time {total:.1f} ms", "",
           "| op type | ms per step | kernels per step | share of op time |"
           " share of wall |", "| --- | ---: | ---: | ---: | ---: |"]
  for group, t in sorted(result["groups_ms"].items(), key=lambda r: -r[1]):
    lines.append(f"| **{group}** | **{t:.1f}** | | **{t / total:.0%}** | "
                 f"**{t / wall:.0%}** |")
  for kind, t, calls in result["types"][:types]:
    lines.append(f"| {kind} | {t:.1f} | {calls:.0f} | {t / total:.0%} | "
                 f"{t / wall:.0%} |")
  lines += ["", "| op | ms per step | calls per step |", "| --- | ---: | ---: |"]
  for name, t, calls in result["top_ops"]:
    lines.append(f"| `{name}` | {t:.1f} | {calls:.0f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", choices=sorted(meta_step.WORKLOADS),
                      required=True)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--first_order", action="store_true")
  parser.add_argument("--task_chunk", default="auto",
                      help="'auto', 'none' or tasks per chunk")
  parser.add_argument("--json_out", default=None)
  args = parser.parse_args()
  chunk = {"auto": "auto", "none": None}.get(args.task_chunk)
  if chunk is None and args.task_chunk != "none":
    chunk = int(args.task_chunk)
  result = profile(args.workload, args.steps, args.warmup, args.top,
                   first_order=args.first_order, vectorize="auto",
                   task_chunk=chunk)
  print(markdown(result))
  if args.json_out:
    with open(args.json_out, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
