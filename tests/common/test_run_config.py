"""Resuming a run directory with a config that changes the experiment is
refused; safe changes are allowed and recorded."""

import dataclasses
import json
import os

import pytest

from maml_tf.common import run_config
from maml_tf.training import sinusoid as experiment


@dataclasses.dataclass
class _Config:
  inner_lr: float = 0.1
  meta_batch: int = 4
  iterations: int = 10
  resume: bool = True
  eval_only: bool = False


def _fake_checkpoint(workdir):
  os.makedirs(os.path.join(workdir, "maml", "checkpoints"))
  with open(os.path.join(workdir, "maml", "checkpoints", "checkpoint"),
            "w") as f:
    f.write("")


def test_check_resume_rules(tmp_path):
  workdir = str(tmp_path)
  assert run_config.check_resume(_Config(), workdir) == []
  _fake_checkpoint(workdir)
  with pytest.raises(ValueError, match=r"inner_lr: 0\.1 -> 0\.5, meta_batch: "
                     r"4 -> 8\. Resuming would mix two experiments\. Use a "
                     "new --logdir"):
    run_config.check_resume(_Config(inner_lr=0.5, meta_batch=8), workdir)
  lines = []
  changes = run_config.check_resume(_Config(iterations=20), workdir,
                                    lines.append)
  assert changes[-1]["fields"] == {"iterations": [10, 20]}
  assert "iterations: 10 -> 20" in lines[0]
  with open(os.path.join(workdir, "config.json")) as f:
    stored = json.load(f)
  assert stored["config"]["iterations"] == 20 and len(stored["changes"]) == 1
  # eval_only never trains: differences are only logged.
  run_config.check_resume(_Config(inner_lr=0.5, eval_only=True), workdir,
                          lines.append)
  assert lines[-1] == ("eval_only with a config other than the run's: "
                       "inner_lr: 0.1 -> 0.5, iterations: 20 -> 10")
  # Its own mode (eval_only, resume) is not reported as a difference.
  count = len(lines)
  run_config.check_resume(_Config(iterations=20, eval_only=True,
                                  resume=False),
                          workdir, lines.append)
  assert len(lines) == count
  # Starting afresh (resume=False) replaces the stored config.
  run_config.check_resume(_Config(inner_lr=0.5, resume=False), workdir)
  run_config.check_resume(_Config(inner_lr=0.5), workdir)


def test_sinusoid_resume_with_another_inner_lr_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  base = dict(iterations=100, baseline=False, plot=False, eval_tasks=5,
              log_every=50, checkpoint_every=50)
  experiment.train_and_evaluate(experiment.make_config("smoke", **base),
                                workdir, log=lambda s: None)
  with pytest.raises(ValueError, match=r"inner_lr: 0\.01 -> 0\.02"):
    experiment.train_and_evaluate(
        experiment.make_config("smoke", **{**base, "inner_lr": 0.02}),
        workdir, log=lambda s: None)
  out = experiment.train_and_evaluate(
      experiment.make_config("smoke", **{**base, "iterations": 150}),
      workdir, log=lambda s: None)
  assert out["config_changes"][-1]["fields"]["iterations"] == [100, 150]


def test_eval_only_without_resume_keeps_the_stored_config(tmp_path):
  workdir = str(tmp_path)
  run_config.check_resume(_Config(), workdir)
  _fake_checkpoint(workdir)
  # An evaluation with another step size, resume off: it reads the
  # checkpoint, so the run's own config.json must stay the training one.
  run_config.check_resume(
      _Config(inner_lr=0.5, resume=False, eval_only=True), workdir,
      lambda m: None)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["config"]["inner_lr"] == 0.1


def test_stored_config_is_the_run_without_its_start_mode(tmp_path):
  workdir = str(tmp_path)
  assert run_config.stored_config(workdir) is None
  run_config.check_resume(experiment.make_config("smoke", hidden=(8, 8)),
                          workdir)
  stored = run_config.stored_config(workdir)
  assert stored["hidden"] == (8, 8)          # JSON lists back as tuples
  assert not run_config.START_MODE & set(stored)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(run_config.ConfigMismatchError, match="unreadable"):
    run_config.stored_config(workdir)
  _fake_checkpoint(workdir)      # a resume reads it too: the same one line
  with pytest.raises(run_config.ConfigMismatchError, match="unreadable"):
    run_config.check_resume(experiment.make_config("smoke"), workdir)
  # How a start runs is not part of the run: one machine evaluates what a
  # cluster trained.
  (tmp_path / "config.json").write_text(json.dumps(
      {"config": {"distribute": "multi_worker", "k_shot": 5}}))
  assert run_config.stored_config(workdir) == {"k_shot": 5}


def test_noresume_moves_the_old_run_aside_and_fixed_fields_stay(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  run_config.check_resume(_Config(inner_lr=0.1), workdir)
  _fake_checkpoint(workdir)
  lines = []
  # A fresh start over a run: the old one leaves before anything is written,
  # so a fresh start killed early is never resumed as the old run.
  run_config.check_resume(_Config(inner_lr=0.2, resume=False), workdir,
                          lines.append)
  moved = [p for p in os.listdir(tmp_path) if p.startswith("run.replaced-")]
  assert len(moved) == 1 and lines == [
      f"--noresume: the previous run in {workdir} was moved to "
      f"{tmp_path / moved[0]}"]
  assert not run_config.has_checkpoints(workdir)
  assert run_config.has_checkpoints(str(tmp_path / moved[0]))
  assert run_config.stored_config(workdir)["inner_lr"] == 0.2
  # iterations is safe to change, unless the schedule is laid out over it.
  _fake_checkpoint(workdir)
  run_config.check_resume(_Config(inner_lr=0.2, iterations=20), workdir,
                          lambda m: None)
  with pytest.raises(run_config.ConfigMismatchError,
                     match="iterations: 20 -> 30.*iterations shape this run"):
    run_config.check_resume(_Config(inner_lr=0.2, iterations=30), workdir,
                            fixed=("iterations",))
  # An evaluation writes nothing, even into an empty folder.
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  assert run_config.check_resume(_Config(eval_only=True), empty) == []
  assert not os.listdir(empty)


@dataclasses.dataclass
class _OtherLaunchersConfig:
  env: str = "navigation"
  iterations: int = 10
  resume: bool = True


def test_a_run_of_another_launcher_is_refused(tmp_path):
  """Its config shares a few field names (iterations): the config class
  recorded in config.json tells, or, in a file from before it was
  recorded, the fields shared."""
  workdir = str(tmp_path)
  run_config.check_resume(_OtherLaunchersConfig(), workdir)
  _fake_checkpoint(workdir)
  with pytest.raises(run_config.ConfigMismatchError,
                     match=r"another launcher \(_OtherLaunchersConfig, not "
                     r"_Config\); use a new --logdir"):
    run_config.check_resume(_Config(), workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    stored = json.load(f)
  del stored["kind"]
  with open(path, "w") as f:
    json.dump(stored, f)
  with pytest.raises(run_config.ConfigMismatchError, match="another launcher"):
    run_config.check_resume(_Config(), workdir)
  run_config.check_resume(_OtherLaunchersConfig(iterations=20), workdir,
                          lambda m: None)


def test_noresume_in_the_run_directory_itself(tmp_path, monkeypatch):
  """--logdir=. from inside the run: the old run goes to a sibling, and
  the working directory is the fresh, empty run directory."""
  workdir = tmp_path / "run"
  os.makedirs(workdir)
  monkeypatch.chdir(workdir)
  run_config.check_resume(_Config(), ".")
  _fake_checkpoint(".")
  run_config.check_resume(_Config(inner_lr=0.2, resume=False), ".",
                          lambda m: None)
  moved = [p for p in os.listdir(tmp_path) if p.startswith("run.replaced-")]
  assert len(moved) == 1
  assert run_config.has_checkpoints(str(tmp_path / moved[0]))
  assert sorted(os.listdir(".")) == ["config.json"]
  assert run_config.stored_config(".")["inner_lr"] == 0.2


def test_a_cosine_schedule_fixes_the_iteration_count():
  from maml_tf.training import config as config_lib  # pylint: disable=g-import-not-at-top
  assert config_lib.fixed_on_resume(experiment.make_config("smoke")) == ()
  for overrides in ({"meta_lr_schedule": "cosine"}, {"algorithm": "mamlpp"}):
    assert config_lib.fixed_on_resume(
        experiment.make_config("smoke", **overrides)) == ("iterations",
                                                          "pretrained")


def test_a_failed_start_removes_only_the_folder_it_created_empty(tmp_path):
  created, kept = tmp_path / "created", tmp_path / "kept"
  with pytest.raises(SystemExit):
    with run_config.removed_if_start_fails(str(created)):
      run_config.check_resume(_Config(), str(created))
      (created / "tensorboard").mkdir()
      raise SystemExit("error: no data")
  assert not created.exists()
  # A folder whose config.json another process wrote (a chief, while this
  # worker failed) stays.
  shared = tmp_path / "shared"
  with pytest.raises(SystemExit):
    with run_config.removed_if_start_fails(str(shared)):
      shared.mkdir()
      (shared / run_config.CONFIG_FILE).write_text("{}")
      raise SystemExit("error: no data")
  assert shared.exists()
  # A folder that existed before, or one a start wrote more into, stays.
  kept.mkdir()
  (kept / run_config.CONFIG_FILE).write_text("{}")
  with pytest.raises(KeyboardInterrupt):
    with run_config.removed_if_start_fails(str(kept)):
      raise KeyboardInterrupt
  assert kept.exists()
  logged = tmp_path / "logged"
  with pytest.raises(ValueError):
    with run_config.removed_if_start_fails(str(logged)):
      run_config.check_resume(_Config(), str(logged))
      (logged / "train_log.jsonl").write_text("{}\n")
      raise ValueError("NaN")
  assert (logged / "train_log.jsonl").exists()
  # A start that succeeds keeps its folder as it is.
  done = tmp_path / "done"
  with run_config.removed_if_start_fails(str(done)):
    run_config.check_resume(_Config(), str(done))
  assert done.exists()


@dataclasses.dataclass
class _PretrainedConfig(_Config):
  pretrained: bool = False


def test_a_shipped_evaluation_into_a_run_folder_is_refused_first(tmp_path):
  # Before, the refusal came after a line listing the config differences.
  workdir = str(tmp_path)
  run_config.check_resume(_PretrainedConfig(), workdir)
  _fake_checkpoint(workdir)
  lines = []
  with pytest.raises(run_config.RunDirectoryError,
                     match="holds a run's checkpoints"):
    run_config.check_resume(
        _PretrainedConfig(inner_lr=0.5, eval_only=True, pretrained=True),
        workdir, lines.append)
  assert lines == []
  # An empty folder takes the evaluation.
  assert run_config.check_resume(
      _PretrainedConfig(eval_only=True, pretrained=True),
      str(tmp_path / "fresh")) == []
