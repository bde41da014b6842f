"""What the peer MAML benchmarks share: workloads, data, timing, the JSON line.

Framework-free (numpy and the standard library only), so that
``torch_maml.py`` and ``jax_maml.py`` run exactly the workloads of
``benchmarks/meta_step.py`` (maml_tf) and report in the same shape.

Images are NHWC float32 in ``[0, 1)`` and labels int32 class indices, ``way``
classes with ``shot`` support and ``query`` query examples each; the sinusoid
batch is drawn from the paper's task distribution (amplitude U[0.1, 5], phase
U[0, pi], x U[-5, 5]) as ``maml_tf.tasks.sinusoid.sample_batch`` does.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
  """One meta-step workload (the numbers of ``benchmarks/meta_step.py``)."""
  name: str
  tasks: int                 # meta-batch size
  inner_lr: float            # alpha
  inner_steps: int
  # Classification only (None for the sinusoid regression):
  input_shape: Optional[Tuple[int, int, int]] = None   # (H, W, C)
  way: int = 0
  shot: int = 0
  query: int = 0             # query examples per class
  filters: int = 0
  pooling: str = ""          # "stride" (Omniglot) or "max" (MiniImagenet)
  # Sinusoid only:
  k_support: int = 0
  k_query: int = 0

  @property
  def is_sinusoid(self) -> bool:
    return self.input_shape is None


WORKLOADS: Dict[str, Workload] = {
    "sinusoid": Workload("sinusoid", tasks=25, inner_lr=0.01, inner_steps=1,
                         k_support=10, k_query=10),
    "omniglot_5w1s": Workload("omniglot_5w1s", 32, 0.4, 1, (28, 28, 1), 5, 1,
                              15, 64, "stride"),
    "omniglot_20w1s": Workload("omniglot_20w1s", 16, 0.1, 5, (28, 28, 1), 20,
                               1, 15, 64, "stride"),
    "miniimagenet_5w1s": Workload("miniimagenet_5w1s", 4, 0.01, 5,
                                  (84, 84, 3), 5, 1, 15, 32, "max"),
}

META_LR = 1e-3           # Adam, as maml_tf's default meta-optimizer
ADAM_EPSILON = 1e-7      # Keras' Adam default
BN_EPSILON = 1e-3        # Keras' BatchNormalization default


def sinusoid_batch(w: Workload, rng: np.random.Generator):
  """``(support_x, support_y, query_x, query_y)``, each ``[T, K, 1]``."""
  amp = rng.uniform(0.1, 5.0, size=w.tasks)
  phase = rng.uniform(0.0, math.pi, size=w.tasks)
  x = rng.uniform(-5.0, 5.0, size=(w.tasks, w.k_support + w.k_query, 1))
  y = amp[:, None, None] * np.sin(x - phase[:, None, None])
  x, y = x.astype(np.float32), y.astype(np.float32)
  return (x[:, :w.k_support], y[:, :w.k_support],
          x[:, w.k_support:], y[:, w.k_support:])


def classification_batch(w: Workload, rng: np.random.Generator):
  """Random images (NHWC) and labels of the workload's shapes."""
  def labels(n):
    return np.tile(np.repeat(np.arange(w.way), n), (w.tasks, 1)).astype(
        np.int32)
  return (rng.random((w.tasks, w.way * w.shot) + w.input_shape,
                     dtype=np.float32), labels(w.shot),
          rng.random((w.tasks, w.way * w.query) + w.input_shape,
                     dtype=np.float32), labels(w.query))


def make_batch(w: Workload, rng: np.random.Generator):
  return (sinusoid_batch(w, rng) if w.is_sinusoid
          else classification_batch(w, rng))


def parse_args(description: str, variants, default_variant: str,
               add_arguments: Optional[Callable] = None):
  """The command line every peer script takes (``add_arguments(parser)`` adds
  a script's own flags)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
  parser.add_argument("--iters", type=int, default=20,
                      help="timed meta-iterations")
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed meta-iterations after the first")
  parser.add_argument("--first_order", action="store_true",
                      help="first-order MAML (no second derivatives)")
  parser.add_argument("--variant", choices=variants, default=default_variant)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
      "--check_iters", type=int, default=0,
      help="sinusoid only: instead of timing, meta-train this many "
      "iterations on fresh task batches and print the meta-loss (query loss "
      "after adaptation) every 20 iterations")
  if add_arguments:
    add_arguments(parser)
  args = parser.parse_args()
  if args.check_iters and args.workload != "sinusoid":
    parser.error("--check_iters needs --workload sinusoid")
  return args


def time_steps(step: Callable[[], float], iters: int, warmup: int):
  """Runs ``step`` (one full meta-iteration that returns the meta-loss as a
  Python float, i.e. after the work is finished) 1 + warmup + iters times.

  Returns ``(median seconds per timed iteration, seconds of the first call,
  last meta-loss)``.
  """
  t0 = time.perf_counter()
  loss = step()
  first_s = time.perf_counter() - t0
  for _ in range(warmup):
    step()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t)
  return statistics.median(times), first_s, loss


def check_sinusoid(step_on: Callable, w: Workload, iters: int, seed: int,
                   every: int = 20):
  """Meta-trains on fresh sinusoid batches; prints the meta-loss trajectory.

  ``step_on(batch)`` does one meta-iteration on a numpy batch and returns the
  meta-loss. Prints one line per ``every`` iterations (mean over them) and
  returns ``(first window mean, last window mean)``.
  """
  rng = np.random.default_rng(seed)
  window, means = [], []
  for i in range(1, iters + 1):
    window.append(step_on(sinusoid_batch(w, rng)))
    if i % every == 0 or i == iters:
      means.append(float(np.mean(window)))
      print(f"iter {i:5d}  meta-loss {means[-1]:.4f}", flush=True)
      window = []
  return means[0], means[-1]


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report_check(args, framework: str, variant: str, first: float,
                 last: float) -> None:
  """Prints the JSON line of a ``--check_iters`` run (see check_sinusoid)."""
  print(json.dumps({"workload": args.workload, "framework": framework,
                    "variant": variant, "first_order": args.first_order,
                    "check_iters": args.check_iters,
                    "meta_loss_first_20": first, "meta_loss_last_20": last,
                    "decreased": last < first}))


def report(args, framework: str, version: str, variant: str,
           median: float, first_s: float, loss: float, **extra) -> None:
  """Prints the JSON line (keys as ``benchmarks/meta_step.py`` where shared)."""
  out = {
      "workload": args.workload, "framework": framework, "variant": variant,
      "first_order": args.first_order,
      "median_s_per_iter": median, "iters_per_s": 1.0 / median,
      "compile_s": first_s, "peak_rss_mb": peak_rss_mb(),
      "final_meta_loss": loss, "iters": args.iters,
      "machine": f"{platform.machine()} {os.cpu_count()} cpus",
      framework: version, "date": time.strftime("%Y-%m-%d"),
  }
  out.update(extra)
  print(json.dumps(out), flush=True)
