"""Progress lines of long runs: durations as ``1h02m03s``, speed with ETA."""


def format_duration(seconds: float) -> str:
  """``3723 -> "1h02m03s"``, ``83 -> "1m23s"``, ``5 -> "5s"`` (negatives: 0s)."""
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_speed(rate: float, elapsed: float, remaining: int) -> str:
  """``"12.3 it/s, elapsed 1m23s, left 4m05s"``.

  ``rate`` in iterations per second reads as ``it/s`` from 1 upwards and
  as seconds per iteration (``"34.2 s/it"``) below, where ``it/s`` would
  round to a digit or two; ``left`` is ``remaining`` iterations at
  ``rate``.
  """
  rate = max(rate, 1e-9)
  speed = f"{rate:.1f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it"
  return (f"{speed}, elapsed {format_duration(elapsed)}, "
          f"left {format_duration(remaining / rate)}")
