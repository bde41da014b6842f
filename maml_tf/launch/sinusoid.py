r"""Sinusoid regression with MAML (Finn et al. 2017, section 5.1).

Examples:
  python launch/sinusoid.py --preset=demo --logdir=runs/demo
  python launch/sinusoid.py --logdir=runs/paper            # 70k iterations
  python launch/sinusoid.py --logdir=runs/paper --eval_only  # its settings
  python launch/sinusoid.py --preset=demo --meta_batch=24 --distribute=mirrored
"""

from maml_tf.launch import quiet  # before TensorFlow is imported  # pylint: disable=unused-import,g-bad-import-order

import sys

from absl import flags
from absl import logging

from maml_tf.common import run_config
from maml_tf.training import loop
from maml_tf.training import sinusoid

from maml_tf.launch import config_flags  # pylint: disable=g-bad-import-order
from maml_tf.launch import learner_flags  # pylint: disable=g-bad-import-order

_PRESET = flags.DEFINE_enum("preset", "paper", sorted(sinusoid.PRESETS),
                            "Named configuration; other flags override it.")
_LOGDIR = flags.DEFINE_string("logdir", None,
                              "Output folder: checkpoints, TensorBoard, "
                              "results.json, sinusoid.png. Default "
                              "runs/sinusoid (with --pretrained --eval_only, "
                              "runs/sinusoid_shipped).")
_INIT = flags.DEFINE_enum("init", None, ["glorot", "finn"],
                          "Weight initialisation: Keras' Glorot or the "
                          "paper code's N(0, 0.01).")
_XLA = flags.DEFINE_enum(
    "xla", None, ["auto", "on", "off"], "XLA for the in-graph meta-steps "
    "(auto: when the closed-form meta-gradient runs, e.g. the paper's MLP).")


config_flags.define(sinusoid.SinusoidConfig)


def main(argv):
  config_flags.no_arguments(argv)
  logging.set_verbosity(logging.WARNING)
  cls = sinusoid.SinusoidConfig
  given = config_flags.config_or_exit(config_flags.overrides, cls)
  shipped_eval = given.get("eval_only") and given.get("pretrained")
  logdir = _LOGDIR.value or ("runs/sinusoid_shipped" if shipped_eval
                             else "runs/sinusoid")

  config = config_flags.config_or_exit(
      config_flags.config_for, cls, logdir, given,
      lambda: sinusoid.make_config(_PRESET.value, **given),
      ["preset"] if _PRESET.present and _LOGDIR.present else [])
  with run_config.removed_if_start_fails(logdir):
    loop.exit_if_interrupted(sinusoid.train_and_evaluate, config, logdir)


def run():
  """The console script's entry point (and ``launch/*.py``'s)."""
  config_flags.run_launcher(sys.modules[__name__], __doc__, main)


if __name__ == "__main__":
  run()
