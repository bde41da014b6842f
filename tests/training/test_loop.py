"""meta_train's guarantees: consistent interrupts, checkpoint fallback."""

import json
import os
import re
import time

import keras
import numpy as np
import pytest

from maml_tf import MAML
from maml_tf.models.mlp import mlp
from maml_tf.tasks import sinusoid
from maml_tf.training import loop


def _batch(i):
  return sinusoid.sample_batch(4, 5, 5, np.random.default_rng([7, i]))[0]


class _InterruptAfterUpdate:
  """A learner whose ``stop_at``-th step is interrupted after it updated the
  weights, before meta_train could advance its step counter (Ctrl-C landing
  right after a compiled call returns)."""

  def __init__(self, maml, stop_at):
    self.maml, self.stop_at, self.calls = maml, stop_at, 0
    self.model, self.meta_optimizer = maml.model, maml.meta_optimizer

  def checkpoint_items(self):
    return self.maml.checkpoint_items()

  def train_step_tensors(self, batch, pre_update_metrics=True):
    out = self.maml.train_step_tensors(batch, pre_update_metrics)
    self.calls += 1
    if self.calls == self.stop_at:
      raise KeyboardInterrupt
    return out


def _maml():
  keras.utils.set_random_seed(0)
  return MAML(mlp(1, 1, hidden=(8,)), "mse", inner_lr=0.01)


def test_ctrl_c_after_an_update_saves_a_consistent_step(tmp_path):
  workdir = str(tmp_path / "run")
  maml = _maml()
  with pytest.raises(loop.Interrupted) as stopped:
    loop.meta_train(_InterruptAfterUpdate(maml, stop_at=7), _batch, 20,
                    workdir, log_every=5, checkpoint_every=5, log=lambda m: 0)
  assert stopped.value.step == 7
  # The checkpoint's step equals the optimizer's steps: resuming does the
  # remaining 13 meta-steps, not 14, and ends where an uninterrupted run does.
  resumed = _maml()
  ckpt, manager, step = loop.make_checkpoint(resumed, workdir)
  assert loop.restore_latest(ckpt, manager, log=lambda m: 0)
  assert int(step.numpy()) == int(resumed.meta_optimizer.iterations.numpy()) == 7
  loop.meta_train(resumed, _batch, 20, workdir, log_every=5,
                  checkpoint_every=5, log=lambda m: 0)
  straight = _maml()
  loop.meta_train(straight, _batch, 20, str(tmp_path / "straight"),
                  log_every=5, checkpoint_every=5, log=lambda m: 0)
  assert int(resumed.meta_optimizer.iterations.numpy()) == 20
  for a, b in zip(resumed.model.weights, straight.model.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_an_unreadable_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
  workdir = str(tmp_path / "run")
  maml = _maml()
  loop.meta_train(maml, _batch, 10, workdir, log_every=5, checkpoint_every=5,
                  log=lambda m: 0)
  ckpt, manager, step = loop.make_checkpoint(_maml(), workdir)
  newest = manager.latest_checkpoint
  assert newest.endswith("-10")
  data = [f for f in os.listdir(os.path.dirname(newest))
          if f.startswith(os.path.basename(newest) + ".data")]
  for name in data:                         # truncate the newest's data
    path = os.path.join(os.path.dirname(newest), name)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
  lines = []
  assert loop.restore_latest(ckpt, manager, log=lines.append)
  assert int(step.numpy()) == 5
  assert any("unreadable" in l and newest in l for l in lines), lines
  assert lines[-1].endswith("ckpt-5")
  # Every checkpoint unreadable: a clear error, not a raw IndexError.
  for name in os.listdir(os.path.dirname(newest)):
    if ".data" in name:
      path = os.path.join(os.path.dirname(newest), name)
      with open(path, "r+b") as f:
        f.truncate(1)
  with pytest.raises(RuntimeError, match="no readable checkpoint"):
    loop.restore_latest(ckpt, manager, log=lines.append)


def test_a_checkpoint_of_another_model_is_one_error_without_tf_warnings(
    tmp_path):
  import gc  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  loop.seed_checkpoint(_maml(), workdir, 1, log=lambda m: 0)
  keras.utils.set_random_seed(0)
  other = MAML(mlp(1, 1, hidden=(16,)), "mse", inner_lr=0.01)
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logger = logging.getLogger("tensorflow")
  logger.addHandler(handler)
  try:
    ckpt, manager, _ = loop.make_checkpoint(other, workdir)
    with pytest.raises(loop.CheckpointError,
                       match="belongs to a different model"):
      loop.restore_latest(ckpt, manager, log=lambda m: 0)
    del ckpt, manager, other
    gc.collect()                 # TF warns when the restore's objects go
  finally:
    logger.removeHandler(handler)
  assert not [r for r in records if "unrestored" in r.getMessage()
              or "could not be found" in r.getMessage()], [
                  r.getMessage() for r in records]


def test_a_run_seeded_with_given_weights_continues_from_their_iteration(
    tmp_path):
  workdir = str(tmp_path / "run")
  given = _maml()
  for v in given.model.trainable_variables:
    v.assign(v + 0.5)                       # weights unlike a fresh init
  seeded = [v.numpy() for v in given.model.trainable_variables]
  assert loop.seed_checkpoint(given, workdir, 100, log=lambda m: 0)
  learner = _maml()                         # another initialisation
  lines = []
  done = loop.meta_train(learner, _batch, 102, workdir, log_every=1,
                         checkpoint_every=10, log=lines.append)
  assert done == 102
  assert any("iterations 100 -> 102" in l for l in lines), lines
  assert int(learner.meta_optimizer.iterations.numpy()) == 2
  # Two Adam steps of 1e-3 from the seeded weights, not from learner's own.
  for a, b in zip(learner.model.trainable_variables, seeded):
    np.testing.assert_allclose(a.numpy(), b, atol=3e-3)
  # A workdir holding a checkpoint is not reseeded.
  assert not loop.seed_checkpoint(_maml(), workdir, 5, log=lambda m: 0)
  ckpt, manager, step = loop.make_checkpoint(_maml(), workdir)
  assert loop.restore_latest(ckpt, manager, log=lambda m: 0)
  assert int(step.numpy()) == 102


def test_log_lines_past_the_checkpoint_are_not_repeated_after_a_kill(
    tmp_path):
  workdir = str(tmp_path / "run")
  loop.meta_train(_maml(), _batch, 10, workdir, log_every=5,
                  checkpoint_every=10, log=lambda m: 0)
  log_path = os.path.join(workdir, "train_log.jsonl")
  # A killed run had logged step 15 but never checkpointed it.
  with open(log_path, "a") as f:
    f.write('{"step": 15, "kind": "train", "loss_after": 9.0}\n')
  resumed = _maml()
  loop.meta_train(resumed, _batch, 20, workdir, log_every=5,
                  checkpoint_every=10, log=lambda m: 0)
  with open(log_path) as f:
    steps = [json.loads(l)["step"] for l in f if l.strip()]
  assert steps == [5, 10, 15, 20]


def test_progress_names_compilation_and_times_only_what_follows(tmp_path):
  lines = []
  loop.meta_train(_maml(), _batch, 6, str(tmp_path), log_every=2,
                  checkpoint_every=6, log=lines.append)
  compiling = [i for i, l in enumerate(lines) if l.startswith("compiling")]
  compiled = [i for i, l in enumerate(lines) if l.startswith("compiled in")]
  steps = [l for l in lines if l.startswith("step ")]
  assert compiling and compiled and compiling[0] < compiled[0]
  assert lines.index(steps[0]) > compiled[0]
  assert [l.split()[1] for l in steps] == ["2/6", "4/6", "6/6"]
  # Rates and ETAs come from timed steps only: the first window holds the
  # two calls that trace (a plain and a logged meta-step), so it says so.
  assert steps[0].endswith("(with compilation)"), steps
  assert all(re.search(r" [\d.]+ (it/s|s/it), elapsed .*, left ", l)
             for l in steps[1:]), steps
  with open(tmp_path / "train_log.jsonl") as f:
    records = [json.loads(l) for l in f]
  assert "iterations_per_second" not in records[0]
  assert all(r["iterations_per_second"] > 0 for r in records[1:])


class _ShuffledMetrics(_InterruptAfterUpdate):
  """A learner whose steps return their metrics in changing key orders (as
  a compiled and an eager call did)."""

  def __init__(self, maml):
    super().__init__(maml, stop_at=-1)

  def train_step_tensors(self, batch, pre_update_metrics=True):
    out = self.maml.train_step_tensors(batch, pre_update_metrics)
    self.calls += 1
    keys = sorted(out, reverse=self.calls % 2 == 0)
    return {k: out[k] for k in keys}


def test_progress_lines_list_metrics_in_one_order(tmp_path):
  lines = []
  loop.meta_train(_ShuffledMetrics(_maml()), _batch, 6, str(tmp_path),
                  log_every=1, checkpoint_every=6, log=lines.append)
  names = [re.findall(r"([a-z_]+) [-\d.e]+", l.split("|")[0])
           for l in lines if l.startswith("step ")]
  assert len(names) == 6
  assert all(n == ["step", "loss_after", "loss_before"] for n in names), names


def test_maml_plus_plus_order_switch_is_a_traced_call_left_out_of_timing(
    tmp_path):
  """Steps 1-3 first order, then second order (``first_order_until=3``):
  the first plain and logged step of each order trace anew."""
  keras.utils.set_random_seed(0)
  maml = MAML(mlp(1, 1, hidden=(8,)), "mse", inner_lr=0.01,
              first_order_until=3)
  timing = {}
  loop.meta_train(maml, _batch, 8, str(tmp_path), log_every=4,
                  checkpoint_every=8, log=lambda m: 0, timing=timing)
  # Traced: step 1 (plain, first order), 4 (logged, second), 5 (plain,
  # second); timed: 2, 3, 6, 7, 8.
  assert timing["timed_steps"] == 5


def test_run_summary_writes_test_metrics_config_text_and_hparams(tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from maml_tf.training import sinusoid as experiment  # pylint: disable=g-import-not-at-top
  config = experiment.make_config("smoke")
  loop.write_run_summary(str(tmp_path), config, {"mse_after_1": 0.25}, 300)
  tags, values = set(), {}
  for path in glob.glob(str(tmp_path / "tensorboard" / "*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        tags.add(v.tag)
        if v.tag == "test/mse_after_1":
          values[v.tag] = (event.step, float(tf.make_ndarray(v.tensor)))
        if v.tag.startswith("config"):
          text = tf.make_ndarray(v.tensor).item().decode()
          assert f'"iterations": {config.iterations}' in text
  assert values["test/mse_after_1"] == (300, 0.25)
  assert any(t.startswith("config") for t in tags)
  assert "_hparams_/session_start_info" in tags
  assert dataclasses.asdict(config)


def _eval_interrupted_once(calls, seconds):
  """An evaluation that records its steps in ``calls``, is interrupted
  (Ctrl-C) on its second call and otherwise takes ``seconds``."""

  def eval_fn(it):
    calls.append(it)
    if len(calls) == 2:
      raise KeyboardInterrupt
    time.sleep(seconds)
    return {"val_loss": float(it)}
  return eval_fn


def test_an_evaluation_interrupted_by_ctrl_c_runs_again_on_resume(tmp_path):
  # Before, the checkpoint of step 4 was saved and the resumed run went on
  # to step 6: the validation record of step 4 was lost.
  calls = []
  eval_fn = _eval_interrupted_once(calls, 0.5)   # Ctrl-C during the one at 4

  with pytest.raises(loop.Interrupted):
    loop.meta_train(_maml(), _batch, 6, str(tmp_path), log_every=2,
                    checkpoint_every=2, eval_fn=eval_fn, eval_every=2,
                    log=lambda _: None)
  lines, timing = [], {}
  loop.meta_train(_maml(), _batch, 6, str(tmp_path), log_every=2,
                  checkpoint_every=2, eval_fn=eval_fn, eval_every=2,
                  log=lines.append, timing=timing)
  assert calls == [2, 4, 4, 6]
  # Only the evaluation at 6 is timed, and the steps' time stays positive
  # (before: the evaluation at 4 counted as compilation and was taken off
  # the steps' time, which went negative).
  assert 0.5 <= timing["eval_seconds"] < 1.0
  assert timing["train_seconds"] > 0 and timing["compile_seconds"] < 30
  assert any("evaluating the weights of step 4 first" in l for l in lines)
  with open(tmp_path / "train_log.jsonl") as f:
    evals = [r["step"] for r in map(json.loads, f) if r["kind"] == "eval"]
  assert evals == [2, 4, 6]


def test_an_interrupted_final_evaluation_runs_on_resume_outside_timing(
    tmp_path):
  calls = []
  eval_fn = _eval_interrupted_once(calls, 0.3)   # Ctrl-C during the last, at 5

  with pytest.raises(loop.Interrupted):
    loop.meta_train(_maml(), _batch, 5, str(tmp_path), log_every=2,
                    checkpoint_every=2, eval_fn=eval_fn, eval_every=3,
                    log=lambda _: None)
  timing = {}
  assert loop.meta_train(_maml(), _batch, 5, str(tmp_path), eval_fn=eval_fn,
                         eval_every=3, log=lambda _: None,
                         timing=timing) == 5
  assert calls == [3, 5, 5]
  assert timing["eval_seconds"] == 0
  with open(tmp_path / "train_log.jsonl") as f:
    evals = [r["step"] for r in map(json.loads, f) if r["kind"] == "eval"]
  assert evals == [3, 5]
