"""The sinusoid experiment end to end: results, plot, resume, launcher errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from maml_tf.training import loop
from maml_tf.training import sinusoid as experiment
from maml_tf.tasks import sinusoid as tasks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
LAUNCHER = os.path.join(REPO, "launch", "sinusoid.py")


def test_smoke_run_writes_results_plot_and_lowers_post_update_mse(tmp_path):
  config = experiment.make_config("smoke", iterations=1500, eval_tasks=100,
                                  baseline_iterations=300, log_every=500,
                                  checkpoint_every=500)
  lines = []
  out = experiment.train_and_evaluate(config, str(tmp_path), log=lines.append)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["maml"]["K=10"]["steps=1"]["n"] == 100
  assert saved["iterations"] == 1500        # of the weights evaluated
  k10 = saved["maml"]["K=10"]
  assert k10["steps=1"]["mean"] < 0.6 * k10["steps=0"]["mean"]
  # MAML after one step beats the pretrained baseline after one step.
  assert (k10["steps=1"]["mean"]
          < saved["pretrained"]["K=10"]["steps=1"]["mean"])
  assert (tmp_path / "sinusoid.png").stat().st_size > 10_000
  assert any("pre-update MSE" in l for l in lines)
  assert os.listdir(tmp_path / "maml" / "tensorboard")
  assert out["maml"] == saved["maml"]
  timing = saved["timing"]         # compilation and evaluation apart
  assert timing["compile_seconds"] > 0 and timing["timed_steps"] > 0
  assert saved["seconds_per_iteration"] == pytest.approx(
      timing["train_seconds"] / timing["timed_steps"])
  env = saved["environment"]       # what produced it
  import maml_tf  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  assert env["maml_tf"] == maml_tf.__version__
  assert env["tensorflow"] == tf.__version__
  assert env["commit"] is None or len(env["commit"]) == 40


def _train(workdir, iterations, **kw):
  config = experiment.make_config("smoke", iterations=iterations,
                                  checkpoint_every=10, log_every=10)
  learner = experiment.build_maml(config)
  loop.meta_train(
      learner, lambda i: tasks.sample_batch(
          5, 10, 10, np.random.default_rng([0, 1, i]))[0],
      iterations, workdir, checkpoint_every=10, log_every=10,
      log=lambda s: None, **kw)
  return learner


def test_resume_continues_step_counter_and_optimizer_state(tmp_path):
  straight = _train(str(tmp_path / "a"), 30)
  _train(str(tmp_path / "b"), 20)
  resumed = _train(str(tmp_path / "b"), 30)
  assert int(resumed.meta_optimizer.iterations.numpy()) == 30
  for a, b in zip(straight.model.get_weights(), resumed.model.get_weights()):
    np.testing.assert_array_equal(a, b)


def test_in_graph_steps_resume_exactly_and_stop_at_boundaries(tmp_path):
  sampler = tasks.batch_sampler(5, 10, 10, seed=3)
  logs = []
  kw = dict(graph_sampler=sampler, steps_per_call=4)
  straight = _train(str(tmp_path / "a"), 30, **kw)
  _train(str(tmp_path / "b"), 20, **kw)
  resumed = _train(str(tmp_path / "b"), 30, **kw)
  assert int(resumed.meta_optimizer.iterations.numpy()) == 30
  for a, b in zip(straight.model.get_weights(), resumed.model.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Calls of 4, 4, 2 steps end on every checkpoint boundary (10, 20, 30).
  ckpts = sorted(f for f in os.listdir(tmp_path / "a" / "checkpoints")
                 if f.endswith(".index"))
  assert ckpts == ["ckpt-10.index", "ckpt-20.index", "ckpt-30.index"]
  log = [json.loads(l) for l in
         (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [10, 20, 30]
  assert {"loss_before", "loss_after"} <= set(log[0])
  assert log[-1]["loss_after"] < log[-1]["loss_before"]


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="unknown sinusoid preset 'nope'"):
    experiment.make_config("nope")
  with pytest.raises(ValueError, match="inner_steps must be >= 1"):
    experiment.make_config("smoke", inner_steps=0)
  with pytest.raises(ValueError, match="meta_lr"):
    experiment.make_config("smoke", meta_lr=float("inf"))
  with pytest.raises(ValueError, match="xla must be one of"):
    experiment.make_config("smoke", xla="maybe")
  assert experiment.build_maml(experiment.make_config(
      "smoke", xla="off")).jit_compile is False


def _run_launcher(*args, timeout=120):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, LAUNCHER, *args], env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,match", [
    (["--preset=bogus"], "preset"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["--inner_steps=0"], "inner_steps must be >= 1"),
    (["--iterations=ten"], "iterations"),
])
def test_launcher_rejects_bad_flags_with_a_message(args, match, tmp_path):
  result = _run_launcher(*args, f"--logdir={tmp_path}", timeout=60)
  assert result.returncode != 0
  assert match in result.stderr + result.stdout


def test_sigterm_checkpoints_and_resume_continues(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
      [sys.executable, LAUNCHER, "--preset=smoke", "--iterations=10000000",
       f"--logdir={tmp_path}", "--baseline=false"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 90
  for line in proc.stdout:
    if line.startswith("step 200/"):
      proc.send_signal(signal.SIGTERM)
      break
    assert time.time() < deadline, "launcher printed no progress"
  rest = proc.communicate(timeout=60)[0]
  assert "SIGTERM: saved a checkpoint at step" in rest
  assert proc.returncode == 143
  assert "MSE on fresh tasks" not in rest   # no evaluation after a stop
  saved_step = int(rest.split("saved a checkpoint at step ")[1].split()[0])
  assert saved_step >= 200
  result = _run_launcher("--preset=smoke", f"--iterations={saved_step + 100}",
                         f"--logdir={tmp_path}", "--baseline=false",
                         "--eval_tasks=20")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "resumed from" in result.stdout
  assert f"meta-training iterations {saved_step} -> {saved_step + 100}" in (
      result.stdout)


def test_results_table_shows_the_median_where_tasks_diverged():
  row = {"steps=1": {"mean": 0.66, "ci95": 0.05, "median": 0.43},
         "steps=5": {"mean": 0.777, "ci95": 0.7, "median": 0.199}}
  text = experiment.format_table("MAML", {"K=5": row})
  assert "steps=1: 0.660±0.050  steps=5: 0.777±0.700 (median 0.199)" in text
  assert text.count("median") == 1


def test_launcher_console_has_no_tensorflow_cpp_lines_unless_verbose(
    tmp_path):
  import re  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  noise = re.compile(r"^[IWE]\d{4} |absl::InitializeLog|cpu_feature_guard|"
                     r"rebuild TensorFlow", re.M)
  outputs = {}
  for verbose in (False, True):
    cmd = [sys.executable, os.path.join(REPO, "launch", "sinusoid.py"),
           "--preset=smoke", "--iterations=20", "--eval_tasks=2",
           "--nobaseline", f"--logdir={tmp_path / str(verbose)}"]
    proc = subprocess.run(cmd + (["--verbose"] if verbose else []), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs[verbose] = proc.stdout + proc.stderr
  assert "meta-training iterations 0 -> 20" in outputs[False]
  assert not noise.search(outputs[False]), outputs[False][:2000]
  assert noise.search(outputs[True])         # the check can fail


def test_each_kind_of_meta_step_compiles_outside_the_timing(tmp_path):
  """The first plain step and the first logged step (with pre-update
  metrics) each trace a function: neither counts in rates or timings."""
  timing = {}
  _train(str(tmp_path), 20, timing=timing)    # logged steps: 10 and 20
  assert timing["timed_steps"] == 18
  assert timing["compile_seconds"] > timing["train_seconds"] / 18
