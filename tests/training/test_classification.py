"""The few-shot classification experiment end to end.

Omniglot tests use the real zips ($MAML_TF_OMNIGLOT_DIR or
../shared/data/omniglot) and are skipped, saying why, without them; the
MiniImagenet test writes a tiny data set of JPEGs in Ravi & Larochelle's CSV
layout.
"""

import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from maml_tf.tasks import omniglot
from maml_tf.training import classification as experiment

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "classification.py"
DEFAULT_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


@pytest.fixture(scope="module")
def omniglot_dir():
  for candidate in (os.environ.get(omniglot.ENV_VAR), DEFAULT_OMNIGLOT):
    if candidate and all(os.path.isfile(os.path.join(candidate, f))
                         for f in omniglot.ZIP_FILES):
      return str(candidate)
  pytest.skip(f"real Omniglot zips {omniglot.ZIP_FILES} not found: set "
              f"{omniglot.ENV_VAR} or put them in {DEFAULT_OMNIGLOT}")


# ------------------------------------------------------------------ config
def test_presets_are_the_papers_settings():
  for name in experiment.PRESETS:
    experiment.make_config(name)   # every preset validates
  c = experiment.make_config("omniglot_5w1s")
  assert (c.way, c.shot, c.inner_lr, c.inner_steps, c.eval_inner_steps,
          c.meta_batch, c.iterations, c.network) == (5, 1, 0.4, 1, 3, 32,
                                                     60000, "conv")
  c = experiment.make_config("omniglot_20w5s")
  assert (c.way, c.shot, c.inner_lr, c.inner_steps, c.meta_batch) == (
      20, 5, 0.1, 5, 16)
  c = experiment.make_config("miniimagenet_5w5s")
  assert (c.dataset, c.inner_lr, c.inner_steps, c.eval_inner_steps,
          c.meta_batch, c.query) == ("miniimagenet", 0.01, 5, 10, 2, 15)
  assert experiment.make_config("miniimagenet_5w1s").meta_batch == 4
  assert experiment.make_config("omniglot_mlp_5w5s").network == "mlp"
  # Flags override the preset; None keeps it.
  c = experiment.make_config("omniglot_5w1s", way=20, shot=None)
  assert (c.way, c.shot) == (20, 1)


@pytest.mark.parametrize("overrides,match", [
    ({"way": 0}, "way must be an integer >= 2"),
    ({"way": 1}, "way must be an integer >= 2"),
    ({"shot": 6}, r"shot \+ query = 6 \+ 15 exceeds the 20 drawings"),
    ({"dataset": "cifar"}, "dataset must be one of"),
    ({"network": "resnet"}, "network must be one of"),
    ({"dataset": "miniimagenet", "network": "mlp"}, "network='mlp'"),
    ({"inner_lr": float("nan")}, "inner_lr must be a finite number"),
    ({"eval_inner_steps": 0}, "eval_inner_steps must be an integer >= 1"),
    ({"image_size": 8}, "image_size must be an integer >= 16"),
    ({"bogus": 1}, r"unknown classification config fields \['bogus'\]"),
])
def test_config_names_the_bad_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    experiment.make_config("omniglot_5w1s", **overrides)
  with pytest.raises(ValueError, match="unknown classification preset 'nope'"):
    experiment.make_config("nope")


def test_episode_stream_is_pure_in_the_iteration():
  classes = np.random.default_rng(0).integers(
      0, 255, (12, 6, 4, 4, 1)).astype(np.uint8)
  stream = experiment.EpisodeStream(classes, 3, 1, 2, meta_batch=2, seed=5)
  sequential = [stream(i) for i in range(4)]
  resumed = experiment.EpisodeStream(classes, 3, 1, 2, meta_batch=2, seed=5)
  for i in (2, 3, 1):           # starts mid-way, continues, jumps back
    for a, b in zip(sequential[i], resumed(i)):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not np.array_equal(sequential[0].support_x, sequential[1].support_x)


# ----------------------------------------------------------------- omniglot
def _timed(lines):
  """A log function that keeps the lines and prints them timed (pytest -s)."""
  start = time.perf_counter()

  def log(line):
    lines.append(line)
    print(f"[{time.perf_counter() - start:5.1f}] {line}")
  return log


def test_omniglot_training_resumes_and_learns_well_above_chance(
    omniglot_dir, tmp_path):
  # The vectorised MLP, 5-way 1-shot, 8 tasks per meta-batch, 300 iterations
  # with a larger meta step size than the paper's (reaches ~0.6 in ~20 s).
  config = experiment.make_config(
      "omniglot_mlp_5w1s", data_dir=omniglot_dir, meta_batch=8, meta_lr=3e-3,
      iterations=150, eval_every=100, val_tasks=25, eval_tasks=25,
      eval_batch=25, log_every=50, checkpoint_every=50, plot=False,
      export=False, adapted_check_tasks=0)
  first = []
  experiment.train_and_evaluate(config, str(tmp_path), log=_timed(first))
  assert "meta-training iterations 0 -> 150" in first
  # Resume to 300: a new process would do the same (see the launcher).
  config.iterations, config.eval_tasks = 300, 200
  config.plot, config.export, config.adapted_check_tasks = True, True, 3
  lines = []
  out = experiment.train_and_evaluate(config, str(tmp_path), log=_timed(lines))
  assert any(l.startswith("resumed from") for l in lines), lines
  assert "meta-training iterations 150 -> 300" in lines

  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["test"] == json.loads(json.dumps(out["test"]))
  assert saved["iterations"] == 300 and saved["config"]["iterations"] == 300
  assert saved["seconds_per_iteration"] > 0
  assert saved["data"]["test"] == [1692, 20, 28, 28, 1]
  test = saved["test"]
  assert test["steps"] == [0, 1, 2, 3] and test["tasks"] == 200
  acc = test["accuracy"]
  assert len(acc["mean"]) == len(acc["ci95"]) == 4
  assert acc["by_step"]["steps=3"]["n"] == 200
  # Pre-update: chance (labels are permuted per task); adapted: well above.
  assert abs(acc["mean"][0] - 0.2) < 0.05
  assert acc["mean"][-1] >= 0.5, acc
  assert acc["mean"][-1] > acc["mean"][0] + 0.25
  assert 0 < acc["ci95"][-1] < 0.05
  assert saved["final_val"]["step"] == 300
  assert saved["final_val"]["val_accuracy"] > 0.4
  # Adapted model in inference mode, and its SavedModel.
  adapted = saved["adapted_inference"]
  assert adapted["tasks"] == 3 and adapted["steps"] == 3
  assert 0 <= adapted["inference_mode_accuracy"]["mean"] <= 1
  export = adapted["export"]
  assert export["savedmodel_query_accuracy"] == export["keras_query_accuracy"]
  task = np.load(export["task_file"])
  loaded = tf.saved_model.load(export["path"])   # keep it referenced
  logits = loaded.serve(task["query_x"])
  assert logits.shape == (75, 5)
  for name in ("accuracy_vs_steps.png", "training_curve.png"):
    assert (tmp_path / name).stat().st_size > 10_000
  records = [json.loads(l) for l in
             (tmp_path / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["kind"] == "eval"] == [100, 150,
                                                                 200, 300]


# ------------------------------------------------------------- miniimagenet
def _tiny_miniimagenet(root: pathlib.Path, classes=None, per_class=6):
  """CSV layout; every class a noisy colour, 36x36 JPEGs (resized to 32)."""
  classes = classes or {"train": 4, "val": 3, "test": 3}
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  for split, n_classes in classes.items():
    with open(root / f"{split}.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["filename", "label"])
      for c in range(n_classes):
        wnid = f"n{split[:2]}{c:06d}"
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
          pixels = np.clip(colour + rng.normal(0, 30, (36, 36, 3)), 0, 255)
          name = f"{wnid}{i:08d}.jpg"
          Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / name)
          w.writerow([name, wnid])
  return root


def test_miniimagenet_end_to_end_on_generated_images(tmp_path):
  root = _tiny_miniimagenet(tmp_path / "mini")
  config = experiment.make_config(
      "miniimagenet_5w1s", data_dir=str(root), way=3, query=2, train_query=2,
      image_size=32, meta_batch=2, iterations=4, inner_steps=1,
      eval_inner_steps=1, eval_tasks=4, val_tasks=2, eval_batch=2,
      eval_every=2, log_every=2, checkpoint_every=2, adapted_check_tasks=2)
  work = tmp_path / "run"
  out = experiment.train_and_evaluate(config, str(work), log=lambda s: None)
  saved = json.loads((work / "results.json").read_text())
  assert saved["data"]["train"] == [4, 6, 32, 32, 3]
  assert saved["iterations"] == 4
  assert saved["test"]["steps"] == [0, 1]
  assert all(0 <= a <= 1 for a in saved["test"]["accuracy"]["mean"])
  assert out["adapted_inference"]["tasks"] == 2
  task = np.load(work / "adapted_task.npz")
  assert task["support_x"].shape == (3, 32, 32, 3)
  loaded = tf.saved_model.load(str(work / "adapted_savedmodel"))
  logits = loaded.serve(task["query_x"])
  assert logits.shape == (6, 3)
  assert (work / "accuracy_vs_steps.png").exists()
  assert (work / "training_curve.png").exists()
  # eval_only re-evaluates the checkpoint without training.
  config.eval_only, config.export, config.plot = True, False, False
  lines = []
  again = experiment.train_and_evaluate(config, str(work), log=lines.append)
  # It keeps how the run trained (the rewritten results file too).
  assert again["iterations"] == 4
  assert again["seconds_per_iteration"] == out["seconds_per_iteration"] > 0
  assert not any("meta-training" in l for l in lines)
  # The launcher's --eval_only needs no flag repeated: the run's own
  # settings (3-way, 32x32, the data folder), not the default preset's.
  out = subprocess.run(
      [sys.executable, str(LAUNCHER), "--eval_only", "--noexport", "--noplot",
       f"--logdir={work}"], capture_output=True, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert out.returncode == 0, out.stderr[-2000:]
  saved = json.loads((work / "results.json").read_text())
  assert (saved["config"]["way"], saved["config"]["image_size"],
          saved["iterations"]) == (3, 32, 4)
  # Data that do not fit the config are named.
  with pytest.raises(ValueError, match="way=4 but the miniimagenet val split "
                     "has only 3 classes") as err:
    experiment.load_splits(experiment.make_config(
        "miniimagenet_5w1s", data_dir=str(root), way=4, query=2,
        train_query=2, image_size=32))
  from maml_tf.common import interrupts  # pylint: disable=g-import-not-at-top
  assert isinstance(err.value, interrupts.UserFacingError)   # one line
  # Diverged weights stop the run at the validation that sees them, before
  # any results or export.
  diverging = dataclasses.replace(config, eval_only=False, inner_lr=1e12,
                                  meta_lr=10.0, iterations=4)
  with pytest.raises(FloatingPointError,
                     match="validation loss at iteration 2 is not finite"):
    experiment.train_and_evaluate(diverging, str(tmp_path / "nan"),
                                  log=lambda s: None)
  assert not (tmp_path / "nan" / "results.json").exists()
  with pytest.raises(FileNotFoundError, match="eval_only: no checkpoint"):
    experiment.train_and_evaluate(config, str(tmp_path / "empty"),
                                  log=lambda s: None)


# ----------------------------------------------------------------- launcher
def test_launcher_rejects_bad_flags_with_a_message(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  cases = [(["--preset=bogus"], "preset"),
           (["--way=1"], "way must be an integer >= 2, got 1")]
  procs = [(subprocess.Popen(
      [sys.executable, str(LAUNCHER), *args, f"--logdir={tmp_path}"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
            match) for args, match in cases]
  for proc, match in procs:
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert match in output, output[-2000:]
