"""TensorFlow's CPU kernels: oneDNN for the programs this project ships.

TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, when it is imported. Unset,
it turns oneDNN on only for x86-64 CPUs with AVX512_VNNI, AVX512_BF16,
AVX_VNNI or AMX, so a plain AVX2 CPU runs the Eigen kernels: slower
convolutions and their gradients, and no gradient for grouped convolutions
(``conv_impl='grouped'``). :func:`prefer_onednn` is called by the launchers
and the benchmarks before they import TensorFlow, so that every x86-64
machine runs the same kernels; a value the user set is kept. The library
itself never sets it: a program that imports ``maml_tf`` gets TensorFlow's
choice, or its own.
"""

import os
import platform
import sys

ENV = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn() -> bool:
  """Sets ``TF_ENABLE_ONEDNN_OPTS=1`` unless the environment sets it.

  Returns whether TensorFlow will read the value: ``False`` when TensorFlow
  was already imported (it has decided), the user set the variable, or the
  CPU is not x86-64 (left to TensorFlow).
  """
  if ENV in os.environ or "tensorflow" in sys.modules:
    return False
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  os.environ[ENV] = "1"
  return True
