"""Paired differences between meta-RL runs (a minus b, per gradient step).

Prints a markdown table: mean ± 95% interval over the test tasks of run a's
return minus run b's, bold where the interval excludes zero.

Example:
  python launch/rl_compare.py \
      --pairs=runs/rl/navigation/maml:runs/rl/navigation/pretrained
"""

import quiet  # launch/quiet.py: before TensorFlow is imported  # pylint: disable=unused-import,g-bad-import-order

from absl import app
from absl import flags

from maml_tf.rl import compare

_PAIRS = flags.DEFINE_list("pairs", None, "Comma-separated RUN_A:RUN_B pairs "
                           "of run directories (or results.json files).")
flags.mark_flag_as_required("pairs")


def main(argv):
  del argv
  pairs = []
  for item in _PAIRS.value:
    if item.count(":") != 1:
      raise app.UsageError(f"--pairs entries are RUN_A:RUN_B; got {item!r}")
    pairs.append(tuple(item.split(":")))
  print(compare.markdown_table(pairs))


if __name__ == "__main__":
  app.run(main)
