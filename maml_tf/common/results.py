"""Results files a script can read."""

import json
import os
import tempfile
from typing import Any

import numpy as np


def _plain(obj):
  if isinstance(obj, dict):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _plain(obj.tolist())
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def write_json(path: str, data: Any) -> str:
  """Writes ``data`` as JSON atomically (a killed run never leaves half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(_plain(data), f, indent=2, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)
  return path
