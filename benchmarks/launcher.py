"""Launcher throughput against the meta-step benchmark, same config.

  python -m benchmarks.launcher                       # Omniglot 5-way 1-shot
  python -m benchmarks.launcher --iterations 400 --rounds 3 --cpus 1

Runs, in turn for ``--rounds`` rounds (so that the machine's drift reaches
both alike), each in its own process:

* ``launch/classification.py --preset=PRESET`` for ``--iterations``
  meta-iterations on the real data (tf.data episodes, checkpoints, progress
  every ``--log_every`` steps with the pre-update metrics, two validations).
  Its ``train_log.jsonl`` gives the rate between two logged steps (the
  launcher's own figure: data pipeline and logging included, compilation
  and validation left out); the median over the windows after the first
  (which compiles the logging step) is its training throughput. Validation
  is then added as the launcher runs it with the preset's settings: the
  second validation's seconds (compiled by then) per ``eval_every``
  iterations;
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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


def launcher_seconds(args, workdir, eval_every: int) -> dict:
  """Seconds per iteration of one launcher run (see the module docstring)."""
  cmd = [sys.executable, "launch/classification.py", f"--preset={args.preset}",
         f"--iterations={args.iterations}", f"--log_every={args.log_every}",
         f"--eval_every={args.iterations // 2}",
         f"--checkpoint_every={args.iterations // 2}", "--eval_tasks=10",
         "--adapted_check_tasks=1", "--noexport", "--noplot",
         f"--logdir={workdir}"]
  if args.data_dir:
    cmd.append(f"--data_dir={args.data_dir}")
  _run(cmd, args.cpus, args.timeout)
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    config = json.load(f)["config"]
  with open(os.path.join(workdir, "train_log.jsonl"), encoding="utf-8") as f:
    records = [json.loads(l) for l in f if l.strip()]
  rates = [r["iterations_per_second"] for r in records
           if r["kind"] == "train" and "iterations_per_second" in r][1:]
  evals = [r["seconds"] for r in records if r["kind"] == "eval"]
  if not rates or len(evals) < 2:
    raise RuntimeError(f"too few logged windows or validations in {records}")
  training = 1 / statistics.median(rates)
  validation = evals[-1] / eval_every
  return {"with_validation": training + validation, "training_only": training,
          "validation_s": evals[-1], "windows": len(rates), "config": config}


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
  parser.add_argument("--bench_iters", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--cpus", type=int,
                      default=len(os.sched_getaffinity(0)))
  parser.add_argument("--data_dir", default=default_data_dir())
  parser.add_argument("--timeout", type=float, default=3600)
  args = parser.parse_args()
  if (args.iterations // 2) % args.log_every:
    parser.error("--iterations / 2 must be a multiple of --log_every (the "
                 "validations then fall on logged steps)")

  from maml_tf.training import classification  # pylint: disable=g-import-not-at-top
  eval_every = classification.make_config(args.preset).eval_every
  started = time.strftime("%Y-%m-%d %H:%M")
  launcher, bench = [], []
  for round_ in range(args.rounds):
    with tempfile.TemporaryDirectory() as workdir:
      print(f"[launcher] round {round_ + 1}/{args.rounds}: launcher ...",
            file=sys.stderr, flush=True)
      run = launcher_seconds(args, workdir, eval_every)
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
        f"per launcher run (progress every {args.log_every}; validation as "
        f"the preset runs it: {launcher[0]['config']['val_tasks']} tasks every "
        f"{eval_every} iterations, "
        f"{statistics.median(r['validation_s'] for r in launcher):.1f} s "
        f"each), {args.cpus} CPU(s), {args.rounds} round(s).")
  print(json.dumps({"preset": args.preset, "launcher_s_per_iter": with_val,
                    "launcher_training_s_per_iter": train_only,
                    "benchmark_s_per_iter": bench_s,
                    "ratio": with_val / bench_s, "cpus": args.cpus,
                    "date": started}))


if __name__ == "__main__":
  main()
