"""Stopping a long run cleanly: signals become checkpoints, not crashes.

:class:`StopRequest` turns SIGTERM (and optionally the first Ctrl-C) into a
flag that a training loop checks at its next consistent point;
:class:`Interrupted` is what the loop raises after it saved a checkpoint;
:func:`exit_if_interrupted` makes a launcher exit with status 143 and say
how to resume (and exit with status 1 and one line, no traceback, when a
file the run needs is missing or a :class:`UserFacingError` names what to
change).
"""

import signal
import sys
from typing import Callable


class UserFacingError(Exception):
  """A mixin for errors whose message names the cause and the remedy (data
  that cannot be found, a run directory holding another experiment):
  launchers print the message alone, without a traceback."""


class Interrupted(KeyboardInterrupt):
  """Raised by :func:`meta_train` on SIGTERM/SIGINT after it saved a checkpoint.

  A subclass of ``KeyboardInterrupt``, so that code which is not training
  (evaluation, plotting) is skipped; launchers turn it into exit status 143.
  """

  def __init__(self, step: int):
    super().__init__(f"interrupted at step {step}; checkpoint saved")
    self.step = step


def exit_if_interrupted(fn: Callable, *args, **kwargs):
  """Runs ``fn``; on :class:`Interrupted` prints how to resume and exits 143.

  For launchers: a stopped run must not look like a crash. Any other
  ``KeyboardInterrupt`` (a Ctrl-C during the final evaluation) exits with
  status 130 and one line. A ``FileNotFoundError`` (missing data,
  checkpoint or shipped weights; its message names the file and what to
  do), a ``FloatingPointError`` (a NaN stopped the run; its message names
  the value) or a :class:`UserFacingError` exits with status 1 and that
  message alone.
  """
  try:
    return fn(*args, **kwargs)
  except Interrupted as e:
    print(f"{e}; run the same command again to resume", flush=True)
    sys.exit(143)
  except KeyboardInterrupt:
    # A Ctrl-C outside a training loop's StopRequest (evaluation, plots).
    print("interrupted; any checkpoint already written is kept: run the "
          "same command again to go on", flush=True)
    sys.exit(130)
  except (FileNotFoundError, FloatingPointError, UserFacingError) as e:
    sys.exit(f"error: {e}")


class StopRequest:
  """Turns SIGTERM (and, with ``sigint=True``, the first Ctrl-C) into a
  request to stop at the next consistent point (checkpoint, then return).

  A second Ctrl-C interrupts at once (``KeyboardInterrupt``).
  """

  def __init__(self, sigint: bool = False):
    self.requested = False
    self._sigint = sigint
    self._previous = {}

  def __enter__(self):
    signals = [signal.SIGTERM] + ([signal.SIGINT] if self._sigint else [])
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not in the main thread
        pass
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    return False

