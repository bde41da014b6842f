"""Progress lines of long runs: durations as ``1h02m03s``."""


def format_duration(seconds: float) -> str:
  """``3723 -> "1h02m03s"``, ``83 -> "1m23s"``, ``5 -> "5s"`` (negatives: 0s)."""
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
