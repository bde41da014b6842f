"""Task-distribution environments of the MAML paper's RL experiments (§5.3).

Five gymnasium environments with a common task API, registered on import of
``maml_tf.rl`` (``gymnasium.make("maml_tf/Navigation2D-v0")`` ...):

=============================  ===============================  =========
id                             task dict (``sample_tasks``)      horizon
=============================  ===============================  =========
``maml_tf/Navigation2D-v0``    ``{"goal": [x, y]}``, U[-.5,.5]^2  100
``maml_tf/HalfCheetahVel-v0``  ``{"velocity": v}``, v ~ U[0, 2]   200
``maml_tf/HalfCheetahDir-v0``  ``{"direction": +1 or -1}``        200
``maml_tf/AntVel-v0``          ``{"velocity": v}``, v ~ U[0, 3]   200
``maml_tf/AntDir-v0``          ``{"direction": +1 or -1}``        200
=============================  ===============================  =========

Rewards follow the paper's code (rllab ``maml_examples`` / ``rllab/envs/
mujoco/*_rand*.py`` of cbfinn/maml_rl); each class documents its formula and
``info`` carries every term, so ``reward == sum(info["reward_*"])``. The
MuJoCo tasks subclass gymnasium's ``HalfCheetah-v5`` / ``Ant-v5`` (official
``mujoco`` bindings) and keep their observations; the forward velocity is
gymnasium's ``x_velocity`` (finite difference of the root x position over
``dt``), where rllab used the torso subtree's centre-of-mass velocity. The
Ant steps at the paper's ``dt = 0.02`` s (Ant-v5: 0.05 s).
Actions are clipped to the action space before they are applied and costed.

Every environment has:

* ``sample_tasks(n, rng=None) -> list[dict]`` (``rng``: a
  ``numpy.random.Generator``; default the env's ``np_random``),
* ``set_task(task)`` / ``get_task()``; unknown or missing keys raise
  ``ValueError``,
* ``task_features(task) -> np.ndarray`` (what the oracle sees appended to its
  observation).

Example:
  >>> import gymnasium, maml_tf.rl
  >>> env = gymnasium.make("maml_tf/HalfCheetahDir-v0")
  >>> task = env.unwrapped.sample_tasks(1)[0]        # {"direction": -1.0}
  >>> env.unwrapped.set_task(task)
  >>> obs, info = env.reset(seed=0)
  >>> obs, r, term, trunc, info = env.step(env.action_space.sample())
  >>> info["reward_forward"] + info["reward_ctrl"] == r
"""

import math
import sys
from typing import Dict, List, Optional

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

NAVIGATION_HORIZON = 100
LOCOMOTION_HORIZON = 200


def _check_task(task, keys, env_name) -> Dict:
  if not isinstance(task, dict):
    raise ValueError(f"{env_name} task must be a dict with keys {sorted(keys)}; "
                     f"got {type(task).__name__}: {task!r}")
  unknown = set(task) - set(keys)
  missing = set(keys) - set(task)
  if unknown or missing:
    raise ValueError(
        f"{env_name} task must have exactly the keys {sorted(keys)}; got "
        f"{sorted(task)} (unknown: {sorted(unknown)}, missing: {sorted(missing)})")
  return task


def _rng(env, rng):
  return env.np_random if rng is None else rng


class _TaskMixin:
  """Shared task API; subclasses set ``TASK_KEYS`` and ``_apply_task``."""

  TASK_KEYS = ()

  def set_task(self, task: Dict) -> None:
    """Sets the task (a dict from :meth:`sample_tasks`); raises ValueError."""
    _check_task(task, self.TASK_KEYS, type(self).__name__)
    self._apply_task(task)
    self._task = dict(task)

  def get_task(self) -> Dict:
    """The current task dict."""
    return dict(self._task)


class Navigation2DEnv(_TaskMixin, gymnasium.Env):
  """A point in the plane that must walk to a goal (paper §5.3, "2D navigation").

  The state is the position, starting at the origin; an action (clipped to
  [-0.1, 0.1]^2) is added to it. Reward = ``-||position - goal||_2`` after the
  move. As in the paper's ``point_env_randgoal.py`` the episode terminates when
  both coordinates are within 0.01 of the goal; the registered horizon is 100.
  ``info``: ``reward_dist`` (== reward), ``distance``.

  Goals are uniform in [-0.5, 0.5]^2; task ``{"goal": [x, y]}``.

  Example:
    >>> env = Navigation2DEnv()
    >>> env.set_task({"goal": [0.3, -0.2]})
    >>> obs, _ = env.reset()
    >>> obs, r, term, trunc, info = env.step(np.array([0.1, -0.1]))
  """

  metadata = {"render_modes": []}
  TASK_KEYS = ("goal",)

  def __init__(self, task: Optional[Dict] = None):
    self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
    self.action_space = spaces.Box(-0.1, 0.1, (2,), np.float32)
    self._position = np.zeros(2)
    self.set_task(task if task is not None else {"goal": [0.0, 0.0]})

  def _apply_task(self, task):
    goal = np.asarray(task["goal"], np.float64)
    if goal.shape != (2,):
      raise ValueError(f"goal must be [x, y]; got {task['goal']!r}")
    self._goal = goal

  def sample_tasks(self, n: int, rng=None) -> List[Dict]:
    """``n`` goals uniform in [-0.5, 0.5]^2."""
    goals = _rng(self, rng).uniform(-0.5, 0.5, size=(n, 2))
    return [{"goal": [float(g[0]), float(g[1])]} for g in goals]

  @staticmethod
  def task_features(task: Dict) -> np.ndarray:
    return np.asarray(task["goal"], np.float32)

  @property
  def position(self) -> np.ndarray:
    """The point's current position (float64)."""
    return self._position.copy()

  def reset(self, *, seed=None, options=None):
    super().reset(seed=seed)
    if options and "task" in options:
      self.set_task(options["task"])
    self._position = np.zeros(2)
    return self._position.astype(np.float32), {}

  def step(self, action):
    action = np.clip(np.asarray(action, np.float64), -0.1, 0.1)
    self._position = self._position + action
    delta = self._position - self._goal
    distance = float(np.sqrt(np.sum(delta ** 2)))
    terminated = bool(np.all(np.abs(delta) < 0.01))
    info = {"reward_dist": -distance, "distance": distance}
    return self._position.astype(np.float32), -distance, terminated, False, info


class _DirectionTaskMixin:
  """Tasks ``{"direction": +1 or -1}``: run forward or backward."""

  TASK_KEYS = ("direction",)

  def _apply_task(self, task):
    direction = float(task["direction"])
    if direction not in (1.0, -1.0):
      raise ValueError(f"direction must be +1 or -1; got {task['direction']!r}")
    self._direction = direction

  def sample_tasks(self, n: int, rng=None) -> List[Dict]:
    """``n`` directions, +1 or -1 with equal probability."""
    d = _rng(self, rng).choice([-1.0, 1.0], size=(n,))
    return [{"direction": float(x)} for x in d]

  @staticmethod
  def task_features(task: Dict) -> np.ndarray:
    return np.asarray([task["direction"]], np.float32)


def _quiet_asset_deprecations() -> None:
  """Drops MuJoCo's warning that gymnasium's own ``half_cheetah.xml`` uses
  the deprecated ``settotalmass`` (printed by every process that loads it;
  nothing a user can act on); other MuJoCo warnings go to the handler set
  before, else to stderr."""
  import mujoco  # pylint: disable=g-import-not-at-top
  previous = mujoco.get_mju_user_warning()
  if getattr(previous, "maml_tf_quiet", False):
    return

  def warning(message):
    if "settotalmass" in message:
      return
    if previous is not None:
      previous(message)
    else:
      print(f"MuJoCo warning: {message}", file=sys.stderr, flush=True)
  warning.maml_tf_quiet = True
  mujoco.set_mju_user_warning(warning)


class _ClippedMujocoMixin:
  """Clips actions to the action space before simulating and costing them
  (and quiets MuJoCo's deprecation warning of gymnasium's asset)."""

  def __init__(self, *args, **kwargs):
    _quiet_asset_deprecations()
    super().__init__(*args, **kwargs)

  def step(self, action):
    action = np.clip(action, self.action_space.low, self.action_space.high)
    return super().step(action)


class HalfCheetahVelEnv(_TaskMixin, _ClippedMujocoMixin, HalfCheetahEnv):
  """HalfCheetah that must run at a goal velocity (``half_cheetah_env_rand.py``).

  ``reward = -|v - goal| - 0.05 * sum(a^2)`` with ``v`` the forward velocity
  (``info["x_velocity"]``); ``info``: ``reward_forward = -|v - goal|``,
  ``reward_ctrl = -0.05 * sum(a^2)``. Goals ``{"velocity": v}``, v ~ U[0, 2].

  Example:
    >>> env = HalfCheetahVelEnv(); env.set_task({"velocity": 1.5})
  """

  TASK_KEYS = ("velocity",)
  CTRL_COST = 0.05
  VELOCITY_RANGE = (0.0, 2.0)

  def __init__(self, task: Optional[Dict] = None, **kwargs):
    super().__init__(**kwargs)
    self.set_task(task if task is not None else {"velocity": 1.0})

  def _apply_task(self, task):
    self._goal_velocity = float(task["velocity"])

  def sample_tasks(self, n: int, rng=None) -> List[Dict]:
    """``n`` goal velocities uniform in ``VELOCITY_RANGE``."""
    v = _rng(self, rng).uniform(*self.VELOCITY_RANGE, size=(n,))
    return [{"velocity": float(x)} for x in v]

  @staticmethod
  def task_features(task: Dict) -> np.ndarray:
    return np.asarray([task["velocity"]], np.float32)

  def _get_rew(self, x_velocity: float, action):
    forward = -abs(x_velocity - self._goal_velocity)
    ctrl = -self.CTRL_COST * float(np.sum(np.square(action)))
    return forward + ctrl, {"reward_forward": forward, "reward_ctrl": ctrl}


class HalfCheetahDirEnv(_DirectionTaskMixin, _TaskMixin, _ClippedMujocoMixin,
                        HalfCheetahEnv):
  """HalfCheetah that must run forward or backward (``..._rand_direc.py``).

  ``reward = direction * v - 0.05 * sum(a^2)``; ``info``: ``reward_forward =
  direction * v``, ``reward_ctrl``. Tasks ``{"direction": +1.0 or -1.0}``
  with equal probability.

  Example:
    >>> env = HalfCheetahDirEnv(); env.set_task({"direction": -1.0})
  """

  CTRL_COST = 0.05

  def __init__(self, task: Optional[Dict] = None, **kwargs):
    super().__init__(**kwargs)
    self.set_task(task if task is not None else {"direction": 1.0})

  def _get_rew(self, x_velocity: float, action):
    forward = self._direction * x_velocity
    ctrl = -self.CTRL_COST * float(np.sum(np.square(action)))
    return forward + ctrl, {"reward_forward": forward, "reward_ctrl": ctrl}


class _AntTaskEnv(_TaskMixin, AntEnv):
  """Ant-v5 with the paper's cost terms (``ant_env_rand*.py``).

  ``ctrl_cost = 0.5e-2 * sum(a^2)`` (rllab's ``0.5 * 1e-2`` on actions in
  [-1, 1]), ``contact_cost = 0.5e-3 * sum(clip(cfrc_ext, -1, 1)^2)``,
  ``survive_reward = 0.05`` (while healthy); terminates when the torso height
  leaves [0.2, 1.0] (as rllab and Ant-v5).

  Steps last ``dt = 0.02`` s (``frame_skip=2`` of the 0.01 s MuJoCo step), as
  in the paper's code (rllab's ``ant.xml``: timestep 0.02, one step per
  action), not Ant-v5's 0.05 s: at 0.05 s a random policy's torso jumps above
  the 1.0 bound within tens of steps, ending most episodes early.
  """

  PAPER_FRAME_SKIP = 2

  def __init__(self, task: Optional[Dict] = None, **kwargs):
    kwargs.setdefault("frame_skip", self.PAPER_FRAME_SKIP)
    kwargs.setdefault("ctrl_cost_weight", 0.5e-2)
    kwargs.setdefault("contact_cost_weight", 0.5e-3)
    kwargs.setdefault("healthy_reward", 0.05)
    kwargs.setdefault("contact_force_range", (-1.0, 1.0))
    super().__init__(**kwargs)
    self.set_task(task if task is not None else self._default_task())
    self._torso = self.model.body(self._main_body).id

  def _forward_reward(self, x_velocity):
    raise NotImplementedError

  def step(self, action):
    """Ant-v5's step with this reward, computed once per step.

    The same observation, reward, termination and ``info`` as Ant-v5's
    ``step`` (which evaluates the health check, the clipped contact forces
    and a body accessor several times per step); sampling spends most of its
    time here.
    """
    action = np.clip(action, self.action_space.low, self.action_space.high)
    xpos = self.data.xpos
    x0, y0 = xpos[self._torso, 0], xpos[self._torso, 1]
    self.do_simulation(action, self.frame_skip)
    x_velocity = (xpos[self._torso, 0] - x0) / self.dt
    y_velocity = (xpos[self._torso, 1] - y0) / self.dt
    qpos, qvel = self.data.qpos, self.data.qvel
    low, high = self._contact_force_range
    forces = np.clip(self.data.cfrc_ext, low, high)
    parts = [qpos[2:] if self._exclude_current_positions_from_observation
             else qpos, qvel]
    if self._include_cfrc_ext_in_observation:
      parts.append(forces[1:].ravel())
    observation = np.concatenate(parts)
    min_z, max_z = self._healthy_z_range
    healthy = bool(np.isfinite(qpos).all() and np.isfinite(qvel).all()
                   and min_z <= qpos[2] <= max_z)
    reward, reward_info = self._reward(x_velocity, action, healthy, forces)
    info = {"x_position": qpos[0], "y_position": qpos[1],
            "distance_from_origin": math.hypot(qpos[0], qpos[1]),
            "x_velocity": x_velocity, "y_velocity": y_velocity,
            **reward_info}
    if self.render_mode == "human":
      self.render()
    terminated = (not healthy) and self._terminate_when_unhealthy
    return observation, reward, terminated, False, info

  def _reward(self, x_velocity: float, action, healthy: bool, forces):
    """The reward and its terms, from the clipped contact ``forces``."""
    forward = self._forward_reward(x_velocity)
    survive = float(healthy * self._healthy_reward)
    ctrl = -float(self._ctrl_cost_weight * np.sum(np.square(action)))
    contact = -float(self._contact_cost_weight * np.sum(np.square(forces)))
    reward = forward + survive + ctrl + contact
    return reward, {"reward_forward": forward, "reward_ctrl": ctrl,
                    "reward_contact": contact, "reward_survive": survive}

  def _get_rew(self, x_velocity: float, action):
    # Ant-v5's hook (its own ``step``), the same reward as :meth:`step`.
    return self._reward(x_velocity, action, self.is_healthy,
                        self.contact_forces)


class AntVelEnv(_AntTaskEnv):
  """Ant that must run forward at a goal velocity (``ant_env_rand.py``).

  ``reward = (-|v - goal| + 1.0) - 0.5e-2 sum(a^2)
  - 0.5e-3 sum(clip(cfrc_ext, -1, 1)^2) + 0.05``; ``info``:
  ``reward_forward`` (the first bracket), ``reward_ctrl``, ``reward_contact``,
  ``reward_survive``. Goals ``{"velocity": v}``, v ~ U[0, 3].

  Example:
    >>> env = AntVelEnv(); env.set_task({"velocity": 2.0})
  """

  TASK_KEYS = ("velocity",)
  VELOCITY_RANGE = (0.0, 3.0)

  def _default_task(self):
    return {"velocity": 1.0}

  def _apply_task(self, task):
    self._goal_velocity = float(task["velocity"])

  def sample_tasks(self, n: int, rng=None) -> List[Dict]:
    """``n`` goal velocities uniform in ``VELOCITY_RANGE``."""
    v = _rng(self, rng).uniform(*self.VELOCITY_RANGE, size=(n,))
    return [{"velocity": float(x)} for x in v]

  @staticmethod
  def task_features(task: Dict) -> np.ndarray:
    return np.asarray([task["velocity"]], np.float32)

  def _forward_reward(self, x_velocity):
    return -abs(x_velocity - self._goal_velocity) + 1.0


class AntDirEnv(_DirectionTaskMixin, _AntTaskEnv):
  """Ant that must run forward or backward (``ant_env_rand_direc.py``).

  ``reward = direction * v - 0.5e-2 sum(a^2)
  - 0.5e-3 sum(clip(cfrc_ext, -1, 1)^2) + 0.05``; tasks
  ``{"direction": +1.0 or -1.0}``.

  Example:
    >>> env = AntDirEnv(); env.set_task({"direction": 1.0})
  """

  def _default_task(self):
    return {"direction": 1.0}

  def _forward_reward(self, x_velocity):
    return self._direction * x_velocity


ENV_IDS = {
    "maml_tf/Navigation2D-v0": (Navigation2DEnv, NAVIGATION_HORIZON),
    "maml_tf/HalfCheetahVel-v0": (HalfCheetahVelEnv, LOCOMOTION_HORIZON),
    "maml_tf/HalfCheetahDir-v0": (HalfCheetahDirEnv, LOCOMOTION_HORIZON),
    "maml_tf/AntVel-v0": (AntVelEnv, LOCOMOTION_HORIZON),
    "maml_tf/AntDir-v0": (AntDirEnv, LOCOMOTION_HORIZON),
}

# Short names accepted by the launcher and the config.
SHORT_NAMES = {
    "navigation": "maml_tf/Navigation2D-v0",
    "cheetah_vel": "maml_tf/HalfCheetahVel-v0",
    "cheetah_dir": "maml_tf/HalfCheetahDir-v0",
    "ant_vel": "maml_tf/AntVel-v0",
    "ant_dir": "maml_tf/AntDir-v0",
}


def resolve_env_id(name: str) -> str:
  """Maps a short name (``"navigation"``) or a registered id to the id."""
  if name in ENV_IDS:
    return name
  if name in SHORT_NAMES:
    return SHORT_NAMES[name]
  raise ValueError(f"unknown environment {name!r}; choose one of "
                   f"{sorted(SHORT_NAMES)} or {sorted(ENV_IDS)}")


def env_class(env_id: str):
  """The environment class registered under ``env_id`` (or a short name)."""
  return ENV_IDS[resolve_env_id(env_id)][0]


def default_horizon(env_id: str) -> int:
  """The registered horizon (100 for navigation, 200 for locomotion)."""
  return ENV_IDS[resolve_env_id(env_id)][1]


def short_name(env_id: str) -> str:
  """The short name of a registered id or short name (``"cheetah_dir"``)."""
  return {v: k for k, v in SHORT_NAMES.items()}[resolve_env_id(env_id)]


def policy_dims(env, oracle: bool = False):
  """``(obs_dim, act_dim)`` of a policy for ``env``: an environment
  instance, a registered id or a short name (then a probe is made).

  With ``oracle=True`` the task features are part of the observation.
  """
  if isinstance(env, str):
    register_envs()
    probe = gymnasium.make(resolve_env_id(env)).unwrapped
    try:
      return policy_dims(probe, oracle)
    finally:
      probe.close()
  task_dim = len(env.task_features(env.get_task())) if oracle else 0
  return (int(env.observation_space.shape[0]) + task_dim,
          int(env.action_space.shape[0]))


def register_envs() -> None:
  """Registers the five ids with gymnasium (idempotent)."""
  for env_id, (cls, horizon) in ENV_IDS.items():
    if env_id not in gymnasium.registry:
      gymnasium.register(id=env_id, entry_point=f"{cls.__module__}:{cls.__name__}",
                         max_episode_steps=horizon)
