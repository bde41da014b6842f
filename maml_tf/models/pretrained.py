"""Shipped meta-initialisations: ``pretrained(name)`` returns a ready learner.

Each shipped setting is two files in ``maml_tf/models/weights/``:
``NAME.weights.h5`` (the meta-trained weights, Keras format) and
``NAME.json`` (the preset and overrides it was trained with, the exact
training command, its iterations, its test result, and the weights'
SHA-256). :func:`pretrained` rebuilds the learner of that configuration,
checks the checksum and loads the weights;
``launch/classification.py --preset=NAME --pretrained --eval_only`` (and
``launch/sinusoid.py --pretrained --eval_only``, ``launch/rl.py --env=NAME
--pretrained --eval_only``) evaluates it.
"""

import hashlib
import json
import os
import warnings
from typing import Dict, List, Optional

from maml_tf.common.interrupts import UserFacingError

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "weights")


def available(family: Optional[str] = None) -> List[str]:
  """The names of the shipped settings (of one ``family`` if given:
  ``classification``, ``sinusoid`` or ``rl``)."""
  if not os.path.isdir(WEIGHTS_DIR):
    return []
  names = sorted(f[:-len(".json")] for f in os.listdir(WEIGHTS_DIR)
                 if f.endswith(".json"))
  if family is None:
    return names
  return [n for n in names
          if card(n).get("family", "classification") == family]


def card(name: str) -> Dict:
  """The record of a shipped setting (see the module docstring)."""
  path = os.path.join(WEIGHTS_DIR, f"{name}.json")
  if not os.path.exists(path):
    raise ValueError(f"no shipped weights named {name!r}; shipped: "
                     f"{available() or 'none'}")
  with open(path) as f:
    return json.load(f)


def weights_path(name: str) -> str:
  """The checked path of ``name``'s weights file."""
  info = card(name)
  path = os.path.join(WEIGHTS_DIR, f"{name}.weights.h5")
  if not os.path.exists(path):
    raise FileNotFoundError(f"shipped weights {path} are missing (the "
                            "package is incomplete; reinstall it)")
  digest = _sha256(path)
  if digest != info["sha256"]:
    raise ValueError(f"shipped weights {path} are corrupt: SHA-256 {digest} "
                     f"!= {info['sha256']} in {name}.json")
  return path


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _family(name: str):
  """The training module of ``name``'s task family."""
  family = card(name).get("family", "classification")
  if family == "rl":   # needs the [rl] extra (gymnasium, MuJoCo)
    from maml_tf.rl import train as rl_train  # pylint: disable=g-import-not-at-top
    return rl_train
  from maml_tf.training import classification  # pylint: disable=g-import-not-at-top
  from maml_tf.training import sinusoid  # pylint: disable=g-import-not-at-top
  return {"classification": classification, "sinusoid": sinusoid}[family]


def config(name: str):
  """The config (``ClassificationConfig``, ``SinusoidConfig``, ``RLConfig``)
  ``name`` was trained with."""
  info = card(name)
  return _family(name).make_config(info["preset"], **info["overrides"])


def save(learner, name: str, info: Dict,
         directory: Optional[str] = None) -> str:
  """Writes ``learner``'s meta-initialisation as the setting ``name``.

  ``NAME.weights.h5`` and ``NAME.json`` (``info`` with the weights'
  SHA-256) in ``directory`` (default :data:`WEIGHTS_DIR`, the package's
  own). ``info`` needs ``preset``, ``overrides``, ``command``,
  ``iterations`` and ``test``; returns the weights' path.
  """
  missing = {"preset", "overrides", "command", "iterations", "test"} - set(
      info)
  if missing:
    raise ValueError(f"the card of {name!r} lacks {sorted(missing)}")
  directory = directory or WEIGHTS_DIR
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{name}.weights.h5")
  learner.model.save_weights(path)
  with open(os.path.join(directory, f"{name}.json"), "w") as f:
    json.dump({**info, "sha256": _sha256(path)}, f, indent=1)
    f.write("\n")
  return path


class ShippedWeightsMismatchError(UserFacingError, ValueError):
  """Shipped weights loaded into a network of another shape."""


def load_into(learner, name: str):
  """Loads ``name``'s weights into ``learner.model`` (returns ``learner``).

  Raises:
    ShippedWeightsMismatchError: (a ``ValueError``) ``learner``'s network
      is not the one the weights were trained in (a flag or field that
      changes the network overrides the card's settings).
  """
  path = weights_path(name)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      learner.model.load_weights(path)
    for w in caught:   # a load that worked keeps its warnings
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  except ValueError as e:   # its warnings say the same as the error
    raise ShippedWeightsMismatchError(
        f"the shipped weights {name!r} do not fit this network "
        f"({str(e).splitlines()[0][:200]}): they load into the network of "
        f"the settings they were trained with ({name}.json's overrides); "
        "leave out the settings that change the network") from None
  return learner


def pretrained(name: str):
  """A learner holding the shipped meta-initialisation ``name``.

  A :class:`maml_tf.MAML` for the classifiers and the sinusoid; a
  :class:`maml_tf.rl.MAMLTRPO` for the meta-RL policies (``navigation``,
  ``cheetah_dir``, ``ant_dir``: cards with ``"family": "rl"``, named by the
  environment's short name; they need the ``[rl]`` extra). Its inner step
  size and steps are the ones it was trained with.

  Example:
    >>> maml = pretrained("omniglot_5w1s")
    >>> adapted = maml.adapt(support_x, support_y)   # 28x28x1, 5 classes
    >>> pretrained("sinusoid").adapt(x, y)           # x, y: [K, 1]
    >>> learner = pretrained("navigation")           # MAMLTRPO
    >>> learner.adapt(learner.stacked_params(1), data)
  """
  family = _family(name)
  build = getattr(family, "build_learner", None) or family.build_maml
  return load_into(build(config(name)), name)
