"""launch/rl.py stops cleanly on Ctrl-C (SIGINT) and SIGTERM: a checkpoint
of the last finished iteration, exit status 143, and the next start resumes
from it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def _run_until(logdir, after_line: str, sig) -> tuple:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "launch", "rl.py"),
       "--env=navigation", "--iterations=12", "--meta_batch=4",
       "--fast_batch_size=4", "--eval_tasks=2", "--num_workers=1",
       "--checkpoint_every=100", f"--logdir={logdir}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  lines, deadline = [], time.time() + 240
  try:
    for line in proc.stdout:
      lines.append(line)
      if after_line in line:
        proc.send_signal(sig)
        break
      if time.time() > deadline:
        break
    rest, _ = proc.communicate(timeout=240)
    lines.append(rest)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, "".join(lines)


@pytest.mark.slow
def test_rl_launcher_checkpoints_on_sigint_and_sigterm(tmp_path):
  logdir = str(tmp_path / "nav")
  code, out = _run_until(logdir, "maml 2/12", signal.SIGINT)
  assert code == 143, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  assert "stopped: saved a checkpoint at iteration" in out
  first = int(out.split("saved a checkpoint at iteration ")[1].split()[0])
  assert 2 <= first < 12
  with open(os.path.join(logdir, "train_history.json")) as f:
    assert [h["iteration"] for h in json.load(f)] == list(range(first))
  code, out = _run_until(logdir, f"maml {first + 2}/12", signal.SIGTERM)
  assert code == 143, out[-3000:]
  assert f"at iteration {first}" in out            # resumed where it stopped
  second = int(out.split("saved a checkpoint at iteration ")[1].split()[0])
  assert first + 2 <= second < 12
  with open(os.path.join(logdir, "train_history.json")) as f:
    assert [h["iteration"] for h in json.load(f)] == list(range(second))
