"""Meta-reinforcement learning with MAML (paper §5.3, Algorithm 3).

Importing this package registers the task environments with gymnasium:
``maml_tf/Navigation2D-v0``, ``maml_tf/HalfCheetahVel-v0``,
``maml_tf/HalfCheetahDir-v0``, ``maml_tf/AntVel-v0``, ``maml_tf/AntDir-v0``.

Example:
  >>> import gymnasium, maml_tf.rl
  >>> env = gymnasium.make("maml_tf/Navigation2D-v0")
  >>> config = maml_tf.rl.RLConfig(env="navigation", iterations=50)
  >>> results = maml_tf.rl.train_and_evaluate(config, "runs/rl/nav_maml")
"""

from maml_tf.rl.envs import (ENV_IDS, AntDirEnv, AntVelEnv, HalfCheetahDirEnv,
                             HalfCheetahVelEnv, Navigation2DEnv, register_envs)


def register() -> None:
  """Registers the environments with gymnasium (done on import)."""
  register_envs()


register()

# pylint: disable=g-import-not-at-top,wrong-import-position
from maml_tf.rl.baseline import (discounted_returns, fit_linear_baseline,
                                 gae_advantages, normalize_advantages,
                                 process_trajectories)
from maml_tf.rl.sampler import (NavigationSampler, Trajectories,
                                VectorEnvSampler, make_sampler)
from maml_tf.rl.optim import conjugate_gradient
from maml_tf.rl.policy import build_gaussian_mlp_policy
from maml_tf.rl.maml_trpo import MAMLTRPO
from maml_tf.rl.train import RLConfig, plot_returns, train_and_evaluate
from maml_tf.rl.compare import load_results, paired_returns
