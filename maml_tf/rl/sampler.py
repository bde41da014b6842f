"""Batched trajectory sampling: tasks x trajectories, padded to the horizon.

A sampler runs ``len(tasks) * trajectories_per_task`` episodes at once and
returns a :class:`Trajectories` batch with fixed shapes ``[T, N, H, ...]``
(tasks, trajectories, horizon) plus a ``mask`` of valid steps, so that every
compiled TensorFlow function sees the same shapes on every iteration.

* :class:`NavigationSampler`: pure numpy; all tasks x trajectories advance in
  one array operation per time step.
* :class:`VectorEnvSampler`: any registered environment through
  ``gymnasium.vector.AsyncVectorEnv`` (``num_workers`` processes; each worker
  process holds a :class:`TaskEnvBatch` of ``ceil(B / num_workers)`` MuJoCo
  environments, so one vector step advances all ``B`` episodes) or
  ``SyncVectorEnv`` (``num_workers=0``: everything in this process).

Policies are given as ``policy_fn(obs[T, N, obs_dim]) -> (mean[T, N, A],
log_std[T, N, A])`` in *normalised* action space: as rllab's ``normalize``
wrapper, an action ``a`` in [-1, 1] is mapped affinely onto the action box
and clipped (identity for the MuJoCo tasks, x0.1 for 2D navigation). The
stored actions are the raw Gaussian samples, whose log-likelihood the learner
needs. With ``oracle=True`` the task features (goal, velocity, direction)
are appended to every observation.

The batched samplers evaluate the policy once per time step for all
``T x N`` episodes instead of once per env step, so the fixed cost of a
TensorFlow call is paid ``T x N`` times less often; for MuJoCo tasks the
simulation itself bounds the rate, which grows with ``num_workers`` where
there are cores to run them. ``python benchmarks/rl_sampling.py`` measures
env steps per second against a bare single-env loop (figures in
BENCHMARKS.md).

Example:
  >>> sampler = make_sampler("maml_tf/Navigation2D-v0", horizon=100)
  >>> tasks = sampler.sample_tasks(20, np.random.default_rng(0))
  >>> batch = sampler.sample(tasks, 20, policy_fn, np.random.default_rng(1))
  >>> batch.obs.shape            # (20, 20, 100, 2)
"""

import contextlib
import dataclasses
import functools
import math
from typing import Callable, Dict, List, Optional, Sequence

import gymnasium
import numpy as np

from maml_tf.rl import envs

PolicyFn = Callable[[np.ndarray], tuple]


@dataclasses.dataclass
class Trajectories:
  """A padded batch of episodes, ``T`` tasks x ``N`` episodes x ``H`` steps.

  Attributes:
    obs: ``[T, N, H, obs_dim]`` float32, observation before each action.
    actions: ``[T, N, H, act_dim]`` float32, raw (unclipped) policy samples.
    rewards: ``[T, N, H]`` float32, zero on padded steps.
    mask: ``[T, N, H]`` float32, 1 where the step happened.
    tasks: the ``T`` task dicts.
  """
  obs: np.ndarray
  actions: np.ndarray
  rewards: np.ndarray
  mask: np.ndarray
  tasks: List[Dict]

  @property
  def returns(self) -> np.ndarray:
    """Undiscounted return of every episode, ``[T, N]``."""
    return self.rewards.sum(axis=-1)

  @property
  def num_steps(self) -> int:
    return int(self.mask.sum())


def scale_action(action: np.ndarray, low: np.ndarray, high: np.ndarray):
  """Maps a normalised action in [-1, 1] onto ``[low, high]`` and clips."""
  scaled = low + (action + 1.0) * 0.5 * (high - low)
  return np.clip(scaled, low, high)


class _SamplerBase:
  """Shared rollout loop; subclasses implement ``_reset`` and ``_step``."""

  def __init__(self, env_id: str, horizon: Optional[int], oracle: bool):
    self.env_id = envs.resolve_env_id(env_id)
    self.env_cls = envs.env_class(self.env_id)
    self.horizon = int(horizon or envs.default_horizon(self.env_id))
    self.oracle = oracle
    with _mujoco_warnings_once():
      probe = gymnasium.make(self.env_id).unwrapped
    self._task_env = probe
    self.action_low = probe.action_space.low.astype(np.float64)
    self.action_high = probe.action_space.high.astype(np.float64)
    self.obs_dim, self.act_dim = envs.policy_dims(probe, oracle)
    self._probe = probe

  def sample_tasks(self, n: int, rng: np.random.Generator) -> List[Dict]:
    """``n`` tasks from the environment's task distribution."""
    return self._probe.sample_tasks(n, rng=rng)

  def _features(self, tasks, per_task):
    feats = np.stack([self.env_cls.task_features(t) for t in tasks])
    return np.repeat(feats, per_task, axis=0).astype(np.float32)

  def sample(self, tasks: Sequence[Dict], per_task: int, policy_fn: PolicyFn,
             rng: np.random.Generator, seed: Optional[int] = None,
             deterministic: bool = False) -> Trajectories:
    """Runs ``per_task`` episodes of every task with ``policy_fn``.

    Arguments:
      tasks: ``T`` task dicts.
      per_task: episodes per task ``N``.
      policy_fn: ``obs[T, N, obs_dim] -> (mean, log_std)`` (numpy or tensors
        broadcastable to ``[T, N, act_dim]``).
      rng: the generator of the Gaussian exploration noise.
      seed: seed of the environments' initial-state noise (default: drawn
        from ``rng``).
      deterministic: act with the mean (no noise).

    Returns:
      a :class:`Trajectories` batch.
    """
    tasks = list(tasks)
    t_count, n, h = len(tasks), int(per_task), self.horizon
    b = t_count * n
    if seed is None:
      seed = int(rng.integers(2 ** 31 - 1))
    obs = self._reset(tasks, n, seed)
    feats = self._features(tasks, n) if self.oracle else None
    obs_buf = np.zeros((b, h, self.obs_dim), np.float32)
    act_buf = np.zeros((b, h, self.act_dim), np.float32)
    rew_buf = np.zeros((b, h), np.float32)
    mask = np.zeros((b, h), np.float32)
    alive = np.ones(b, bool)
    for t in range(h):
      if feats is not None:
        obs = np.concatenate([obs, feats], axis=1)
      obs = obs.astype(np.float32)
      mean, log_std = policy_fn(obs.reshape(t_count, n, self.obs_dim))
      mean = np.asarray(mean, np.float64).reshape(b, self.act_dim)
      std = np.exp(np.broadcast_to(np.asarray(log_std, np.float64),
                                   (t_count, n, self.act_dim))).reshape(b, -1)
      action = mean if deterministic else (
          mean + std * rng.standard_normal((b, self.act_dim)))
      obs_buf[:, t] = obs
      act_buf[:, t] = action
      mask[:, t] = alive
      env_action = scale_action(action, self.action_low, self.action_high)
      obs, reward, done = self._step(env_action, alive)
      rew_buf[:, t] = np.where(alive, reward, 0.0)
      alive = alive & ~done
      if not alive.any():
        break
    shape = (t_count, n, h)
    return Trajectories(obs_buf.reshape(shape + (self.obs_dim,)),
                        act_buf.reshape(shape + (self.act_dim,)),
                        rew_buf.reshape(shape), mask.reshape(shape), tasks)

  def close(self):
    pass


class NavigationSampler(_SamplerBase):
  """2D navigation for all tasks x episodes in one numpy array step.

  Same dynamics and reward as :class:`maml_tf.rl.envs.Navigation2DEnv`
  (``tests/rl/test_envs.py`` checks they agree step by step).

  Arguments:
    horizon: episode length (default 100).
    oracle: append the goal to the observation.

  Example:
    >>> sampler = NavigationSampler()
    >>> batch = sampler.sample(tasks, 20, policy_fn, rng)
  """

  def __init__(self, horizon: Optional[int] = None, oracle: bool = False,
               env_id: str = "maml_tf/Navigation2D-v0"):
    super().__init__(env_id, horizon, oracle)
    if self.env_cls is not envs.Navigation2DEnv:
      raise ValueError(f"NavigationSampler only runs Navigation2D, not {env_id}")

  def _reset(self, tasks, per_task, seed):
    self._goals = np.repeat(
        np.asarray([t["goal"] for t in tasks], np.float64), per_task, axis=0)
    self._pos = np.zeros_like(self._goals)
    return self._pos.copy()

  def _step(self, action, alive):
    action = np.clip(action, -0.1, 0.1)
    self._pos = np.where(alive[:, None], self._pos + action, self._pos)
    delta = self._pos - self._goals
    reward = -np.sqrt(np.sum(delta ** 2, axis=1))
    done = np.all(np.abs(delta) < 0.01, axis=1)
    return self._pos.copy(), reward, done


_SHOWN = set()   # MuJoCo warnings this process printed


@contextlib.contextmanager
def _mujoco_warnings_once():
  """Prints each distinct MuJoCo warning raised inside the block once per
  process (a model compiled many times repeats its compiler's warnings)."""
  try:
    import mujoco  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  seen = []
  previous = mujoco.get_mju_user_warning()
  mujoco.set_mju_user_warning(
      lambda message: seen.append(message) if message not in seen else None)
  try:
    yield
  finally:
    mujoco.set_mju_user_warning(previous)
    for message in seen:
      if message not in _SHOWN:
        _SHOWN.add(message)
        print(f"MuJoCo warning: {message}", flush=True)


class TaskEnvBatch(gymnasium.Env):
  """``k`` copies of a task environment behind one gymnasium.Env interface.

  Used as the sub-environment of a vector env so that each worker process
  steps many MuJoCo simulations per message. Observations are ``[k, obs]``,
  actions ``[k, act]``; the scalar reward is 0 and the per-copy rewards and
  termination flags are in ``info["rewards"]`` / ``info["dones"]``. A copy
  that terminated is frozen (reward 0) until the next reset; the batch itself
  never terminates (the sampler runs exactly ``horizon`` steps).

  Set the ``k`` tasks with ``reset(options={"tasks": [...]})``.

  Arguments:
    env_id: a registered id.
    k: number of copies.
  """

  metadata = {"render_modes": []}

  def __init__(self, env_id: str, k: int):
    from maml_tf.rl import register  # pylint: disable=g-import-not-at-top
    register()
    with _mujoco_warnings_once():   # the same XML compiled k times
      self.envs = [gymnasium.make(env_id).unwrapped for _ in range(k)]
    single = self.envs[0]
    self.observation_space = gymnasium.spaces.Box(
        -np.inf, np.inf, (k,) + single.observation_space.shape, np.float64)
    self.action_space = gymnasium.spaces.Box(
        np.repeat(single.action_space.low[None], k, 0),
        np.repeat(single.action_space.high[None], k, 0), dtype=np.float32)
    self._done = np.zeros(k, bool)
    self._last = np.zeros(self.observation_space.shape)

  def reset(self, *, seed=None, options=None):
    super().reset(seed=seed)
    tasks = (options or {}).get("tasks")
    if tasks is not None and len(tasks) != len(self.envs):
      raise ValueError(f"expected {len(self.envs)} tasks, got {len(tasks)}")
    for i, env in enumerate(self.envs):
      if tasks is not None:
        env.set_task(tasks[i])
      self._last[i], _ = env.reset(seed=None if seed is None else seed + i)
    self._done[:] = False
    return self._last.copy(), {}

  def step(self, action):
    rewards = np.zeros(len(self.envs))
    for i, env in enumerate(self.envs):
      if self._done[i]:
        continue
      obs, rewards[i], terminated, _, _ = env.step(action[i])
      self._last[i] = obs
      self._done[i] = terminated
    info = {"rewards": rewards, "dones": self._done.copy()}
    return self._last.copy(), 0.0, False, False, info


class VectorEnvSampler(_SamplerBase):
  """Samples any registered task env through ``gymnasium.vector``.

  Arguments:
    env_id: a registered id or short name.
    num_workers: worker processes (``AsyncVectorEnv``); 0 steps everything in
      this process (``SyncVectorEnv`` with one :class:`TaskEnvBatch`).
    horizon: episode length (default: the registered one).
    oracle: append task features to the observation.
    context: multiprocessing start method for the workers (``"spawn"`` by
      default: safe after TensorFlow has started its threads).

  Example:
    >>> sampler = VectorEnvSampler("maml_tf/HalfCheetahDir-v0", num_workers=2)
    >>> batch = sampler.sample(tasks, 20, policy_fn, rng)
    >>> sampler.close()
  """

  def __init__(self, env_id: str, num_workers: int = 2,
               horizon: Optional[int] = None, oracle: bool = False,
               context: Optional[str] = "spawn"):
    super().__init__(env_id, horizon, oracle)
    if num_workers < 0:
      raise ValueError(f"num_workers must be >= 0; got {num_workers}")
    self.num_workers = int(num_workers)
    self.context = context
    self._vec = None
    self._size = None

  def _ensure(self, b):
    copies = max(self.num_workers, 1)
    k = math.ceil(b / copies)
    if self._vec is not None and self._size == (copies, k):
      return
    self.close()
    fns = [functools.partial(TaskEnvBatch, self.env_id, k)] * copies
    if self.num_workers == 0:
      self._vec = gymnasium.vector.SyncVectorEnv(fns)
    else:
      self._vec = gymnasium.vector.AsyncVectorEnv(
          fns, context=self.context, shared_memory=True)
    self._size = (copies, k)

  def _reset(self, tasks, per_task, seed):
    b = len(tasks) * per_task
    self._ensure(b)
    copies, k = self._size
    flat = [t for t in tasks for _ in range(per_task)]
    flat += [flat[-1]] * (copies * k - b)
    self._b = b
    # reset(options) is shared by all sub-envs: send each worker its slice.
    for w in range(copies):
      chunk = flat[w * k:(w + 1) * k]
      if self.num_workers == 0:
        self._vec.envs[w].reset(seed=seed + w * k, options={"tasks": chunk})
      else:
        self._vec.parent_pipes[w].send(
            ("reset", {"seed": seed + w * k, "options": {"tasks": chunk}}))
    if self.num_workers == 0:
      obs = np.stack([e._last for e in self._vec.envs])  # pylint: disable=protected-access
    else:
      results = [pipe.recv() for pipe in self._vec.parent_pipes]
      for _, ok in results:
        if not ok:
          self._vec._raise_if_errors([ok])  # pylint: disable=protected-access
      obs = np.array(self._vec.observations, copy=True)
    return obs.reshape(copies * k, -1)[:b]

  def _step(self, action, alive):
    copies, k = self._size
    full = np.zeros((copies * k, self.act_dim), np.float32)
    full[:self._b] = action
    obs, _, _, _, info = self._vec.step(full.reshape(copies, k, -1))
    obs = np.asarray(obs).reshape(copies * k, -1)[:self._b]
    rewards = np.asarray(info["rewards"]).reshape(-1)[:self._b]
    dones = np.asarray(info["dones"]).reshape(-1)[:self._b]
    return obs, rewards, dones

  def close(self):
    if self._vec is not None:
      self._vec.close()
      self._vec = None


def make_sampler(env_id: str, horizon: Optional[int] = None,
                 oracle: bool = False, num_workers: int = 2):
  """The fastest sampler for ``env_id`` (numpy for navigation).

  Example:
    >>> sampler = make_sampler("navigation")
  """
  if envs.env_class(env_id) is envs.Navigation2DEnv:
    return NavigationSampler(horizon=horizon, oracle=oracle,
                             env_id=envs.resolve_env_id(env_id))
  return VectorEnvSampler(env_id, num_workers=num_workers, horizon=horizon,
                          oracle=oracle)
