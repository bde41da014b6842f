"""Shipped meta-initialisations: checked, loaded, evaluated by the launcher."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from maml_tf.models import pretrained

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DATA = os.path.join(REPO, "..", "shared", "data", "omniglot")


def test_every_shipped_setting_has_a_card_and_intact_weights():
  assert "omniglot_5w1s" in pretrained.available()
  for name in pretrained.available():
    card = pretrained.card(name)
    assert {"preset", "overrides", "sha256", "command", "iterations",
            "test"} <= set(card)
    assert os.path.exists(pretrained.weights_path(name))


def test_corrupt_or_unknown_weights_are_refused(tmp_path, monkeypatch):
  for f in ("omniglot_5w1s.json", "omniglot_5w1s.weights.h5"):
    shutil.copy(os.path.join(pretrained.WEIGHTS_DIR, f), tmp_path / f)
  with open(tmp_path / "omniglot_5w1s.weights.h5", "r+b") as f:
    f.seek(-8, 2)
    f.write(b"corrupt!")
  monkeypatch.setattr(pretrained, "WEIGHTS_DIR", str(tmp_path))
  with pytest.raises(ValueError, match="corrupt"):
    pretrained.weights_path("omniglot_5w1s")
  with pytest.raises(ValueError, match="no shipped weights named 'nope'"):
    pretrained.pretrained("nope")


@pytest.mark.skipif(not os.path.isdir(DATA), reason="no Omniglot data")
def test_launcher_evaluates_the_shipped_5w1s_weights(tmp_path):
  card = pretrained.card("omniglot_5w1s")
  out = tmp_path / "run"
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "classification.py"),
       "--preset=omniglot_5w1s", "--pretrained", "--eval_only",
       "--eval_tasks=40", f"--logdir={out}",
       f"--data_dir={DATA}"], check=True, cwd=REPO, capture_output=True,
      text=True)
  with open(out / "results.json") as f:
    results = json.load(f)
  accuracy = results["test"]["accuracy"]["mean"][-1]
  # 40 tasks: within a few points of the card's 600-task figure.
  assert accuracy > card["test"]["accuracy"] - 0.04, accuracy
  assert results["iterations"] == card["iterations"]
  # No training in this logdir: a test figure, no training curve, no warning.
  assert (out / "accuracy_vs_steps.png").exists()
  assert not (out / "training_curve.png").exists()
  assert "Warning" not in run.stderr, run.stderr


@pytest.mark.skipif(not os.path.isdir(DATA), reason="no Omniglot data")
def test_meta_training_continues_from_the_shipped_5w1s_weights(
    tmp_path, monkeypatch):
  from maml_tf.training import classification  # pylint: disable=g-import-not-at-top
  card = pretrained.card("omniglot_5w1s")
  start = card["iterations"]
  config = classification.make_config(
      "omniglot_5w1s", pretrained=True, iterations=start + 2, meta_batch=2,
      train_query=1, data_dir=DATA, eval_tasks=10, eval_every=0,
      adapted_check_tasks=0, plot=False, meta_lr_schedule="cosine")
  built = []
  build = classification.build_learner
  monkeypatch.setattr(classification, "build_learner", lambda *a: built.append(
      build(*a)) or built[-1])
  results = classification.train_and_evaluate(config, str(tmp_path / "run"),
                                              log=lambda m: 0)
  assert results["iterations"] == start + 2
  # The fresh optimizer's cosine schedule spans the 2 new meta-updates.
  optimizer = built[0].meta_optimizer
  assert int(optimizer.iterations) == 2
  assert float(optimizer.learning_rate) == pytest.approx(1e-5)
  # Two meta-steps from the shipped weights, not from a random init.
  assert results["test"]["accuracy"]["mean"][-1] > 0.9
  with pytest.raises(ValueError, match="needs resume=True"):
    classification.make_config("omniglot_5w1s", pretrained=True,
                               resume=False).validate()


def test_sinusoid_weights_adapt_and_the_launcher_evaluates_them(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from maml_tf.tasks import sinusoid  # pylint: disable=g-import-not-at-top
  card = pretrained.card("sinusoid")
  maml = pretrained.pretrained("sinusoid")
  assert maml.inner_lr == card["overrides"].get("inner_lr", 0.01)
  batch = sinusoid.sample_batch(100, 10, 100, np.random.default_rng(5))[0]
  before, after = maml.evaluate(batch, steps=(0, 1))["loss"]
  assert after < 0.5 * before, (before, after)     # one step adapts
  out = tmp_path / "sin"
  subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "sinusoid.py"),
       "--pretrained", "--eval_only", "--eval_tasks=100", "--noplot",
       f"--logdir={out}"], check=True, cwd=REPO, capture_output=True)
  with open(out / "results.json") as f:
    results = json.load(f)
  got = results["maml"]["K=10"]["steps=1"]["mean"]
  want = card["test"]["K=10"]["steps=1"]["mean"]
  assert abs(got - want) < 0.25 * want, (got, want)
  assert "pretrained" not in results                  # no baseline to load


def test_a_saved_setting_loads_back_checked(tmp_path, monkeypatch):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from maml_tf.training import sinusoid  # pylint: disable=g-import-not-at-top
  config = sinusoid.make_config("smoke")
  maml = sinusoid.build_maml(config)
  info = {"family": "sinusoid", "preset": "smoke", "overrides": {},
          "command": "test", "iterations": 0, "test": {}}
  with pytest.raises(ValueError, match="lacks \\['test'\\]"):
    pretrained.save(maml, "mine", {k: v for k, v in info.items()
                                   if k != "test"}, str(tmp_path))
  pretrained.save(maml, "mine", info, str(tmp_path))
  monkeypatch.setattr(pretrained, "WEIGHTS_DIR", str(tmp_path))
  assert pretrained.available() == ["mine"]
  loaded = pretrained.pretrained("mine")
  for a, b in zip(maml.model.weights, loaded.model.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_families_and_the_shipped_rl_config():
  assert "navigation" in pretrained.available("rl")
  assert "omniglot_5w1s" in pretrained.available("classification")
  assert not set(pretrained.available("rl")) & set(
      pretrained.available("classification"))
  pytest.importorskip("gymnasium")
  from maml_tf.rl import train as rl_train  # pylint: disable=g-import-not-at-top
  card = pretrained.card("navigation")
  config = rl_train.shipped_config("navigation")
  assert config.fast_lr == card["overrides"]["fast_lr"] == 0.5
  assert config.eval_batch_size == card["test"]["episodes_per_step"] == 40
  assert config.pretrained and config.eval_only
  # What a user sets wins over the card.
  assert rl_train.shipped_config("navigation",
                                 eval_batch_size=20).eval_batch_size == 20
  with pytest.raises(ValueError, match="no meta-policy is shipped for "
                     "env='ant_vel'"):
    rl_train.shipped_config("ant_vel")


def test_navigation_policy_adapts_and_the_launcher_evaluates_it(tmp_path):
  pytest.importorskip("gymnasium")
  card = pretrained.card("navigation")
  learner = pretrained.pretrained("navigation")
  assert learner.fast_lr == card["overrides"]["fast_lr"]
  out = tmp_path / "nav"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "rl.py"), "--env=navigation",
       "--pretrained", "--eval_only", f"--logdir={out}"],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "results.json") as f:
    results = json.load(f)
  assert results["iterations"] == card["iterations"]
  assert results["config"]["eval_batch_size"] == card["test"]["episodes_per_step"]
  got, want = results["eval"]["returns"], card["test"]["returns"]
  # The same 40 test tasks and noise as the card: the same figures, up to
  # floating-point differences between machines.
  assert abs(got[1] - want[1]) < 1.0, (got, want)
  assert got[1] > got[0] + 20, got                   # one step adapts


@pytest.mark.parametrize("name", ["cheetah_dir", "ant_dir"])
def test_direction_policies_adapt(name):
  pytest.importorskip("mujoco")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from maml_tf.rl import train as rl_train  # pylint: disable=g-import-not-at-top
  from maml_tf.rl.sampler import make_sampler  # pylint: disable=g-import-not-at-top
  learner = pretrained.pretrained(name)
  config = pretrained.config(name)
  sampler = make_sampler(config.env, num_workers=0)
  try:
    tasks = [{"direction": 1.0}, {"direction": -1.0}]
    ev = rl_train.evaluate_adaptation(learner, sampler, tasks,
                                      config.fast_batch_size, [config.fast_lr],
                                      np.random.default_rng(0))
  finally:
    sampler.close()
  before, after = ev["returns"]
  # Both directions: one REINFORCE step turns the policy.
  assert after > before + 50, ev["per_task"]
  assert min(ev["per_task"][1]) > max(ev["per_task"][0]), ev["per_task"]
