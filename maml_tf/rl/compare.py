"""Paired comparison of two meta-RL runs scored on the same test tasks.

The test tasks of :func:`maml_tf.rl.train_and_evaluate` depend on the
environment, the seed and the number of test tasks only, so two runs that
share these were scored on the same goals, and ``results.json`` keeps each
task's return (``eval.per_task``). Differencing task by task removes the
spread between near and far goals that dominates unpaired standard errors.

Example:
  >>> a = load_results("runs/rl/navigation/maml")
  >>> b = load_results("runs/rl/navigation/pretrained")
  >>> [d["mean"] for d in paired_returns(a, b)]   # after 0, 1, 2, 3 steps
"""

import json
import os
from typing import Dict, List, Sequence, Tuple

from maml_tf.common.stats import paired_difference

_SAME = ("env", "seed", "eval_tasks")


def load_results(run: str) -> Dict:
  """The ``results.json`` of a run directory (or the file itself)."""
  path = os.path.join(run, "results.json") if os.path.isdir(run) else run
  if not os.path.exists(path):
    raise FileNotFoundError(f"no results.json at {path!r} (has the run "
                            "finished its evaluation?)")
  with open(path) as f:
    results = json.load(f)
  if "per_task" not in results.get("eval", {}):
    raise ValueError(f"{path!r} has no per-task returns (eval.per_task)")
  return results


def paired_returns(a: Dict, b: Dict) -> List[Dict[str, float]]:
  """Per step: mean and 95% interval of run ``a``'s return minus ``b``'s.

  Arguments:
    a, b: two ``results.json`` contents (:func:`load_results`) of the same
      environment, seed and number of test tasks.

  Returns:
    one :func:`~maml_tf.common.stats.paired_difference` dict per number of
    gradient steps both runs were evaluated after.

  Raises:
    ValueError: when the runs were not scored on the same test tasks.
  """
  for key in _SAME:
    va, vb = a["config"].get(key), b["config"].get(key)
    if va != vb:
      raise ValueError(f"runs were scored on different test tasks: {key} is "
                       f"{va!r} against {vb!r}")
  pa, pb = a["eval"]["per_task"], b["eval"]["per_task"]
  return [paired_difference(x, y) for x, y in zip(pa, pb)]


def markdown_table(pairs: Sequence[Tuple[str, str]]) -> str:
  """A markdown table of paired differences, one row per ``(a, b)`` runs."""
  rows = []
  for run_a, run_b in pairs:
    diffs = paired_returns(load_results(run_a), load_results(run_b))
    cells = []
    for d in diffs:
      text = f"{d['mean']:+.1f} ± {d['ci95']:.1f}"
      cells.append(f"**{text}**" if abs(d["mean"]) > d["ci95"] else text)
    rows.append([os.path.basename(os.path.normpath(run_a)),
                 os.path.basename(os.path.normpath(run_b))] + cells)
  steps = max((len(r) - 2 for r in rows), default=0)
  head = ["a", "b"] + [f"{k} step{'s' if k != 1 else ''}"
                       for k in range(steps)]
  lines = ["| " + " | ".join(head) + " |",
           "| " + " | ".join("---" for _ in head) + " |"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)
