"""Imported first by every launcher: a quiet console by default.

TensorFlow's C++ start-up lines (absl's pre-init warning, the CPU feature
guard, XLA's info lines) are hidden unless ``--verbose`` is given; it must
happen before TensorFlow is imported, hence this module. Errors still show.
"""

import os
import sys

from absl import flags

VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show TensorFlow's C++ log lines (hidden by default).")

if not any(arg in ("--verbose", "--verbose=true", "--verbose=True",
                   "--verbose=1") for arg in sys.argv[1:]):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
