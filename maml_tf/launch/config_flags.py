"""Every field of a config dataclass as a flag, generated from the dataclass.

``define(Config)`` defines ``--field`` for each field that no launcher flag
defines already, typed from the field's annotation (bool, int, float, str,
tuples of them as comma-separated lists; ``Optional`` allowed), with the
field's documentation (its ``Arguments:``/``Attributes:`` entry, or the
comment beside it) as the help text, and ``None`` as the default: an unset
flag keeps the preset's value. ``overrides(Config)`` returns the fields the
command line set. The library never reads flags; launchers pass these
values into the config.
"""

import dataclasses
import inspect
import re
import typing
from typing import Callable, Dict, List, Optional, Sequence

from absl import flags

from maml_tf.common import run_config

FLAGS = flags.FLAGS
_SCALARS = {bool: "bool", int: "integer", float: "float", str: "string"}


def field_docs(cls) -> Dict[str, str]:
  """``{field: its documentation}`` from the class docstring and comments."""
  docs = {}
  lines = (cls.__doc__ or "").splitlines()
  in_args, current = False, None
  for line in lines:
    stripped = line.strip()
    if stripped in ("Arguments:", "Attributes:", "Args:"):
      in_args = True
      continue
    if not in_args:
      continue
    match = re.match(r"^\s{2,6}([a-z_][a-z0-9_, ]*):\s*(.*)$", line)
    if match and all(n.strip().isidentifier()
                     for n in match.group(1).split(",")):
      current = [n.strip() for n in match.group(1).split(",")]
      for name in current:
        docs[name] = match.group(2)
    elif stripped and current and line.startswith(" " * 6):
      for name in current:
        docs[name] += " " + stripped
    elif not stripped:
      current = None
  try:
    source = inspect.getsource(cls)
  except (OSError, TypeError):
    source = ""
  for match in re.finditer(r"^\s+([a-z_][a-z0-9_]*)\s*:[^#\n]*#\s*(.+)$",
                           source, re.MULTILINE):
    docs.setdefault(match.group(1), match.group(2).strip())
  return docs


def _plain_text(doc: str) -> str:
  """A docstring fragment without reST markup (``x``, :mod:`y`)."""
  doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
  return doc.replace("``", "`")


def _kind(annotation):
  """``(flag kind, element type)`` of a field annotation, or ``None``."""
  origin = typing.get_origin(annotation)
  if origin is typing.Union:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) != 1:
      return None
    return _kind(args[0])
  if annotation in _SCALARS:
    return _SCALARS[annotation], annotation
  if origin in (tuple, list):
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    if args and all(a is args[0] for a in args) and args[0] in (int, float,
                                                                 str):
      return "list", args[0]
  return None


def define(cls, skip=()) -> List[str]:
  """Defines a flag for every field of ``cls`` that has none yet.

  Returns:
    The names of the flags it defined.
  """
  hints = typing.get_type_hints(cls)
  docs = field_docs(cls)
  made = []
  for field in dataclasses.fields(cls):
    name = field.name
    if name in skip or name in FLAGS:
      continue
    kind = _kind(hints[name])
    if kind is None:
      continue
    flag_kind, _ = kind
    default = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory
        is not dataclasses.MISSING else None)
    help_text = _plain_text(docs.get(name, name.replace("_", " ")))
    help_text = f"{help_text} (default: the preset's; plain default {default!r})"
    getattr(flags, f"DEFINE_{flag_kind}")(name, None, help_text)
    made.append(name)
  return made


def overrides(cls, names: Optional[List[str]] = None) -> Dict[str, object]:
  """The fields of ``cls`` set on the command line, typed as the fields.

  ``names``: only these fields (default every field that is a flag).
  """
  hints = typing.get_type_hints(cls)
  out = {}
  for field in dataclasses.fields(cls):
    name = field.name
    if (names is not None and name not in names) or name not in FLAGS:
      continue
    value = FLAGS[name].value
    if value is None:
      continue
    kind = _kind(hints[name])
    if kind and kind[0] == "list":
      try:
        value = tuple(kind[1](v) for v in value)
      except ValueError:
        raise ValueError(
            f"--{name}={','.join(value)}: expected a comma-separated list of "
            f"{kind[1].__name__}s") from None
    out[name] = value
  return out


def config_for(cls, logdir: str, given: Dict[str, object],
               make: Callable[[], object], unused: Sequence[str] = ()):
  """A launcher's config from the flags ``given`` on the command line.

  With ``eval_only`` (not ``pretrained``) on a run directory: the fields the
  run was trained with (its ``config.json``; fields ``cls`` no longer has
  are dropped), ``given`` on top, so ``--eval_only --logdir=RUN`` scores the
  run with its own settings (shots, step sizes, network), not a preset's or
  the defaults; the flags named in ``unused`` (given, but not settings of
  the run, such as ``--preset``) are reported as not used. Otherwise
  ``make()`` (a preset's or the defaults, ``given`` on top).
  """
  if given.get("eval_only") and not given.get("pretrained"):
    stored = run_config.stored_config(logdir)
    if stored is not None:
      for flag in unused:
        print(f"--eval_only evaluates the run in {logdir} with its own "
              f"settings; --{flag} is not used (flags given override single "
              "settings)", flush=True)
      names = {f.name for f in dataclasses.fields(cls)}
      config = cls(**{**{k: v for k, v in stored.items() if k in names},
                      **given})
      return config.validate() if hasattr(config, "validate") else config
  return make()


def no_arguments(argv: List[str]) -> None:
  """Ends a launcher with one line when the command line holds anything but
  flags (``argv[0]`` is the program)."""
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {argv[1:]}: the launchers "
                     "take flags only (--name=value; --help lists them)")


def config_or_exit(make: Callable, *args, **kwargs):
  """``make(*args, **kwargs)`` (a config from flags); a ``ValueError`` (a
  bad value, named by its message) ends the launcher with that one line and
  exit status 1, not with the whole flag help."""
  try:
    return make(*args, **kwargs)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None


def show_as_main(launcher, doc: str) -> None:
  """Makes a wrapper script (or console script) show ``launcher``'s help.

  ``--help`` prints ``doc`` and ``--helpshort`` the flags of ``launcher``
  and of this module, as if ``launcher`` were the script being run.
  """
  import sys  # pylint: disable=g-import-not-at-top
  main = sys.modules.get("__main__")
  if main is None or main is launcher:
    return
  main.__doc__ = doc
  for module in (launcher.__name__, __name__,
                 "maml_tf.launch.learner_flags"):
    for flag in FLAGS.get_key_flags_for_module(module):
      FLAGS.register_key_flag_for_module(sys.argv[0], flag)  # absl names
      # the main module by its path


def parse_flags(argv: List[str]) -> List[str]:
  """absl's flag parsing for :func:`run_launcher`, where asking for help
  succeeds: ``--help``, ``--helpshort``, ``--helpfull`` and ``--helpxml``
  print their text and exit with status 0 (absl's own parser exits 1). A bad
  flag exits 1 with absl's message."""
  import sys  # pylint: disable=g-import-not-at-top
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)
  except SystemExit as e:
    # Inside the parse, only the help flags exit with status 1 (having
    # printed what was asked for); errors raise flags.Error.
    if e.code == 1:
      sys.exit(0)
    raise


def run_launcher(launcher, doc: str, main: Callable[[List[str]], None]):
  """Runs ``main`` as the absl program ``launcher`` (a launcher module):
  its help shown as the script's (:func:`show_as_main`), flags parsed by
  :func:`parse_flags`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  show_as_main(launcher, doc)
  app.run(main, flags_parser=parse_flags)

