"""Experiment configs from named presets plus overrides (shared by launchers)."""

import dataclasses
from typing import Dict, Type, TypeVar

C = TypeVar("C")


def from_preset(config_class: Type[C], presets: Dict[str, Dict], preset: str,
                what: str, **overrides) -> C:
  """``config_class(**presets[preset] | overrides).validate()``.

  Overrides that are ``None`` keep the preset's value (launcher flags default
  to ``None``). Unknown presets and fields raise ``ValueError`` naming them.

  Example:
    >>> from_preset(SinusoidConfig, PRESETS, "demo", "sinusoid", seed=3)
  """
  if preset not in presets:
    raise ValueError(f"unknown {what} preset {preset!r}; choose one of "
                     f"{sorted(presets)}")
  values = dict(presets[preset])
  values.update({k: v for k, v in overrides.items() if v is not None})
  fields = {f.name for f in dataclasses.fields(config_class)}
  unknown = set(values) - fields
  if unknown:
    raise ValueError(f"unknown {what} config fields {sorted(unknown)}")
  return config_class(**values).validate()
