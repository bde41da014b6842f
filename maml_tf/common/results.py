"""Results files a script can read."""

import json
import math
import os
import tempfile
from typing import Any

import numpy as np

from maml_tf.common.interrupts import UserFacingError


class OutputNotWritableError(UserFacingError, PermissionError):
  """The run directory or one of its outputs cannot be written."""


def _read_umask() -> int:
  try:   # Linux: read it without setting it
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0)
  os.umask(mask)
  return mask


_UMASK = _read_umask()   # once, at import


def _plain(obj):
  if isinstance(obj, dict):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _plain(obj.tolist())
  if isinstance(obj, np.generic):
    return _plain(obj.item())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None   # JSON has no NaN / Infinity: a reader sees null
  return obj


def environment() -> dict:
  """What produced a result: versions, the git commit, the machine.

  The commit is that of the checkout maml_tf was imported from (``None``
  outside a git checkout).
  """
  import platform  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import maml_tf  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(maml_tf.__file__)))
  try:
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
        text=True, timeout=10, check=True).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {"maml_tf": maml_tf.__version__, "tensorflow": tf.__version__,
          "keras": keras.__version__, "numpy": np.__version__,
          "python": sys.version.split()[0], "commit": commit,
          "machine": platform.machine(), "processor": platform.processor(),
          "cpus": os.cpu_count()}


def write_json(path: str, data: Any) -> str:
  """Writes ``data`` as JSON atomically (a killed run never leaves half a file).

  Non-finite floats (NaN, infinities) are written as ``null``, so every
  JSON reader can read the file; its permissions are those of any new file
  (the umask), as for the figures beside it.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(_plain(data), f, indent=2, sort_keys=False, allow_nan=False)
      f.write("\n")
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


TRAINING_KEYS = ("train_seconds", "timing", "seconds_per_iteration")


def previous_training(path: str) -> dict:
  """The training figures (:data:`TRAINING_KEYS`) of the results file at
  ``path``, or ``{}``: an evaluation-only start that rewrites a run's
  results file keeps how long the run trained and how fast."""
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return {}
  return {k: old[k] for k in TRAINING_KEYS if k in old} if isinstance(
      old, dict) else {}


def check_writable(workdir: str, names=(), folders=()) -> None:
  """Fails early when the run's outputs could not be written at the end.

  Creates ``workdir`` and a scratch file in it and in every existing
  output folder ``workdir/folder`` (checkpoints, summaries, exports), and
  opens every existing output ``workdir/name`` for appending (nothing is
  written to it).

  Raises:
    OutputNotWritableError: (a ``PermissionError``) naming the folder or
      output that cannot be written.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=workdir, suffix=".probe")
    os.close(fd)
    os.remove(tmp)
  except OSError as e:
    raise OutputNotWritableError(f"cannot write to the output folder {workdir} "
                          f"({e}); choose another --logdir") from e
  for folder in folders:
    path = os.path.join(workdir, folder)
    if not os.path.isdir(path):
      continue
    try:
      fd, tmp = tempfile.mkstemp(dir=path, suffix=".probe")
      os.close(fd)
      os.remove(tmp)
    except OSError as e:
      raise OutputNotWritableError(
          f"the output folder {path} cannot be written ({type(e).__name__}: "
          f"{e}); make it writable or choose another --logdir") from e
  for name in names:
    path = os.path.join(workdir, name)
    if not os.path.lexists(path):
      continue
    try:
      with open(path, "ab"):
        pass
    except OSError as e:
      raise OutputNotWritableError(
          f"the output {path} cannot be written ({type(e).__name__}: {e}); "
          "remove it or choose another --logdir") from e


def try_figure(make, log, *args, **kwargs):
  """``make(*args, **kwargs)`` (a figure's path), or ``None`` with a logged
  reason: a figure that cannot be drawn or written never stops the results
  and checkpoints from being written."""
  try:
    return make(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    log(f"could not write a figure ({type(e).__name__}: {e}); the results "
        "are written without it")
    return None
