r"""Paired differences between meta-RL runs (a minus b, per gradient step).

Prints a markdown table: mean ± 95% interval over the test tasks of run a's
return minus run b's, bold where the interval excludes zero.

Example:
  python launch/rl_compare.py \
      --pairs=runs/rl/navigation/maml:runs/rl/navigation/pretrained
"""

from maml_tf.launch import quiet  # before TensorFlow is imported  # pylint: disable=unused-import,g-bad-import-order

import sys

from absl import flags

from maml_tf.common import interrupts  # pylint: disable=g-bad-import-order
from maml_tf.launch import config_flags  # pylint: disable=g-bad-import-order

from maml_tf.rl import compare

_PAIRS = flags.DEFINE_list("pairs", None, "Comma-separated RUN_A:RUN_B pairs "
                           "of run directories (or results.json files).")
flags.mark_flag_as_required("pairs")


def main(argv):
  config_flags.no_arguments(argv)
  pairs = []
  for item in _PAIRS.value:
    if item.count(":") != 1:
      raise SystemExit(f"error: --pairs entries are RUN_A:RUN_B; got {item!r}")
    pairs.append(tuple(item.split(":")))
  print(interrupts.exit_if_interrupted(compare.markdown_table, pairs))


def run():
  """The console script's entry point (and ``launch/*.py``'s)."""
  config_flags.run_launcher(sys.modules[__name__], __doc__, main)


if __name__ == "__main__":
  run()
