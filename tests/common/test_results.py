"""Outputs are probed before training; a failing figure never costs the
results file."""

import json
import os

import pytest

from maml_tf.common import results
from maml_tf.training import plots
from maml_tf.training import sinusoid as experiment

_SMALL = dict(iterations=20, baseline=False, eval_tasks=5, log_every=10,
              checkpoint_every=10)


def test_an_unwritable_output_fails_before_training(tmp_path):
  workdir = tmp_path / "run"
  os.makedirs(workdir / "sinusoid.png")      # a folder where a file goes
  lines = []
  with pytest.raises(PermissionError, match="sinusoid.png cannot be written"):
    experiment.train_and_evaluate(experiment.make_config("smoke", **_SMALL),
                                  str(workdir), log=lines.append)
  assert not any("meta-training" in line for line in lines)
  (tmp_path / "file").write_text("")
  with pytest.raises(PermissionError, match="cannot write to the output"):
    results.check_writable(str(tmp_path / "file" / "below"), ())
  results.check_writable(str(tmp_path / "fresh"), ("results.json",))
  from maml_tf.common import interrupts  # pylint: disable=g-import-not-at-top
  with pytest.raises(interrupts.UserFacingError):    # launchers: one line
    results.check_writable(str(tmp_path / "file"), ())


def test_unwritable_output_folders_fail_before_training(tmp_path,
                                                       monkeypatch):
  """An existing checkpoints/ (or other output folder) that cannot be
  written stops the run at once, not at its first checkpoint."""
  import tempfile  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  os.makedirs(workdir / "maml" / "checkpoints")
  mkstemp = tempfile.mkstemp

  def refuse(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
    if dir and dir.endswith("checkpoints"):
      raise PermissionError(1, "Operation not permitted")
    return mkstemp(*args, dir=dir, **kwargs)
  monkeypatch.setattr(tempfile, "mkstemp", refuse)
  lines = []
  with pytest.raises(PermissionError, match=r"output folder .*maml/"
                     "checkpoints cannot be written"):
    experiment.train_and_evaluate(experiment.make_config("smoke", **_SMALL),
                                  str(workdir), log=lines.append)
  assert not any("meta-training" in line for line in lines)


def test_results_files_are_strict_json_readable_by_all(tmp_path):
  path = results.write_json(str(tmp_path / "r.json"),
                            {"a": float("nan"), "b": [1.5, float("inf")],
                             "c": __import__("numpy").float32("nan")})
  with open(path) as f:
    text = f.read()
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"a": None, "b": [1.5, None], "c": None}
  mask = os.umask(0o022)
  os.umask(mask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask   # like the figures


def test_a_failing_figure_still_writes_results(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("no display")
  monkeypatch.setattr(plots, "sinusoid_figure", broken)
  lines = []
  out = experiment.train_and_evaluate(
      experiment.make_config("smoke", **_SMALL), str(tmp_path / "run"),
      log=lines.append)
  assert out["plot"] is None
  assert any("could not write a figure (RuntimeError: no display)" in l
             for l in lines)
  with open(tmp_path / "run" / "results.json") as f:
    assert json.load(f)["maml"]
