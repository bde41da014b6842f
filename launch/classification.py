"""Few-shot classification with MAML (Finn et al. 2017, section 5.2).

The preset decides every setting; flags given on the command line override it.

Examples:
  python launch/classification.py --preset=omniglot_5w1s \
      --data_dir=/data/omniglot --logdir=runs/omniglot_5w1s
  python launch/classification.py --preset=miniimagenet_5w1s \
      --data_dir=/data/miniimagenet --logdir=runs/mini_5w1s
  python launch/classification.py --preset=omniglot_5w1s \
      --logdir=runs/omniglot_5w1s --eval_only        # test the checkpoint
  python launch/classification.py --preset=smoke --logdir=/tmp/smoke
  TF_CONFIG='{"cluster": {"worker": ["host0:2222", "host1:2222"]},
    "task": {"type": "worker", "index": 0}}' \
  python launch/classification.py --preset=omniglot_5w1s \
      --distribute=multi_worker --logdir=/shared/runs/omniglot_5w1s

Omniglot is read from --data_dir, else $MAML_TF_OMNIGLOT_DIR; MiniImagenet
from --data_dir, else $MAML_TF_MINIIMAGENET_DIR. A run killed (or sent
SIGTERM) resumes from its newest checkpoint in --logdir when started again.
"""

import quiet  # launch/quiet.py: before TensorFlow is imported  # pylint: disable=unused-import,g-bad-import-order

from absl import app
from absl import flags
from absl import logging

from maml_tf.training import loop
from maml_tf.training import classification

import config_flags  # launch/config_flags.py  # pylint: disable=g-bad-import-order
import learner_flags  # launch/learner_flags.py, beside this script

_PRESET = flags.DEFINE_enum("preset", "omniglot_5w1s",
                            sorted(classification.PRESETS),
                            "Named configuration; other flags override it.")
_LOGDIR = flags.DEFINE_string(
    "logdir", None, "Output folder: checkpoints, TensorBoard, results.json, "
    "plots, adapted_savedmodel/. Default runs/<preset>.")
_DATASET = flags.DEFINE_enum("dataset", None, list(classification.DATASETS),
                             "Data set.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Data folder (default: $MAML_TF_OMNIGLOT_DIR or "
    "$MAML_TF_MINIIMAGENET_DIR).")
_NETWORK = flags.DEFINE_enum("network", None, list(classification.NETWORKS),
                             "conv (4-block CNN) or mlp (Omniglot only).")
_WAY = flags.DEFINE_integer("way", None, "Classes per task (N).")
_SHOT = flags.DEFINE_integer("shot", None, "Support examples per class (K).")
_QUERY = flags.DEFINE_integer("query", None,
                              "Query examples per class at val/test time.")
_TRAIN_QUERY = flags.DEFINE_integer(
    "train_query", None, "Query examples per class during meta-training.")
_INNER_LR = flags.DEFINE_float("inner_lr", None, "Inner step size alpha.")
_INNER_STEPS = flags.DEFINE_integer("inner_steps", None,
                                    "Inner steps during meta-training.")
_EVAL_INNER_STEPS = flags.DEFINE_integer(
    "eval_inner_steps", None, "Inner steps at val/test time (accuracy is "
    "reported after each of 0..eval_inner_steps).")
_META_BATCH = flags.DEFINE_integer("meta_batch", None, "Tasks per meta-batch.")
_META_LR = flags.DEFINE_float("meta_lr", None, "Adam step size beta.")
_ITERATIONS = flags.DEFINE_integer("iterations", None, "Meta-iterations.")
_FIRST_ORDER = flags.DEFINE_bool("first_order", None,
                                 "First-order MAML (no second derivatives).")
_SEED = flags.DEFINE_integer("seed", None,
                             "Seed of the weights and the training tasks.")
_RESUME = flags.DEFINE_bool("resume", None,
                            "Continue from the newest checkpoint in logdir.")
_PRETRAINED = flags.DEFINE_bool(
    "pretrained", None, "With --eval_only: evaluate the shipped "
    "meta-initialisation of --preset (maml_tf.models.pretrained).")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", None,
                               "Only evaluate the checkpoint in logdir.")
_EVAL_TASKS = flags.DEFINE_integer("eval_tasks", None,
                                   "Test tasks (the paper: 600).")
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", None, "Iterations between validation evaluations (0: none).")
_TRAIN_ON_VAL = flags.DEFINE_bool(
    "train_on_val", None, "Omniglot: also meta-train on the validation "
    "characters (the paper's 1200).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None,
                                   "MiniImagenet image side (84).")
_IMAGES_PER_CLASS = flags.DEFINE_integer(
    "images_per_class", None, "MiniImagenet: use the first N images of "
    "each class (classes of unequal size need it).")
_EXPORT = flags.DEFINE_bool("export", None,
                            "Export one adapted model as a SavedModel.")
_PLOT = flags.DEFINE_bool("plot", None, "Write the PNG figures.")


config_flags.define(classification.ClassificationConfig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    config = classification.make_config(
        _PRESET.value, **config_flags.overrides(
            classification.ClassificationConfig))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  loop.exit_if_interrupted(
      classification.train_and_evaluate,
      config, _LOGDIR.value or f"runs/{_PRESET.value}")


if __name__ == "__main__":
  app.run(main)
