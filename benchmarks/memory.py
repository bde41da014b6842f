"""Peak memory of second-order MAML against inner steps, with and without
recomputation (gradient checkpointing through the inner loop).

  python -m benchmarks.memory --workload omniglot_5w1s --steps 1 5 10

Each configuration runs in a fresh process (peak RSS is per process) via
``benchmarks.meta_step``; prints one JSON line per configuration and a
markdown table. ``step_peak_mb`` is the peak RSS minus the RSS just before the
first meta-step (the import of TensorFlow and the model are excluded; graph
building is included). ``run_extra_mb`` is the steady state: the peak RSS
during the timed meta-steps (after compilation; the peak mark is reset)
minus the RSS before them -- the activations a meta-step keeps alive.
"""

import argparse
import json
import subprocess
import sys


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="omniglot_5w1s")
  parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10])
  parser.add_argument("--meta_batch", type=int, default=None)
  parser.add_argument("--iters", type=int, default=2)
  args = parser.parse_args()
  rows = []
  for steps in args.steps:
    for recompute in (False, True):
      cmd = [sys.executable, "-m", "benchmarks.meta_step", "--workload",
             args.workload, "--iters", str(args.iters), "--warmup", "0",
             "--inner_steps", str(steps), "--no_flops"]
      if recompute:
        cmd.append("--recompute")
      if args.meta_batch:
        cmd += ["--meta_batch", str(args.meta_batch)]
      out = subprocess.run(cmd, capture_output=True, text=True, check=True)
      row = json.loads(out.stdout.strip().splitlines()[-1])
      print(json.dumps(row), flush=True)
      rows.append(row)
  print("\n| inner steps | recompute | process peak RSS (MB) | peak above "
        "pre-step RSS (MB) | steady-state growth (MB) | s/iter |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['inner_steps']} | {r['recompute']} | {r['peak_rss_mb']:.0f} "
          f"| {r['step_peak_mb']:.0f} | {r['run_extra_mb']:.0f} "
          f"| {r['median_s_per_iter']:.2f} |")


if __name__ == "__main__":
  main()
