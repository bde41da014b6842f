"""Summary statistics for evaluation over many tasks."""

import math
from typing import Dict

import numpy as np


def mean_ci95(values) -> Dict[str, float]:
  """Mean, the half-width of its 95% normal confidence interval, and median.

  Example:
    >>> mean_ci95([1.0, 2.0, 3.0])["mean"]
    2.0
  """
  values = np.asarray(values, dtype=np.float64).ravel()
  if values.size == 0:
    raise ValueError("mean_ci95 needs at least one value")
  std = values.std(ddof=1) if values.size > 1 else 0.0
  return {"mean": float(values.mean()),
          "ci95": float(1.96 * std / math.sqrt(values.size)),
          "median": float(np.median(values)),
          "n": int(values.size)}


def paired_difference(a, b) -> Dict[str, float]:
  """:func:`mean_ci95` of ``a - b`` for two methods scored on the same tasks.

  Pairing removes the spread between tasks (some goals are simply farther
  away than others), which dominates the unpaired standard errors.

  Example:
    >>> paired_difference([-10.0, -20.0], [-12.0, -23.0])["mean"]
    2.5
  """
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired_difference needs values of the same tasks, got "
                     f"shapes {a.shape} and {b.shape}")
  return mean_ci95(a - b)
