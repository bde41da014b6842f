"""Sinusoid regression with MAML (Finn et al. 2017, section 5.1).

Examples:
  python launch/sinusoid.py --preset=demo --logdir=runs/demo
  python launch/sinusoid.py --logdir=runs/paper            # 70k iterations
  python launch/sinusoid.py --logdir=runs/paper --eval_only
  python launch/sinusoid.py --preset=demo --meta_batch=24 --distribute=mirrored
"""

import quiet  # launch/quiet.py: before TensorFlow is imported  # pylint: disable=unused-import,g-bad-import-order

from absl import app
from absl import flags
from absl import logging

from maml_tf.training import loop
from maml_tf.training import sinusoid

import config_flags  # launch/config_flags.py  # pylint: disable=g-bad-import-order
import learner_flags  # launch/learner_flags.py, beside this script

_PRESET = flags.DEFINE_enum("preset", "paper", sorted(sinusoid.PRESETS),
                            "Named configuration; other flags override it.")
_LOGDIR = flags.DEFINE_string("logdir", "runs/sinusoid",
                              "Output folder: checkpoints, TensorBoard, "
                              "results.json, sinusoid.png.")
_ITERATIONS = flags.DEFINE_integer("iterations", None, "Meta-iterations.")
_META_BATCH = flags.DEFINE_integer("meta_batch", None, "Tasks per meta-batch.")
_K = flags.DEFINE_integer("k_shot", None, "Support points per task (K).")
_INNER_LR = flags.DEFINE_float("inner_lr", None, "Inner step size alpha.")
_INNER_STEPS = flags.DEFINE_integer("inner_steps", None,
                                    "Inner steps during meta-training.")
_META_LR = flags.DEFINE_float("meta_lr", None, "Adam step size beta.")
_FIRST_ORDER = flags.DEFINE_bool("first_order", None,
                                 "First-order MAML (no second derivatives).")
_SEED = flags.DEFINE_integer("seed", None, "Random seed.")
_RESUME = flags.DEFINE_bool("resume", None,
                            "Continue from the newest checkpoint in logdir.")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", None,
                               "Only evaluate the checkpoint in logdir.")
_PRETRAINED = flags.DEFINE_bool(
    "pretrained", None, "With --eval_only: evaluate the shipped "
    "meta-initialisation 'sinusoid' (maml_tf.models.pretrained).")
_PLOT = flags.DEFINE_bool("plot", None, "Write sinusoid.png.")
_BASELINE = flags.DEFINE_bool("baseline", None,
                              "Also train/evaluate the pretrained baseline.")
_INIT = flags.DEFINE_enum("init", None, ["glorot", "finn"],
                          "Weight initialisation: Keras' Glorot or the "
                          "paper code's N(0, 0.01).")
_EVAL_TASKS = flags.DEFINE_integer("eval_tasks", None,
                                   "Fresh tasks per evaluation.")
_STEPS_PER_CALL = flags.DEFINE_integer(
    "steps_per_call", None, "Meta-steps per compiled call, tasks sampled in "
    "the graph (1: one call per step, tasks sampled with numpy).")
_XLA = flags.DEFINE_enum(
    "xla", None, ["auto", "on", "off"], "XLA for the in-graph meta-steps "
    "(auto: when the closed-form meta-gradient runs, e.g. the paper's MLP).")


config_flags.define(sinusoid.SinusoidConfig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = sinusoid.make_config(
      _PRESET.value, **config_flags.overrides(sinusoid.SinusoidConfig))
  loop.exit_if_interrupted(
      sinusoid.train_and_evaluate, config, _LOGDIR.value)


if __name__ == "__main__":
  app.run(main)
