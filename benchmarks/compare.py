"""maml_tf against PyTorch and JAX MAML on the same meta-step workloads.

  python -m benchmarks.compare --workloads sinusoid omniglot_5w1s
  python -m benchmarks.compare --workloads omniglot_20w1s --iters 3 \\
      --warmup 1 --implementations maml_tf jax --json_out runs/compare.jsonl
  python -m benchmarks.compare --from_json runs/compare.jsonl   # table again
  python -m benchmarks.compare --workloads sinusoid --implementations \
      maml_tf jax --rounds 5 --cpus 1       # interleaved, median of rounds

Runs, one after another in subprocesses (so that each gets the machine to
itself and its own peak RSS), ``benchmarks/meta_step.py`` (maml_tf, in this
Python) and the peers of ``benchmarks/peers/`` (in the peers' venv,
``.venv-peers``; see ``benchmarks/peers/README.md``), collects their JSON
lines and prints a markdown table for BENCHMARKS.md: seconds per
meta-iteration (median), meta-iterations per second, speed relative to
maml_tf, the first call (trace/compile + first run) and peak RSS. The load
average before and after is printed under the table: on a busy machine the
numbers mean little, multi-threaded ones least (threads that wait for each
other at every op while another process holds the cores): ``--cpus 1`` pins
every run to one CPU and one thread. ``--rounds N`` runs the implementations
of a workload in turn N times (A B A B ...), so that the machine's drift
over minutes reaches all of them alike, and reports each one's median over
the rounds with every round's figure. Implementations whose interpreter is
missing are skipped with a note.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = os.path.join(ROOT, ".venv-peers", "bin", "python")
WORKLOADS = ("sinusoid", "omniglot_5w1s", "omniglot_20w1s",
             "miniimagenet_5w1s")
# Default (iters, warmup): small enough that sinusoid + omniglot_5w1s for all
# implementations takes a few minutes on 2 cores.
DEFAULT_ITERS = {"sinusoid": (50, 5), "omniglot_5w1s": (3, 1),
                 "omniglot_20w1s": (3, 1), "miniimagenet_5w1s": (3, 1)}

# name: (label, interpreter ("main" or "peers"), script argv)
IMPLEMENTATIONS = {
    "maml_tf": ("maml_tf", "main", ["-m", "benchmarks.meta_step"]),
    # MAML.train_steps: 100 meta-steps per compiled call, tasks sampled in
    # the graph (sinusoid only: its steps are short enough for call overhead
    # to matter).
    "maml_tf_loop": ("maml_tf train_steps", "main",
                     ["-m", "benchmarks.meta_step", "--steps_per_call", "100"]),
    "torch_func": ("PyTorch torch.func", "peers",
                   ["benchmarks/peers/torch_maml.py", "--variant", "func"]),
    "torch_autograd": ("PyTorch autograd loop", "peers",
                       ["benchmarks/peers/torch_maml.py", "--variant",
                        "autograd_loop"]),
    "jax": ("JAX jit(vmap)", "peers", ["benchmarks/peers/jax_maml.py",
                                       "--variant", "vmap_jit"]),
    "jax_map": ("JAX jit(lax.map)", "peers", ["benchmarks/peers/jax_maml.py",
                                              "--variant", "map_jit"]),
    "jax_loop": ("JAX jit(fori_loop(vmap)), 100 steps per call", "peers",
                 ["benchmarks/peers/jax_maml.py", "--variant",
                  "vmap_jit_loop"]),
}


def run_one(impl: str, workload: str, iters: int, warmup: int,
            first_order: bool, peers_python: str, timeout: float,
            cpus: int) -> dict:
  """Runs one benchmark subprocess; returns its JSON line (or an error).

  ``cpus``: pin the subprocess to the first ``cpus`` CPUs (TF, XLA and
  PyTorch size their thread pools from the affinity mask; PyTorch is also
  told ``--threads cpus``).
  """
  _, interpreter, argv = IMPLEMENTATIONS[impl]
  if impl in ("maml_tf_loop", "jax_loop") and workload != "sinusoid":
    return {"skipped": "100 steps per call only for the sinusoid"}
  python = sys.executable if interpreter == "main" else peers_python
  if not os.path.exists(python):
    return {"error": f"no interpreter {python} (see benchmarks/peers/"
                     "README.md)"}
  cmd = [python] + argv + ["--workload", workload, "--iters", str(iters),
                           "--warmup", str(warmup)]
  if first_order:
    cmd.append("--first_order")
  if impl.startswith("torch"):
    cmd += ["--threads", str(cpus)]
  pin = sorted(os.sched_getaffinity(0))[:cpus]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False,
                          preexec_fn=lambda: os.sched_setaffinity(0, pin))
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  wall = time.perf_counter() - t0
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
  result = json.loads(lines[-1])
  result["wall_s"] = wall
  result["implementation"] = impl
  result["cpus"] = cpus
  return result


def median_round(runs: list) -> dict:
  """The run with the median seconds per iteration, listing every round's
  figure under ``rounds`` (several rounds), or the first error."""
  good = [r for r in runs if "median_s_per_iter" in r]
  if len(good) < len(runs) or len(runs) == 1:
    return next((r for r in runs if "median_s_per_iter" not in r), runs[0])
  ordered = sorted(good, key=lambda r: r["median_s_per_iter"])
  chosen = dict(ordered[(len(ordered) - 1) // 2])
  chosen["rounds"] = [r["median_s_per_iter"] for r in good]
  return chosen


def describe(impl: str, r: dict) -> str:
  """Implementation label with its version and the variant that ran."""
  label = IMPLEMENTATIONS[impl][0]
  if impl.startswith("maml_tf"):
    extra = "" if r.get("task_chunk") is None else (
        f", task chunk {r['task_chunk']}")
    if r.get("closed_form"):
      extra += ", closed form"
    if r.get("jit_compile"):
      extra += ", XLA"
    return (f"{label} (TF {r.get('tensorflow', '?')}, {r.get('execution')}"
            f"{extra})")
  if impl.startswith("torch"):
    version = r.get("torch", "?").split("+")[0]
    extra = f", {r['variant']}"
    if r.get("bn", "none") != "none":
      extra += f", BN {r['bn']}"
    return f"{label} ({version}{extra})"
  return f"{label} ({r.get('jax', '?')})"


def table(results, first_order: bool) -> str:
  """The markdown table of ``[(workload, impl, result dict)]``."""
  order = "first-order" if first_order else "second-order"
  rounds = any("rounds" in r for _, _, r in results)
  rows = [f"| workload ({order}) | implementation | s/iter | it/s | "
          "speed vs maml_tf | first call s | peak RSS MB |"
          + (" s/iter of each round |" if rounds else ""),
          "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
          + (" --- |" if rounds else "")]
  tf_s = {w: r["median_s_per_iter"] for w, i, r in results
          if i == "maml_tf" and "error" not in r}
  for workload, impl, r in results:
    if "skipped" in r:
      continue
    if "error" in r:
      rows.append(f"| {workload} | {IMPLEMENTATIONS[impl][0]} | "
                  f"error: {r['error'][:120]} | | | | |")
      continue
    s = r["median_s_per_iter"]
    ratio = f"{tf_s[workload] / s:.2f}x" if workload in tf_s else "-"
    rows.append(f"| {workload} | {describe(impl, r)} | {s:.4g} | "
                f"{1 / s:.4g} | {ratio} | {r.get('compile_s', float('nan')):.3g}"
                f" | {r['peak_rss_mb']:.0f} |"
                + (" " + ", ".join(f"{x:.4g}" for x in r.get("rounds", []))
                   + " |" if rounds else ""))
  return "\n".join(rows)


def cpu_description() -> str:
  """The CPU's model name and widest vector ISA (for the table's note)."""
  model, flags = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
         else "no AVX2")
  if "amx_tile" in flags:
    isa += ", AMX"
  return f"{model} ({isa})"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workloads", nargs="+", choices=WORKLOADS,
                      default=["sinusoid", "omniglot_5w1s"])
  parser.add_argument("--implementations", nargs="+",
                      choices=list(IMPLEMENTATIONS),
                      default=list(IMPLEMENTATIONS))
  parser.add_argument("--iters", type=int, default=None,
                      help="timed iterations (default: per workload)")
  parser.add_argument("--warmup", type=int, default=None)
  parser.add_argument("--first_order", action="store_true")
  parser.add_argument("--cpus", type=int,
                      default=len(os.sched_getaffinity(0)),
                      help="CPUs each run is pinned to (default: all); "
                      "also PyTorch's --threads")
  parser.add_argument("--peers_python", default=PEERS_PYTHON)
  parser.add_argument("--timeout", type=float, default=900,
                      help="seconds per benchmark subprocess")
  parser.add_argument("--rounds", type=int, default=1,
                      help="run the implementations of a workload in turn "
                      "this many times; report each one's median round")
  parser.add_argument("--json_out", help="also write the JSON lines here")
  parser.add_argument("--from_json",
                      help="print the table of a --json_out file; run nothing")
  args = parser.parse_args()

  if args.from_json:
    with open(args.from_json, encoding="utf-8") as f:
      results = [json.loads(l) for l in f if l.strip()]
    print(table([(r["workload"], r["implementation"], r) for r in results],
                results[0].get("first_order", False)))
    return

  load_before = os.getloadavg()
  started = time.strftime("%Y-%m-%d %H:%M")
  results = []
  for workload in args.workloads:
    iters, warmup = DEFAULT_ITERS[workload]
    iters = args.iters or iters
    warmup = warmup if args.warmup is None else args.warmup
    runs = {impl: [] for impl in args.implementations}
    for round_ in range(args.rounds):
      for impl in args.implementations:
        print(f"[compare] {workload} / {impl} ({iters} iters, {warmup} "
              f"warmup, round {round_ + 1}/{args.rounds}) ...",
              file=sys.stderr, flush=True)
        r = run_one(impl, workload, iters, warmup, args.first_order,
                    args.peers_python, args.timeout, args.cpus)
        r.setdefault("workload", workload)
        r.setdefault("implementation", impl)
        print(f"[compare]   -> {r.get('median_s_per_iter', r.get('error', r.get('skipped')))}",
              file=sys.stderr, flush=True)
        runs[impl].append(r)
    for impl in args.implementations:
      results.append((workload, impl, median_round(runs[impl])))
  load_after = os.getloadavg()

  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      for _, _, r in results:
        f.write(json.dumps(r) + "\n")
  print(table(results, args.first_order))
  print()
  print(f"{started}, {cpu_description()}, runs pinned to {args.cpus} of "
        f"{os.cpu_count()} CPUs; {args.rounds} round(s); load average (1/5/15 min) "
        f"before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.2f}' for x in load_after)}. s/iter: median over the"
        " timed iterations; first call: trace/compile + first iteration.")


if __name__ == "__main__":
  main()
