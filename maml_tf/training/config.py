"""Experiment configs from named presets plus overrides (shared by launchers)."""

import dataclasses
from typing import Dict, Type, TypeVar

from maml_tf.core import distribute
from maml_tf.core import family

C = TypeVar("C")


def check_learner_fields(config) -> None:
  """Validates the learner fields every experiment config shares.

  ``config.algorithm`` (a member of :data:`maml_tf.core.family.ALGORITHMS`),
  ``config.meta_lr_schedule`` (see
  :func:`maml_tf.core.family.resolve_meta_lr_schedule`) and
  ``config.distribute`` (:data:`maml_tf.core.distribute.STRATEGIES`);
  ``ValueError`` naming the field otherwise.
  """
  if config.algorithm not in family.ALGORITHMS:
    raise ValueError(f"algorithm must be one of {list(family.ALGORITHMS)}, "
                     f"got {config.algorithm!r}")
  family.resolve_meta_lr_schedule(config.meta_lr_schedule, config.algorithm)
  if config.distribute not in distribute.STRATEGIES:
    raise ValueError(f"distribute must be one of {list(distribute.STRATEGIES)}"
                     f", got {config.distribute!r}")


def fixed_on_resume(config) -> tuple:
  """The fields of :data:`maml_tf.common.run_config.SAFE_TO_CHANGE` that a
  resumed run of ``config`` must keep: ``iterations`` when the learner's
  training depends on it (:func:`maml_tf.core.family.uses_iterations`), and
  then ``pretrained`` too (a run continued from shipped weights lays its
  schedule over the iterations after theirs)."""
  if family.uses_iterations(config.algorithm, config.meta_lr_schedule):
    return ("iterations", "pretrained")
  return ()


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
