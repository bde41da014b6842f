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

from maml_tf.common.interrupts import UserFacingError
from maml_tf.common.stats import paired_difference

# The test tasks depend on the first three; returns scale with the horizon.
_SAME = ("env", "seed", "eval_tasks", "horizon")


class IncomparableRunsError(UserFacingError, ValueError):
  """Two runs that were not scored on the same test tasks and episodes, or
  a results file without per-task returns."""


def load_results(run: str) -> Dict:
  """The ``results.json`` of a run directory (or the file itself)."""
  path = os.path.join(run, "results.json") if os.path.isdir(run) else run
  if not os.path.exists(path):
    raise FileNotFoundError(f"no results.json at {path!r} (has the run "
                            "finished its evaluation?)")
  try:
    with open(path) as f:
      results = json.load(f)
  except ValueError as e:
    raise IncomparableRunsError(f"{path!r} is not valid JSON ({e})") from None
  if "per_task" not in results.get("eval", {}):
    raise IncomparableRunsError(
        f"{path!r} has no per-task returns (eval.per_task): it is not the "
        "results.json of a maml_tf.rl run")
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
    IncomparableRunsError: (a ``ValueError``) when the runs differ in the
      environment, seed or number of test tasks (different test tasks) or
      in the episode length.
  """
  for key in _SAME:
    va, vb = a["config"].get(key), b["config"].get(key)
    if va != vb:
      what = ("episodes of different lengths" if key == "horizon"
              else "different test tasks")
      raise IncomparableRunsError(
          f"the runs were scored on {what}: {key} is {va!r} against {vb!r}")
  pa, pb = a["eval"]["per_task"], b["eval"]["per_task"]
  return [paired_difference(x, y) for x, y in zip(pa, pb)]


def _label(run: str) -> str:
  """A run's name in a table: its directory's (also for its results.json)."""
  path = os.path.normpath(run)
  if not os.path.isdir(path):
    path = os.path.dirname(path) or path
  return os.path.basename(os.path.abspath(path))


def markdown_table(pairs: Sequence[Tuple[str, str]]) -> str:
  """A markdown table of paired differences, one row per ``(a, b)`` runs."""
  rows = []
  for run_a, run_b in pairs:
    diffs = paired_returns(load_results(run_a), load_results(run_b))
    cells = []
    for d in diffs:
      text = f"{d['mean']:+.1f} ± {d['ci95']:.1f}"
      cells.append(f"**{text}**" if abs(d["mean"]) > d["ci95"] else text)
    rows.append([_label(run_a), _label(run_b)] + cells)
  steps = max((len(r) - 2 for r in rows), default=0)
  head = ["a", "b"] + [f"{k} step{'s' if k != 1 else ''}"
                       for k in range(steps)]
  lines = ["| " + " | ".join(head) + " |",
           "| " + " | ".join("---" for _ in head) + " |"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)
