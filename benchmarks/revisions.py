"""The meta-step benchmark of two revisions, interleaved in one run.

  python -m benchmarks.revisions --base HEAD~1 --workloads sinusoid omniglot_5w1s
  python -m benchmarks.revisions --base 1e4cb6b --rounds 5 --cpus 1

Exports ``--base`` (a git revision of this repository) into a temporary
folder and runs ``benchmarks/meta_step.py`` alternately from that tree and
from the working tree (``--rounds`` times each, each run in its own process
with ``PYTHONPATH`` set to its tree), so that both see the same machine
state; prints one JSON line per run and a markdown table of the medians
(seconds per meta-iteration, first call, allocator peak, peak RSS). Both
trees use the same interpreter and TensorFlow settings
(``TF_CPU_ALLOCATOR_USE_BFC=true`` for the allocator peak, and oneDNN, which
older benchmark scripts did not set themselves). ``--cpus 1`` pins every run
to one CPU.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = {"sinusoid": ("200", "20"), "omniglot_5w1s": ("5", "2"),
         "omniglot_20w1s": ("3", "1"), "miniimagenet_5w1s": ("3", "1")}


def _export(rev: str, where: str) -> str:
  tree = os.path.join(where, "base")
  os.makedirs(tree)
  archive = subprocess.run(["git", "-C", ROOT, "archive", rev],
                           check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
  return tree


def _run(tree: str, workload: str, extra, cpus) -> dict:
  iters, warmup = ITERS[workload]
  cmd = [sys.executable, "-m", "benchmarks.meta_step", "--workload", workload,
         "--iters", iters, "--warmup", warmup, "--no_flops", *extra]
  if cpus:
    cmd = ["taskset", "-c", ",".join(str(c) for c in range(cpus))] + cmd
  env = dict(os.environ, PYTHONPATH=tree, TF_CPU_ALLOCATOR_USE_BFC="true",
             TF_CPP_MIN_LOG_LEVEL="2")
  env.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")   # as benchmarks/__init__.py
  if cpus:
    env.update(OMP_NUM_THREADS=str(cpus), TF_NUM_INTRAOP_THREADS=str(cpus),
               TF_NUM_INTEROP_THREADS=str(cpus))
  out = subprocess.run(cmd, cwd=tree, env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--base", required=True, help="git revision to compare")
  parser.add_argument("--workloads", nargs="+", default=["sinusoid",
                                                         "omniglot_5w1s"],
                      choices=sorted(ITERS))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--cpus", type=int, default=0,
                      help="pin to this many CPUs (0: no pinning)")
  parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                      help="more meta_step arguments, e.g. --steps_per_call 100")
  args = parser.parse_args()
  rows = {}
  with tempfile.TemporaryDirectory() as where:
    trees = {"base " + args.base: _export(args.base, where), "this tree": ROOT}
    for _ in range(args.rounds):
      for workload in args.workloads:
        for label, tree in trees.items():
          result = _run(tree, workload, args.extra, args.cpus)
          result["revision"] = label
          print(json.dumps(result), flush=True)
          rows.setdefault((workload, label), []).append(result)
  print("\n| workload | revision | s/iter (median of runs) | runs | first call s |"
        " allocator peak MB | peak RSS MB |")
  print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
  for (workload, label), runs in rows.items():
    med = lambda k: statistics.median(r[k] for r in runs)
    print(f"| {workload} | {label} | {med('median_s_per_iter'):.4g} | "
          + ", ".join(f"{r['median_s_per_iter']:.4g}" for r in runs)
          + f" | {med('compile_s'):.1f} | {med('tensor_peak_mb'):.0f} | "
          f"{med('peak_rss_mb'):.0f} |")


if __name__ == "__main__":
  main()
