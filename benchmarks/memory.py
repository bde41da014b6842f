"""Peak memory of second-order MAML against inner steps, with and without
recomputation (gradient checkpointing through the inner loop).

  python -m benchmarks.memory --workload omniglot_5w1s --steps 1 5 10
  python -m benchmarks.memory --task_chunk none --query 1

Each configuration runs in a fresh process (peak RSS is per process) via
``benchmarks.meta_step``; prints one JSON line per configuration and a
markdown table. The first measure is ``tensor_peak_mb``: the peak bytes held
by TensorFlow's CPU allocator during the timed meta-steps (weights, batch,
optimizer slots and every activation a step keeps alive; no graph, no
runtime), i.e. the memory that inner steps, recomputation and task chunks
change. Process measures follow: ``step_peak_mb`` is the peak RSS minus the
RSS just before the first meta-step (graph building included);
``run_extra_mb`` is the steady-state growth of RSS during the timed steps.
"""

import argparse
import json
import os
import subprocess
import sys


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="omniglot_5w1s")
  parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10])
  parser.add_argument("--meta_batch", type=int, default=None)
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--task_chunk", default="auto",
                      help="'auto', 'none' or tasks per chunk")
  parser.add_argument("--query", type=int, default=None,
                      help="query images per class (default: workload's)")
  args = parser.parse_args()
  rows = []
  for steps in args.steps:
    for recompute in (False, True):
      cmd = [sys.executable, "-m", "benchmarks.meta_step", "--workload",
             args.workload, "--iters", str(args.iters), "--warmup", "0",
             "--inner_steps", str(steps), "--no_flops",
             "--task_chunk", args.task_chunk]
      if recompute:
        cmd.append("--recompute")
      if args.meta_batch:
        cmd += ["--meta_batch", str(args.meta_batch)]
      if args.query:
        cmd += ["--query", str(args.query)]
      # TensorFlow keeps allocator statistics only with its BFC allocator.
      env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")
      out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                           env=env)
      if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-5:]
        raise SystemExit(f"{' '.join(cmd)} failed (exit {out.returncode}):\n"
                         + "\n".join(tail))
      row = json.loads(out.stdout.strip().splitlines()[-1])
      print(json.dumps(row), flush=True)
      rows.append(row)
  print("\n| inner steps | recompute | task chunk | tensor peak (MB) | "
        "process peak RSS (MB) | peak above pre-step RSS (MB) | s/iter |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['inner_steps']} | {r['recompute']} | {r['task_chunk']} | "
          f"{r['tensor_peak_mb']:.0f} | {r['peak_rss_mb']:.0f} "
          f"| {r['step_peak_mb']:.0f} | {r['median_s_per_iter']:.2f} |")


if __name__ == "__main__":
  main()
