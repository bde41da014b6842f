"""Paired comparison of meta-RL runs (maml_tf.rl.compare, launch/rl_compare.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from maml_tf.rl import compare


def _write(path, per_task, seed=0, env="maml_tf/Navigation2D-v0", horizon=100):
  path.mkdir()
  per_task = np.asarray(per_task, np.float64)
  (path / "results.json").write_text(json.dumps(
      {"config": {"env": env, "seed": seed, "eval_tasks": per_task.shape[1],
                  "horizon": horizon},
       "eval": {"returns": per_task.mean(1).tolist(),
                "per_task": per_task.tolist()}}))
  return str(path)


def test_paired_returns_differences_task_by_task(tmp_path):
  rng = np.random.default_rng(0)
  base = rng.normal(-40.0, 15.0, size=(3, 40))        # far and near goals
  a = _write(tmp_path / "a", base + [[0.0], [5.0], [0.0]]
             + rng.normal(0, 0.5, size=(3, 40)))
  b = _write(tmp_path / "b", base)
  diffs = compare.paired_returns(compare.load_results(a),
                                 compare.load_results(b))
  assert len(diffs) == 3
  np.testing.assert_allclose([d["mean"] for d in diffs], [0.0, 5.0, 0.0],
                             atol=0.3)
  assert diffs[1]["ci95"] < 0.3      # pairing removed the goals' spread
  assert all(d["n"] == 40 for d in diffs)
  table = compare.markdown_table([(a, b)])
  row = table.splitlines()[2]
  assert row.startswith("| a | b |") and "**+5.0 ± 0.1**" in row
  assert row.count("**") == 2        # only the significant step is bold
  assert "| 0 steps | 1 step | 2 steps |" in table


def test_paired_returns_refuses_different_test_tasks(tmp_path):
  a = compare.load_results(_write(tmp_path / "a", [[1.0, 2.0]], seed=0))
  b = compare.load_results(_write(tmp_path / "b", [[1.0, 2.0]], seed=1))
  with pytest.raises(ValueError, match="seed is 0 against 1"):
    compare.paired_returns(a, b)
  c = compare.load_results(_write(tmp_path / "c", [[1.0, 2.0]], horizon=10))
  with pytest.raises(ValueError, match="episodes of different lengths: "
                     "horizon is 100 against 10"):
    compare.paired_returns(a, c)
  with pytest.raises(FileNotFoundError, match="no results.json"):
    compare.load_results(str(tmp_path / "missing"))
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "results.json").write_text('{"eval": {"returns": [1]}}')
  with pytest.raises(ValueError, match="per_task"):
    compare.load_results(str(tmp_path / "old"))


def test_launcher_prints_table_and_rejects_bad_pairs(tmp_path):
  a = _write(tmp_path / "a", [[1.0, 2.0, 3.0]])
  b = _write(tmp_path / "b", [[0.0, 1.0, 2.0]])
  script = os.path.join(os.path.dirname(__file__), "..", "..", "launch",
                        "rl_compare.py")
  out = subprocess.run([sys.executable, script, f"--pairs={a}:{b}"],
                       capture_output=True, text=True, check=True).stdout
  assert "**+1.0 ± 0.0**" in out
  # A results.json file names its run by its directory.
  out = subprocess.run(
      [sys.executable, script, f"--pairs={a}/results.json:{b}"],
      capture_output=True, text=True, check=True).stdout
  assert out.splitlines()[2].startswith("| a | b |")
  bad = subprocess.run([sys.executable, script, f"--pairs={a}"],
                       capture_output=True, text=True)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines() == [
      f"error: --pairs entries are RUN_A:RUN_B; got {a!r}"]
  other = _write(tmp_path / "other", [[1.0, 2.0, 3.0]], seed=4)
  for pairs, message in ((f"{a}:{other}", "seed is 0 against 4"),
                         (f"{a}:{tmp_path}/missing", "no results.json")):
    bad = subprocess.run([sys.executable, script, f"--pairs={pairs}"],
                         capture_output=True, text=True)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and message in lines[0], (
        bad.stderr)
