r"""Meta-RL experiments of the MAML paper (§5.3) from the command line.

Parses absl flags into :class:`maml_tf.rl.RLConfig` and calls
:func:`maml_tf.rl.train_and_evaluate`. Runs of several algorithms under one
parent directory are plotted together (``returns.png``, like Figure 5).

Example:
  python launch/rl.py --env=navigation --algorithm=maml --iterations=100 \
      --logdir=runs/rl/navigation/maml
  python launch/rl.py --env=navigation --algorithm=random \
      --logdir=runs/rl/navigation/random
  # the paper code's navigation protocol (step 0.5, then 0.25; 40 test
  # trajectories per step):
  python launch/rl.py --env=navigation --fast_lr=0.5 --eval_batch_size=40 \
      --logdir=runs/rl/navigation/maml_lr05
  python launch/rl.py --env=cheetah_dir --iterations=5 --meta_batch=40 \
      --num_workers=2 --logdir=runs/rl/cheetah_dir/maml
  # a shipped meta-policy, evaluated on 40 test tasks with 95% intervals:
  python launch/rl.py --env=navigation --pretrained --eval_only
  # ... or meta-trained further, from its card's iteration count:
  python launch/rl.py --env=ant_dir --pretrained --iterations=800 \
      --num_workers=2 --logdir=runs/rl/ant_dir/continued
  # a run's newest checkpoint, with the settings it was trained with:
  python launch/rl.py --eval_only --logdir=runs/rl/cheetah_dir/maml

--logdir defaults to runs/rl/ENV/ALGORITHM (runs/rl/ENV/shipped with
--pretrained --eval_only, runs/rl/ENV/continued with --pretrained alone).
--eval_only on a run directory takes the run's settings from
its config.json; flags given on the command line override them.
"""

from maml_tf.launch import quiet  # before TensorFlow is imported  # pylint: disable=unused-import,g-bad-import-order

import sys

from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_enum("env", "navigation",
                  ["navigation", "cheetah_vel", "cheetah_dir", "ant_vel",
                   "ant_dir"], "Task distribution.")
flags.DEFINE_enum("algorithm", "maml", ["maml", "pretrained", "random",
                                        "oracle"], "Method to train.")
flags.DEFINE_integer("meta_batch", None,
                     "Tasks per meta-iteration (default 20 navigation, 40 "
                     "locomotion).")
flags.DEFINE_integer("fast_batch_size", 20, "Trajectories per task per step.")
flags.DEFINE_float("fast_lr", 0.1, "Inner (REINFORCE) step size alpha.")
flags.DEFINE_float("max_kl", 0.01, "TRPO KL constraint.")
flags.DEFINE_integer("iterations", 100, "Meta-iterations.")
flags.DEFINE_integer("horizon", None, "Episode length (default 100 / 200).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("logdir", None,
                    "Output directory (default runs/rl/ENV/ALGORITHM; with "
                    "--pretrained --eval_only, runs/rl/ENV/shipped; with "
                    "--pretrained alone, runs/rl/ENV/continued).")
flags.DEFINE_bool("resume", True, "Resume from the latest checkpoint.")
flags.DEFINE_bool("first_order", False, "First-order MAML.")
flags.DEFINE_integer("num_workers", 2, "Sampler processes (MuJoCo envs).")
flags.DEFINE_integer("eval_tasks", 40, "Test tasks.")
flags.DEFINE_integer("eval_batch_size", None,
                     "Trajectories per test task per step (default: "
                     "--fast_batch_size; the paper's test scripts used 40).")
flags.DEFINE_integer("eval_every", 0, "Evaluate every N iterations (0: end).")
flags.DEFINE_integer("checkpoint_every", 10, "Checkpoint every N iterations.")
flags.DEFINE_float("checkpoint_seconds", 600.0,
                   "Also checkpoint when this many seconds passed since the "
                   "last checkpoint.")
flags.DEFINE_bool("eval_only", False,
                  "Skip training; evaluate the newest checkpoint of --logdir "
                  "(with --pretrained: the shipped meta-policy).")
flags.DEFINE_bool("pretrained", False,
                  "Start from the meta-policy shipped for --env "
                  "(maml_tf.models.pretrained.available('rl')), with the "
                  "settings it was trained with (flags given on the command "
                  "line override them): with --eval_only, evaluate it; "
                  "otherwise continue meta-training it up to --iterations.")

# The hand-written flags above that are fields of RLConfig.
_FIELDS = ("env", "algorithm", "iterations", "meta_batch", "fast_batch_size",
           "fast_lr", "max_kl", "horizon", "seed", "resume", "first_order",
           "num_workers", "eval_tasks", "eval_batch_size", "eval_every",
           "checkpoint_every", "checkpoint_seconds", "eval_only",
           "pretrained")


def _missing_extra(what: str) -> SystemExit:
  return SystemExit(
      f"maml-tf-rl needs the meta-RL dependencies ({what}): "
      "pip install 'maml_tf[cpu,rl]' (or [gpu,rl]), then "
      "pip install --no-deps tf-keras==2.21.0 (BUILD_NOTES.md)")


try:
  from maml_tf.rl.train import RLConfig  # pylint: disable=g-bad-import-order,g-import-not-at-top
except ModuleNotFoundError as e:     # the [rl] extra is not installed
  raise _missing_extra(f"{e.name} is missing") from None
except Exception as e:  # pylint: disable=broad-except
  import gymnasium.error  # pylint: disable=g-import-not-at-top
  if not isinstance(e, gymnasium.error.DependencyNotInstalled):   # no MuJoCo
    raise
  raise _missing_extra(str(e).splitlines()[0]) from None
from maml_tf.common import run_config  # pylint: disable=g-bad-import-order
from maml_tf.launch import config_flags  # pylint: disable=g-bad-import-order

# The fields without a hand-written flag above (gamma, hidden_sizes, ...).
_GENERATED = config_flags.define(RLConfig)


def main(argv):
  config_flags.no_arguments(argv)
  logging.set_verbosity(logging.WARNING)
  import maml_tf.rl as rl  # pylint: disable=g-import-not-at-top
  # An unset flag keeps RLConfig's default, with --pretrained the value the
  # shipped policy was trained with (its card's overrides), and with
  # --eval_only on a run directory the run's own (its config.json).
  given = {name: FLAGS[name].value for name in _FIELDS
           if FLAGS[name].present and name != "env"}
  logdir = FLAGS.logdir or (
      f"runs/rl/{rl.envs.short_name(FLAGS.env)}/"
      + (("shipped" if FLAGS.eval_only else "continued")
         if FLAGS.pretrained else FLAGS.algorithm))

  def make_config():
    given.update(config_flags.overrides(RLConfig, _GENERATED))
    if FLAGS.pretrained:   # without --eval_only: continue training it
      return rl.train.shipped_config(
          FLAGS.env, **{**given, "eval_only": FLAGS.eval_only})
    if FLAGS["env"].present:
      given["env"] = FLAGS.env
    return config_flags.config_for(
        RLConfig, logdir, given,
        lambda: rl.RLConfig(**{"env": FLAGS.env, **given}))
  config = config_flags.config_or_exit(make_config)
  from maml_tf.common import interrupts  # pylint: disable=g-import-not-at-top
  with run_config.removed_if_start_fails(logdir):
    interrupts.exit_if_interrupted(rl.train_and_evaluate, config, logdir)


def run():
  """The console script's entry point (and ``launch/*.py``'s)."""
  config_flags.run_launcher(sys.modules[__name__], __doc__, main)


if __name__ == "__main__":
  run()
