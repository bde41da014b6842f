"""Imported first by every launcher: a quiet console by default, and oneDNN.

TensorFlow's C++ start-up lines (absl's pre-init warning, the CPU feature
guard, XLA's info lines) are hidden unless ``--verbose`` is given; it must
happen before TensorFlow is imported, hence this module. Errors still show.
oneDNN's CPU kernels are asked for on every x86-64 CPU
(:func:`maml_tf.common.cpu.prefer_onednn`; ``TF_ENABLE_ONEDNN_OPTS=0`` keeps
them off).
"""

import os
import sys

from absl import flags

from maml_tf.common import cpu

cpu.prefer_onednn()

VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show TensorFlow's C++ log lines (hidden by default).")

if not any(arg in ("--verbose", "--verbose=true", "--verbose=True",
                   "--verbose=1") for arg in sys.argv[1:]):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # Some TensorFlow builds write their start-up lines (absl's pre-init
  # warning, oneDNN's notice) before they read TF_CPP_MIN_LOG_LEVEL: import
  # TensorFlow with the process's stderr held aside, and show what it wrote
  # only if the import fails.
  import tempfile  # pylint: disable=g-import-not-at-top

  sys.stderr.flush()
  _saved = os.dup(2)
  with tempfile.TemporaryFile() as _held:
    os.dup2(_held.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    except BaseException:
      os.dup2(_saved, 2)
      _held.seek(0)
      sys.stderr.write(_held.read().decode(errors="replace"))
      raise
    finally:
      os.dup2(_saved, 2)
      os.close(_saved)
