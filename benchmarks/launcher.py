"""Launcher throughput against the meta-step benchmark, same config.

  python -m benchmarks.launcher                       # Omniglot 5-way 1-shot
  python -m benchmarks.launcher --iterations 400 --rounds 3 --cpus 1

Runs, in turn for ``--rounds`` rounds (so that the machine's drift reaches
both alike), each in its own process:

* ``launch/classification.py --preset=PRESET`` for ``--iterations``
  meta-iterations on the real data (tf.data episodes, logging every
  ``--log_every`` steps with the pre-update metrics, validation every
  ``--eval_every`` steps on ``--val_tasks`` tasks, checkpoints), then a short
  test evaluation; its ``results.json`` gives the seconds per iteration after
  compilation, validation included (``timing``: training plus validation
  seconds over the timed steps);
* ``benchmarks.meta_step`` on random batches of the same shapes (the preset's
  way, shot, query per class, meta-batch, inner steps and step size), the
  meta-update alone.

Prints a markdown table and one JSON line: the median of each over the
rounds and the ratio launcher / benchmark. Omniglot comes from ``--data_dir``
(default ``$MAML_TF_OMNIGLOT_DIR``, else ``../shared/data/omniglot`` beside
the checkout when it exists, else TFDS's download).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_data_dir():
  """``$MAML_TF_OMNIGLOT_DIR``, else ``../shared/data/omniglot`` if present."""
  env = os.environ.get("MAML_TF_OMNIGLOT_DIR")
  if env:
    return env
  shared = os.path.join(os.path.dirname(ROOT), "shared", "data", "omniglot")
  return shared if os.path.isdir(shared) else None


def _run(cmd, cpus, timeout):
  pin = sorted(os.sched_getaffinity(0))[:cpus]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False,
                        preexec_fn=lambda: os.sched_setaffinity(0, pin))
  if proc.returncode != 0:
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}: "
                       f"{tail}")
  return proc.stdout


def launcher_seconds(args, workdir) -> dict:
  """Seconds per iteration of one launcher run (validation included)."""
  cmd = [sys.executable, "launch/classification.py", f"--preset={args.preset}",
         f"--iterations={args.iterations}", f"--log_every={args.log_every}",
         f"--eval_every={args.eval_every}", f"--val_tasks={args.val_tasks}",
         f"--checkpoint_every={args.iterations}", "--eval_tasks=10",
         "--adapted_check_tasks=1", "--noexport", "--noplot",
         f"--logdir={workdir}"]
  if args.data_dir:
    cmd.append(f"--data_dir={args.data_dir}")
  _run(cmd, args.cpus, args.timeout)
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  timing = results["timing"]
  steps = timing["timed_steps"]
  return {"with_validation": (timing["train_seconds"]
                              + timing["eval_seconds"]) / steps,
          "training_only": timing["train_seconds"] / steps,
          "validation_s": timing["eval_seconds"], "timed_steps": steps,
          "config": results["config"]}


def benchmark_seconds(args, config) -> dict:
  """``benchmarks.meta_step`` for the launcher's config."""
  cmd = [sys.executable, "-m", "benchmarks.meta_step",
         "--workload", args.workload, "--iters", str(args.bench_iters),
         "--warmup", "2", "--no_flops",
         "--meta_batch", str(config["meta_batch"]),
         "--query", str(config["train_query"]),
         "--inner_steps", str(config["inner_steps"])]
  out = _run(cmd, args.cpus, args.timeout)
  line = [l for l in out.splitlines() if l.startswith("{")][-1]
  return json.loads(line)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="omniglot_5w1s")
  parser.add_argument("--workload", default="omniglot_5w1s",
                      help="the benchmarks.meta_step workload of the preset")
  parser.add_argument("--iterations", type=int, default=300)
  parser.add_argument("--log_every", type=int, default=50)
  parser.add_argument("--eval_every", type=int, default=150)
  parser.add_argument("--val_tasks", type=int, default=20)
  parser.add_argument("--bench_iters", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--cpus", type=int,
                      default=len(os.sched_getaffinity(0)))
  parser.add_argument("--data_dir", default=default_data_dir())
  parser.add_argument("--timeout", type=float, default=3600)
  args = parser.parse_args()

  started = time.strftime("%Y-%m-%d %H:%M")
  launcher, bench = [], []
  for round_ in range(args.rounds):
    with tempfile.TemporaryDirectory() as workdir:
      print(f"[launcher] round {round_ + 1}/{args.rounds}: launcher ...",
            file=sys.stderr, flush=True)
      run = launcher_seconds(args, workdir)
    launcher.append(run)
    print(f"[launcher]   -> {run['with_validation']:.4f} s/iter",
          file=sys.stderr, flush=True)
    print("[launcher]   benchmark ...", file=sys.stderr, flush=True)
    bench.append(benchmark_seconds(args, run["config"])["median_s_per_iter"])
    print(f"[launcher]   -> {bench[-1]:.4f} s/iter", file=sys.stderr,
          flush=True)
  with_val = statistics.median(r["with_validation"] for r in launcher)
  train_only = statistics.median(r["training_only"] for r in launcher)
  bench_s = statistics.median(bench)
  rows = [
      "| what | s/iter (median) | rounds | vs benchmark |",
      "| --- | ---: | --- | ---: |",
      f"| launcher, validation included | {with_val:.4g} | "
      + ", ".join(f"{r['with_validation']:.4g}" for r in launcher)
      + f" | {with_val / bench_s:.3f} |",
      f"| launcher, training only | {train_only:.4g} | "
      + ", ".join(f"{r['training_only']:.4g}" for r in launcher)
      + f" | {train_only / bench_s:.3f} |",
      f"| benchmarks.meta_step | {bench_s:.4g} | "
      + ", ".join(f"{b:.4g}" for b in bench) + " | 1.000 |"]
  print("\n".join(rows))
  print(f"\n{started}, preset {args.preset}, {args.iterations} iterations "
        f"per launcher run (validation every {args.eval_every} on "
        f"{args.val_tasks} tasks, progress every {args.log_every}), "
        f"{args.cpus} CPU(s), {args.rounds} round(s).")
  print(json.dumps({"preset": args.preset, "launcher_s_per_iter": with_val,
                    "launcher_training_s_per_iter": train_only,
                    "benchmark_s_per_iter": bench_s,
                    "ratio": with_val / bench_s, "cpus": args.cpus,
                    "date": started}))


if __name__ == "__main__":
  main()
