"""A run directory remembers its config; resuming with another is refused.

:func:`check_resume` is called by every experiment (sinusoid,
classification, meta-RL) before it trains. The first start of a run writes
``config.json`` into the run directory. A later start that resumes (the
directory has checkpoints and ``resume`` is on) compares its config with the
stored one:

* a difference in a field that changes the experiment (step sizes,
  meta-batch, shots, seed, the derivative order, the task stream, ...) is
  refused with a ``ValueError`` that lists every differing field and says
  how to proceed (a new ``--logdir``, or ``--noresume`` to start afresh);
* a difference only in fields that are safe to change mid-run
  (:data:`SAFE_TO_CHANGE`: the iteration count, logging, checkpointing and
  evaluation settings, data locations) is allowed, logged and appended to
  ``config.json``'s ``"changes"``, which the results files carry. The
  iteration count is not safe where it shapes the training (``fixed``).

A start with ``resume`` off over a run's checkpoints moves that run aside
(``WORKDIR.replaced-TIME``) before it writes anything, so a fresh start
killed early can never be resumed as the old run. ``eval_only`` starts never
train: they only log the differences and write nothing. A run directory
from before this check (checkpoints, no ``config.json``) records the
current config and goes on.
"""

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from maml_tf.common.interrupts import UserFacingError
from maml_tf.common.results import write_json

CONFIG_FILE = "config.json"
SAFE_TO_CHANGE = frozenset({
    "iterations", "resume", "eval_only", "pretrained", "log_every",
    "checkpoint_every",
    "eval_every", "eval_tasks", "val_tasks", "eval_batch", "eval_shots",
    "eval_steps", "eval_query", "eval_batch_size", "eval_grad_steps",
    "plot", "export", "baseline", "baseline_iterations", "data_dir",
    "cache_dir", "omniglot_source", "adapted_check_tasks", "num_workers",
    "eval_inner_steps"})


# How a start runs, not what the run is: an eval_only start of a run that
# was continued from shipped weights (pretrained) evaluates its checkpoint,
# and one machine evaluates what a cluster trained.
START_MODE = frozenset({"resume", "eval_only", "pretrained", "distribute"})


class ConfigMismatchError(UserFacingError, ValueError):
  """Resuming a run directory with a config that changes the experiment."""


def _plain(value):
  return json.loads(json.dumps(value, default=str))


class RunDirectoryError(UserFacingError, ValueError):
  """A run directory holds what this start would overwrite."""


def check_not_a_run(workdir: str) -> None:
  """Refuses to write a shipped model's evaluation into a run's directory
  (its results, figures and export would replace the run's)."""
  if has_checkpoints(workdir):
    raise RunDirectoryError(
        f"pretrained=True evaluates shipped weights, but {workdir} holds a "
        "run's checkpoints, whose results it would replace; give another "
        "directory (--logdir)")


def has_checkpoints(workdir: str) -> bool:
  """Does ``workdir`` (or a folder below it) hold a TF checkpoint?"""
  return bool(glob.glob(os.path.join(workdir, "**", "checkpoint"),
                        recursive=True))


def stored_config(workdir: str) -> Optional[Dict]:
  """The config fields ``workdir``'s run was last started with (its
  ``config.json``; JSON lists back as tuples; without the fields of
  :data:`START_MODE`), or ``None`` when it has none.

  Launchers build an ``eval_only`` start's config from it, so a run is
  evaluated with its own settings, not the defaults.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  fields = _read(path)["config"]
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in fields.items() if k not in START_MODE}


def _read(path: str) -> Dict:
  """A ``config.json``: ``{"config": {...}, "changes": [...]}``."""
  try:
    with open(path) as f:
      stored = json.load(f)
    if not isinstance(stored.get("config"), dict):
      raise ValueError("no 'config' object")
  except (OSError, ValueError, AttributeError) as e:
    raise ConfigMismatchError(
        f"{path} is unreadable ({type(e).__name__}: {e}); it records the "
        "run's settings: restore it, or remove it and give every setting as "
        "a flag") from None
  return stored


def _check_kind(stored: Dict, kind: str, current: Dict, workdir: str):
  """Refuses a run of another launcher (``kind``: the config class; a
  ``config.json`` written before it was recorded sharing fewer than half
  of this config's fields)."""
  old = stored.get("kind")
  shared = set(stored["config"]) & set(current)
  if old == kind or (old is None and 2 * len(shared) >= len(current)):
    return
  raise ConfigMismatchError(
      f"{workdir} holds a run of another launcher "
      f"({old or 'other settings'}, not {kind}); use a new --logdir (or "
      "--noresume to move it aside)")


def _move_aside(workdir: str, log: Callable[[str], None]) -> str:
  """Renames the run in ``workdir`` to a sibling ``WORKDIR.replaced-TIME``
  and leaves ``workdir`` empty (its checkpoints, summaries and logs must not
  mix with a fresh start's)."""
  # (Absolute: ``--logdir=.`` gets a sibling, not a folder inside itself.)
  source = os.path.abspath(workdir)
  target = f"{source}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
  cwd = os.path.join(os.path.abspath(os.getcwd()), "")
  try:
    try:
      if cwd.startswith(os.path.join(source, "")):
        # The working directory is in it: a rename would take "." along.
        raise OSError("the working directory is inside it")
      os.rename(source, target)
    except OSError:   # a mount point, an unwritable parent: move its contents
      os.makedirs(target)
      for name in os.listdir(source):
        shutil.move(os.path.join(source, name), os.path.join(target, name))
    os.makedirs(source, exist_ok=True)
  except OSError as e:
    raise ConfigMismatchError(
        f"--noresume: {workdir} holds a run that could not be moved aside "
        f"({e}); remove it or choose another --logdir") from None
  log(f"--noresume: the previous run in {workdir} was moved to {target}")
  return target


def check_resume(config, workdir: str, log: Callable[[str], None] = print,
                 fixed: Sequence[str] = ()) -> List[Dict]:
  """Refuses to resume ``workdir`` with a config that changes the experiment.

  Arguments:
    config: the run's config dataclass (with ``resume``, optionally
      ``eval_only``).
    workdir: the run directory.
    log: where the allowed changes are reported.
    fixed: fields of :data:`SAFE_TO_CHANGE` that this config makes part of
      the experiment (``iterations`` under a cosine meta step size or
      MAML++'s annealing: :func:`maml_tf.core.family.uses_iterations`).

  Returns:
    the list of allowed changes so far (``[{"at": time, "fields": {name:
    [old, new]}}]``), for the results file.

  Raises:
    ConfigMismatchError: (a ``ValueError``) the stored config differs in a
      field outside :data:`SAFE_TO_CHANGE`; the message lists every such
      field.
    RunDirectoryError: an evaluation of shipped weights (``pretrained``
      with ``eval_only``) given a run's directory (:func:`check_not_a_run`).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  current = _plain(dataclasses.asdict(config))
  kind = type(config).__name__
  eval_only = getattr(config, "eval_only", False)
  if eval_only and getattr(config, "pretrained", False):
    check_not_a_run(workdir)     # before anything is said of the folder
  if eval_only:
    # An evaluation never defines a run: nothing is written, and a folder
    # without a run is left for the caller to report.
    if not (has_checkpoints(workdir) and os.path.exists(path)):
      return []
  elif not getattr(config, "resume", True) and has_checkpoints(workdir):
    _move_aside(workdir, log)   # a fresh start never mixes with the old run
  resuming = eval_only or (getattr(config, "resume", True)
                           and has_checkpoints(workdir))
  if not resuming or not os.path.exists(path):
    if not os.path.exists(path):
      _CREATED.add(os.path.abspath(path))
    write_json(path, {"kind": kind, "config": current, "changes": []})
    return []
  stored = _read(path)
  old = stored["config"]
  _check_kind(stored, kind, current, workdir)
  diff: Dict[str, Tuple] = {k: (old.get(k), v) for k, v in current.items()
                            if k in old and old[k] != v}
  unsafe = {k: d for k, d in diff.items()
            if k not in SAFE_TO_CHANGE or k in fixed}
  listing = lambda d: ", ".join(f"{k}: {a!r} -> {b!r}"
                                for k, (a, b) in sorted(d.items()))
  listed = listing(unsafe or diff)
  if getattr(config, "eval_only", False):
    # The mode of this start itself is no difference worth reporting.
    shown = {k: d for k, d in diff.items() if k not in START_MODE}
    if shown:
      log(f"eval_only with a config other than the run's: {listing(shown)}")
    return stored.get("changes", [])
  if unsafe:
    raise ConfigMismatchError(
        f"{workdir} holds a run with another configuration: {listed}. "
        "Resuming would mix two experiments. Use a new --logdir for the new "
        "configuration, or --noresume to start this one afresh (the safe "
        f"fields to change on resume are: "
        f"{', '.join(sorted((SAFE_TO_CHANGE - set(fixed)) & set(current)))}"
        + (f"; {', '.join(sorted(set(fixed) & set(unsafe)))} shape this "
           "run's training: its schedule is laid out over them"
           if set(fixed) & set(unsafe) else "") + ")")
  changes = stored.get("changes", [])
  if diff:
    log(f"resuming with changed settings: {listed}")
    changes.append({"at": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "fields": {k: list(d) for k, d in diff.items()}})
  write_json(path, {"kind": kind, "config": current, "changes": changes})
  return changes


# config.json files this process created (removed_if_start_fails removes
# no folder whose config another process wrote).
_CREATED = set()


def _only_config(workdir: str) -> bool:
  """Does ``workdir`` hold nothing but ``config.json`` and empty folders?"""
  for root, _, files in os.walk(workdir):
    if any(not (root == workdir and f == CONFIG_FILE) for f in files):
      return False
  return True


@contextlib.contextmanager
def removed_if_start_fails(workdir: str) -> Iterator[None]:
  """A start that fails before writing more than ``config.json`` (missing
  data, a bad flag found late, Ctrl-C while loading) removes the run
  directory it created, so that no empty run is left behind. A directory
  that existed before, one whose ``config.json`` another process wrote (a
  chief beside a failed worker), or one holding anything else (a
  checkpoint, a log) is kept."""
  existed = os.path.exists(workdir)
  try:
    yield
  except BaseException:
    config = os.path.abspath(os.path.join(workdir, CONFIG_FILE))
    if (not existed and config in _CREATED and os.path.isdir(workdir)
        and _only_config(workdir)):
      shutil.rmtree(workdir, ignore_errors=True)
    raise
