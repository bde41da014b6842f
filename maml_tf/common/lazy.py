"""Submodules as attributes, imported on first use.

A package whose ``__init__`` sets ``__getattr__ = lazy.submodules(__name__)``
lets ``maml_tf.tasks.sinusoid.dataset(...)`` work after a bare
``import maml_tf``, without importing (and starting TensorFlow for) every
submodule up front.
"""

import importlib
from typing import Callable


def submodules(package: str) -> Callable[[str], object]:
  """A module-level ``__getattr__`` for ``package``: ``name`` is its
  submodule ``package.name`` (``AttributeError`` if there is none)."""

  def __getattr__(name: str):
    if name.startswith("__"):
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    try:
      return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{package}.{name}":
        raise                    # a dependency of that submodule is missing
      raise AttributeError(
          f"module {package!r} has no attribute {name!r}") from None
  return __getattr__
