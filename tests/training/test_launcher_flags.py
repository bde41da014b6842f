"""Every config field is a flag of its launcher, with its documentation."""

import dataclasses
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _config(name):
  if name == "sinusoid":
    from maml_tf.training.sinusoid import SinusoidConfig  # pylint: disable=g-import-not-at-top
    return SinusoidConfig
  if name == "classification":
    from maml_tf.training.classification import ClassificationConfig  # pylint: disable=g-import-not-at-top
    return ClassificationConfig
  from maml_tf.rl.train import RLConfig  # pylint: disable=g-import-not-at-top
  return RLConfig


@pytest.mark.parametrize("launcher", ["sinusoid", "classification", "rl"])
def test_every_config_field_is_a_documented_flag(launcher):
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", f"{launcher}.py"),
       "--helpfull"], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")).stdout   # absl exits 1
  missing = [f.name for f in dataclasses.fields(_config(launcher))
             if f"--{f.name}:" not in out and f"--[no]{f.name}:" not in out]
  assert not missing, missing
  # Help text comes from the field's documentation, not only its name.
  assert "iterations between progress lines" in out or launcher == "rl"


def test_a_generated_flag_reaches_the_config(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "sinusoid.py"),
       "--preset=smoke", "--iterations=200", "--log_every=50",
       "--eval_shots=5", "--eval_tasks=10", "--nobaseline", "--noplot",
       f"--logdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
      check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")).stdout
  assert [l.split()[1] for l in out.splitlines() if l.startswith("step ")] == [
      "50/200", "100/200", "150/200", "200/200"]
  assert "K=10" not in out and "K=5" in out


@pytest.mark.parametrize("launcher,flag,message", [
    ("rl", "--hidden_sizes=8,abc", "error: --hidden_sizes=8,abc: expected a "
     "comma-separated list of ints"),
    ("sinusoid", "--meta_batch=0", "error: meta_batch"),
])
def test_a_bad_flag_value_ends_with_one_line_naming_it(launcher, flag,
                                                       message, tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", f"{launcher}.py"), flag,
       f"--logdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert out.returncode == 1
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith(message), out.stderr
  assert "Traceback" not in out.stderr and "--helpfull" not in out.stderr
  assert not os.listdir(tmp_path)          # nothing written
