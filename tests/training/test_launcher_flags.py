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
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", f"{launcher}.py"),
       "--helpfull"], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert done.returncode == 0, done.stderr[-2000:]   # help asked, help given
  out = done.stdout
  missing = [f.name for f in dataclasses.fields(_config(launcher))
             if f"--{f.name}:" not in out and f"--[no]{f.name}:" not in out]
  assert not missing, missing
  # Help text comes from the field's documentation, not only its name.
  assert "iterations between progress lines" in out or launcher == "rl"


def test_an_unparsable_flag_value_exits_1_even_beside_help():
  for args in (["--iterations=abc"], ["--iterations=abc", "--help"]):
    out = _launch("sinusoid", *args)
    assert out.returncode == 1, (args, out.stderr[-2000:])
    assert "FATAL Flags parsing error: flag --iterations=abc" in out.stderr
    assert "Traceback" not in out.stderr


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
    ("sinusoid", "--hidden=8,abc", "error: --hidden=8,abc: expected a "
     "comma-separated list of ints"),
    ("sinusoid", "--hidden=0", "error: hidden must list one or more layer "
     "widths >= 1"),
    ("sinusoid", "--baseline_iterations=-5", "error: baseline_iterations "
     "must be >= 0"),
    ("sinusoid", "--pretrained", "error: pretrained=True evaluates shipped "
     "weights: it needs eval_only=True"),
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


def _launch(launcher, *args, cwd=REPO):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", f"{launcher}.py"),
       *args], cwd=cwd, capture_output=True, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def test_eval_only_scores_a_run_with_its_own_settings(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / "run")
  trained = _launch("sinusoid", "--preset=smoke", "--iterations=20",
                    "--k_shot=5", "--inner_lr=0.02", "--hidden=8,8",
                    "--nobaseline", "--noplot", "--eval_tasks=5",
                    "--eval_shots=5", f"--logdir={run}")
  assert trained.returncode == 0, trained.stderr
  # No flag repeated: the run's shots, step size and network, not the
  # preset's (the network would not even restore).
  out = _launch("sinusoid", "--eval_only", "--eval_tasks=7", f"--logdir={run}")
  assert out.returncode == 0, out.stderr
  config = json.load(open(os.path.join(run, "results.json")))["config"]
  assert (config["k_shot"], config["inner_lr"], config["hidden"],
          config["eval_tasks"]) == (5, 0.02, [8, 8], 7)
  assert "a config other than the run's: eval_tasks" in out.stdout
  # A shipped model's evaluation never replaces a run's results.
  out = _launch("sinusoid", "--pretrained", "--eval_only", f"--logdir={run}")
  assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith(
      f"error: pretrained=True evaluates shipped weights, but {run} holds a "
      "run's checkpoints"), out.stderr
  (tmp_path / "afile").write_text("")
  out = _launch("sinusoid", "--preset=smoke", f"--logdir={tmp_path}/afile")
  assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith(
      f"error: cannot write to the output folder {tmp_path}/afile"), out.stderr


def test_rl_launcher_defaults_and_one_line_errors(tmp_path):
  # The default run directory follows --env and --algorithm.
  out = _launch("rl", "--env=cheetah_dir", "--algorithm=random",
                "--eval_only", cwd=str(tmp_path))
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      "error: eval_only: no checkpoint under runs/rl/cheetah_dir/random/ckpt;"
      " train first (or pass pretrained=True / --pretrained for the shipped "
      "meta-policy)")
  (tmp_path / "afile").write_text("")
  for args, message in (
      (["stray"], "error: unexpected arguments ['stray']"),
      (["--hvp_method=foo"], "error: hvp_method must be one of"),
      (["--ls_backtrack_ratio=2"], "error: ls_backtrack_ratio must be"),
      ([f"--logdir={tmp_path}/afile"], "error: cannot write to the output "
       "folder")):
    out = _launch("rl", *args, "--iterations=1", cwd=str(tmp_path))
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 1 and lines[-1].startswith(message), out.stderr
    assert "Traceback" not in out.stderr and "--helpfull" not in out.stderr


def test_rl_eval_only_uses_the_runs_settings(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / "nav")
  small = ["--horizon=10", "--meta_batch=2", "--fast_batch_size=2",
           "--eval_tasks=2", "--hidden_sizes=8", "--fast_lr=0.3"]
  trained = _launch("rl", "--iterations=1", *small, f"--logdir={run}")
  assert trained.returncode == 0, trained.stderr
  out = _launch("rl", "--eval_only", "--eval_batch_size=3", f"--logdir={run}")
  assert out.returncode == 0, out.stderr
  config = json.load(open(os.path.join(run, "results.json")))["config"]
  assert (config["horizon"], config["hidden_sizes"], config["fast_lr"],
          config["eval_tasks"], config["eval_batch_size"]) == (
              10, [8], 0.3, 2, 3)


def test_rl_launcher_without_mujoco_and_with_a_mismatched_network(tmp_path):
  blocked = subprocess.run(
      [sys.executable, "-c",
       "import sys; sys.modules['mujoco'] = None; "  # as if not installed
       "sys.argv = ['rl.py', '--iterations=1']; "
       "from maml_tf.launch import rl; rl.run()"],
      cwd=str(tmp_path), capture_output=True, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  lines = [l for l in blocked.stderr.splitlines() if l.strip()]
  assert blocked.returncode == 1 and lines[-1].startswith(
      "maml-tf-rl needs the meta-RL dependencies (MuJoCo is not installed"), (
          blocked.stderr)
  assert "Traceback" not in blocked.stderr
  out = _launch("rl", "--pretrained", "--eval_only", "--hidden_sizes=50,50",
                f"--logdir={tmp_path}/shipped")
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 1 and lines[-1].startswith(
      "error: the shipped weights 'navigation' do not fit this network"), (
          out.stderr)
  assert "Traceback" not in out.stderr and "UserWarning" not in out.stderr


def test_a_start_that_fails_on_missing_data_leaves_no_run_folder(tmp_path):
  # Before, the failed start left a folder holding only config.json.
  run = tmp_path / "run"
  out = _launch("classification", "--preset=omniglot_5w1s", "--iterations=1",
                f"--data_dir={tmp_path}/missing", f"--logdir={run}")
  assert out.returncode == 1
  assert "Omniglot folder not found" in out.stderr.splitlines()[-1]
  assert not run.exists()
