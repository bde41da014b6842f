"""oneDNN for the launchers and benchmarks (maml_tf.common.cpu)."""

import os
import platform
import subprocess
import sys

import pytest

from maml_tf.common import cpu

X86 = platform.machine().lower() in ("x86_64", "amd64")

_LAUNCHER = """
import os
from maml_tf.launch import quiet   # what every launcher imports first
from maml_tf.core import keras_compat
print(os.environ.get("TF_ENABLE_ONEDNN_OPTS"), keras_compat.onednn_enabled())
"""


def _launcher_process(**env):
  base = {k: v for k, v in os.environ.items() if k != cpu.ENV}
  out = subprocess.run([sys.executable, "-c", _LAUNCHER],
                       env=dict(base, **env), capture_output=True, text=True,
                       timeout=300, check=True)
  return out.stdout.split()


@pytest.mark.skipif(not X86, reason="oneDNN is asked for on x86-64 only")
def test_launchers_run_with_onednn_unless_the_user_says_otherwise():
  # TensorFlow leaves oneDNN off on plain AVX2 CPUs unless asked, so the
  # same launcher ran other kernels (slower, no grouped gradient) there.
  assert _launcher_process() == ["1", "True"]
  assert _launcher_process(TF_ENABLE_ONEDNN_OPTS="0") == ["0", "False"]


def test_prefer_onednn_leaves_a_started_tensorflow_and_a_users_value(
    monkeypatch):
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  monkeypatch.delenv(cpu.ENV, raising=False)
  assert not cpu.prefer_onednn()          # TensorFlow has decided already
  assert cpu.ENV not in os.environ
  monkeypatch.setenv(cpu.ENV, "0")
  assert not cpu.prefer_onednn()
  assert os.environ[cpu.ENV] == "0"
