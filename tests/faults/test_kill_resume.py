"""kill -9 at a checkpoint boundary, then the same command again: every
launcher ends with exactly the weights of a run that was never killed."""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DATA = os.path.join(REPO, "..", "shared", "data", "omniglot")

LAUNCHERS = {
    # name: (arguments, checkpoint folder, the step at which it is killed)
    "sinusoid": (["sinusoid.py", "--preset=smoke", "--iterations=300",
                  "--eval_tasks=20"], "maml/checkpoints", 100),
    "classification": (["classification.py", "--preset=smoke",
                        "--iterations=40", "--images_per_class=6",
                        "--noplot", f"--data_dir={DATA}"], "checkpoints", 20),
    "rl": (["rl.py", "--env=navigation", "--iterations=6", "--meta_batch=4",
            "--fast_batch_size=4", "--eval_tasks=2", "--num_workers=1",
            "--checkpoint_every=2"], "ckpt", 2),
}


def _command(name, logdir):
  args, _, _ = LAUNCHERS[name]
  return ([sys.executable, os.path.join(REPO, "launch", args[0])] + args[1:]
          + [f"--logdir={logdir}"])


def _env():
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")


def _checkpoint_steps(folder):
  return sorted(int(p.rsplit("-", 1)[1].split(".")[0])
                for p in glob.glob(os.path.join(folder, "*.index")))


def _run(name, logdir):
  proc = subprocess.run(_command(name, logdir), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _kill_at_checkpoint(name, logdir):
  """Starts the launcher and SIGKILLs it once its first checkpoint exists."""
  _, folder, at = LAUNCHERS[name]
  folder = os.path.join(logdir, folder)
  proc = subprocess.Popen(_command(name, logdir), cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  try:
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(folder) and any(s >= at
                                       for s in _checkpoint_steps(folder)):
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.02)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL, "finished before the kill"
  return _checkpoint_steps(folder)[-1]


def _final_weights(logdir, name):
  latest = tf.train.latest_checkpoint(os.path.join(logdir,
                                                   LAUNCHERS[name][1]))
  reader = tf.train.load_checkpoint(latest)
  return {key: reader.get_tensor(key)
          for key in reader.get_variable_to_shape_map()
          if not key.startswith(("_CHECKPOINTABLE", "save_counter"))}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_a_killed_run_resumes_to_the_weights_of_an_unkilled_one(name,
                                                                tmp_path):
  if name == "classification" and not os.path.isdir(DATA):
    pytest.skip("no Omniglot data")
  clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
  _run(name, clean)
  at = _kill_at_checkpoint(name, killed)
  total = int(LAUNCHERS[name][0][[a.startswith("--iterations")
                                  for a in LAUNCHERS[name][0]].index(True)]
              .split("=")[1])
  assert 0 < at < total
  _run(name, killed)                    # the same command resumes
  want, got = _final_weights(clean, name), _final_weights(killed, name)
  assert set(want) == set(got)
  differing = [k for k in want if not np.array_equal(want[k], got[k])]
  print(f"{name}: killed at step {at} of {total}; {len(want)} tensors, "
        f"{len(differing)} differ")
  assert not differing, differing[:5]
