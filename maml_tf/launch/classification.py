r"""Few-shot classification with MAML (Finn et al. 2017, section 5.2).

The preset decides every setting; flags given on the command line override it.

Examples:
  python launch/classification.py --preset=omniglot_5w1s \
      --data_dir=/data/omniglot --logdir=runs/omniglot_5w1s
  python launch/classification.py --preset=miniimagenet_5w1s \
      --data_dir=/data/miniimagenet --logdir=runs/mini_5w1s
  python launch/classification.py --logdir=runs/omniglot_5w1s \
      --eval_only        # test the checkpoint, with the run's own settings
  python launch/classification.py --preset=smoke --logdir=/tmp/smoke
  TF_CONFIG='{"cluster": {"worker": ["host0:2222", "host1:2222"]},
    "task": {"type": "worker", "index": 0}}' \
  python launch/classification.py --preset=omniglot_5w1s \
      --distribute=multi_worker --logdir=/shared/runs/omniglot_5w1s

Omniglot is read from --data_dir, else $MAML_TF_OMNIGLOT_DIR; MiniImagenet
from --data_dir, else $MAML_TF_MINIIMAGENET_DIR. A run killed (or sent
SIGTERM) resumes from its newest checkpoint in --logdir when started again.
--eval_only on a run directory evaluates it with the settings it was trained
with (its config.json); flags given on the command line override them.
"""

from maml_tf.launch import quiet  # before TensorFlow is imported  # pylint: disable=unused-import,g-bad-import-order

import sys

from absl import flags
from absl import logging

from maml_tf.common import run_config
from maml_tf.training import loop
from maml_tf.training import classification

from maml_tf.launch import config_flags  # pylint: disable=g-bad-import-order
from maml_tf.launch import learner_flags  # pylint: disable=g-bad-import-order

_PRESET = flags.DEFINE_enum("preset", "omniglot_5w1s",
                            sorted(classification.PRESETS),
                            "Named configuration; other flags override it.")
_LOGDIR = flags.DEFINE_string(
    "logdir", None, "Output folder: checkpoints, TensorBoard, results.json, "
    "plots, adapted_savedmodel/. Default runs/<preset> (with --pretrained "
    "--eval_only, runs/<preset>_shipped).")
_DATASET = flags.DEFINE_enum("dataset", None, list(classification.DATASETS),
                             "Data set.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Data folder (default: $MAML_TF_OMNIGLOT_DIR or "
    "$MAML_TF_MINIIMAGENET_DIR).")
_NETWORK = flags.DEFINE_enum("network", None, list(classification.NETWORKS),
                             "conv (4-block CNN) or mlp (Omniglot only).")


config_flags.define(classification.ClassificationConfig)


def main(argv):
  config_flags.no_arguments(argv)
  logging.set_verbosity(logging.WARNING)
  cls = classification.ClassificationConfig
  given = config_flags.config_or_exit(config_flags.overrides, cls)
  shipped_eval = given.get("eval_only") and given.get("pretrained")
  logdir = _LOGDIR.value or (f"runs/{_PRESET.value}"
                             + ("_shipped" if shipped_eval else ""))

  config = config_flags.config_or_exit(
      config_flags.config_for, cls, logdir, given,
      lambda: classification.make_config(_PRESET.value, **given),
      ["preset"] if _PRESET.present and _LOGDIR.present else [])
  with run_config.removed_if_start_fails(logdir):
    loop.exit_if_interrupted(classification.train_and_evaluate, config, logdir)


def run():
  """The console script's entry point (and ``launch/*.py``'s)."""
  config_flags.run_launcher(sys.modules[__name__], __doc__, main)


if __name__ == "__main__":
  run()
