"""Reward formulas, task setting and registration of the meta-RL envs."""

import gymnasium
import numpy as np
import pytest

import maml_tf.rl  # noqa: F401  (registers the ids)
from maml_tf.rl import envs
from maml_tf.rl.sampler import NavigationSampler, VectorEnvSampler

IDS = sorted(envs.ENV_IDS)


@pytest.mark.parametrize("env_id", IDS)
def test_make_registered_ids(env_id):
  env = gymnasium.make(env_id)
  assert env.spec.max_episode_steps == (
      100 if "Navigation" in env_id else 200)
  tasks = env.unwrapped.sample_tasks(5, rng=np.random.default_rng(0))
  assert len(tasks) == 5 and all(isinstance(t, dict) for t in tasks)
  env.unwrapped.set_task(tasks[0])
  assert env.unwrapped.get_task() == tasks[0]
  obs, _ = env.reset(seed=0)
  assert env.observation_space.contains(obs.astype(env.observation_space.dtype))
  env.close()


@pytest.mark.parametrize("env_id", IDS)
def test_unknown_task_keys_raise(env_id):
  env = gymnasium.make(env_id).unwrapped
  with pytest.raises(ValueError, match="unknown"):
    env.set_task({**env.get_task(), "colour": "red"})
  with pytest.raises(ValueError, match="missing"):
    env.set_task({})


def test_task_distributions():
  rng = np.random.default_rng(0)
  goals = np.array([t["goal"] for t in
                    envs.Navigation2DEnv().sample_tasks(500, rng)])
  assert goals.min() >= -0.5 and goals.max() <= 0.5
  vel = [t["velocity"] for t in envs.HalfCheetahVelEnv().sample_tasks(500, rng)]
  assert 0 <= min(vel) and max(vel) <= 2 and max(vel) > 1.8
  vel = [t["velocity"] for t in envs.AntVelEnv().sample_tasks(500, rng)]
  assert 0 <= min(vel) and max(vel) <= 3 and max(vel) > 2.7
  for cls in (envs.HalfCheetahDirEnv, envs.AntDirEnv):
    d = {t["direction"] for t in cls().sample_tasks(50, rng)}
    assert d == {1.0, -1.0}
  with pytest.raises(ValueError, match="direction"):
    envs.HalfCheetahDirEnv().set_task({"direction": 0.5})


def test_navigation_reward_and_termination():
  env = gymnasium.make("maml_tf/Navigation2D-v0")
  env.unwrapped.set_task({"goal": [0.25, -0.05]})
  obs, _ = env.reset(seed=0)
  np.testing.assert_allclose(obs, [0, 0])
  obs, r, term, _, info = env.step(np.array([0.5, -0.05]))  # x clipped to 0.1
  np.testing.assert_allclose(obs, [0.1, -0.05], atol=1e-7)
  assert r == pytest.approx(-0.15) == info["reward_dist"]
  env.step(np.array([0.1, 0.0]))
  obs, r, term, _, _ = env.step(np.array([0.05, 0.0]))
  assert term and r == pytest.approx(0.0, abs=1e-7)


def test_navigation_sampler_matches_env():
  """The numpy-batched sampler reproduces the gymnasium env step by step."""
  sampler = NavigationSampler(horizon=30)
  tasks = sampler.sample_tasks(3, np.random.default_rng(0))
  rng = np.random.default_rng(1)
  policy = lambda obs: (np.full(obs.shape, 0.3), np.full(obs.shape, -1.0))
  batch = sampler.sample(tasks, 2, policy, rng)
  env = gymnasium.make("maml_tf/Navigation2D-v0")
  for i, task in enumerate(tasks):
    env.unwrapped.set_task(task)
    env.reset()
    for t in range(30):
      if not batch.mask[i, 1, t]:
        break
      np.testing.assert_allclose(env.unwrapped.position,
                                 batch.obs[i, 1, t], atol=1e-6)
      action = np.clip(batch.actions[i, 1, t], -1, 1) * 0.1
      _, r, _, _, _ = env.step(action)
      assert r == pytest.approx(batch.rewards[i, 1, t], abs=1e-5)


def _rollout(env_id, task, steps=30, seed=0):
  env = gymnasium.make(env_id)
  env.unwrapped.set_task(task)
  env.reset(seed=seed)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    action = rng.uniform(-1.5, 1.5, env.action_space.shape)  # some clipped
    x0 = float(env.unwrapped.data.qpos[0])
    _, r, term, _, info = env.step(action)
    x1 = float(env.unwrapped.data.qpos[0])
    contact = 0.5e-3 * np.sum(np.clip(env.unwrapped.data.cfrc_ext, -1, 1) ** 2)
    info = {**info, "terminated": term}
    out.append((np.clip(action, -1, 1), r, info, (x1 - x0) / env.unwrapped.dt,
                -contact))
    if term:
      break
  return out


@pytest.mark.parametrize("goal", [0.3, 1.7])
def test_half_cheetah_vel_reward(goal):
  for a, r, info, v, _ in _rollout("maml_tf/HalfCheetahVel-v0",
                                   {"velocity": goal}):
    assert info["x_velocity"] == pytest.approx(v, abs=1e-9)
    assert info["reward_forward"] == pytest.approx(-abs(v - goal), abs=1e-9)
    assert info["reward_ctrl"] == pytest.approx(-0.05 * np.sum(a ** 2))
    assert r == pytest.approx(info["reward_forward"] + info["reward_ctrl"])


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_half_cheetah_dir_reward(direction):
  for a, r, info, v, _ in _rollout("maml_tf/HalfCheetahDir-v0",
                                   {"direction": direction}):
    assert info["reward_forward"] == pytest.approx(direction * v, abs=1e-9)
    assert info["reward_ctrl"] == pytest.approx(-0.05 * np.sum(a ** 2))
    assert r == pytest.approx(direction * v - 0.05 * np.sum(a ** 2))


def _ant_costs(a, contact):
  return -0.5e-2 * np.sum(a ** 2), contact


@pytest.mark.parametrize("goal", [0.5, 2.5])
def test_ant_vel_reward(goal):
  contacts = []
  for a, r, info, _, c in _rollout("maml_tf/AntVel-v0", {"velocity": goal}):
    v = info["x_velocity"]
    ctrl, contact = _ant_costs(a, c)
    contacts.append(contact)
    assert info["reward_forward"] == pytest.approx(-abs(v - goal) + 1.0)
    assert info["reward_ctrl"] == pytest.approx(ctrl)
    assert info["reward_contact"] == pytest.approx(contact)
    survive = 0.0 if info["terminated"] else 0.05   # while healthy
    assert info["reward_survive"] == survive
    assert r == pytest.approx(-abs(v - goal) + 1.0 + ctrl + contact + survive)
  assert min(contacts) < 0   # the contact term is exercised


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_ant_dir_reward(direction):
  for a, r, info, _, c in _rollout("maml_tf/AntDir-v0",
                                   {"direction": direction}):
    v = info["x_velocity"]
    ctrl, contact = _ant_costs(a, c)
    assert info["reward_forward"] == pytest.approx(direction * v)
    survive = 0.0 if info["terminated"] else 0.05
    assert r == pytest.approx(direction * v + ctrl + contact + survive)


@pytest.mark.parametrize("cls", [envs.AntDirEnv, envs.AntVelEnv])
def test_ant_step_is_ant_v5s_step_with_the_papers_reward(cls):
  """The task env's own step equals Ant-v5's step (with this reward)."""
  from gymnasium.envs.mujoco.ant_v5 import AntEnv  # pylint: disable=g-import-not-at-top
  ours, theirs = cls(), cls()
  for env in (ours, theirs):
    env.set_task(env.sample_tasks(1, np.random.default_rng(3))[0])
    env.reset(seed=5)
  rng = np.random.default_rng(0)
  steps = 0
  for t in range(1000):   # to the end of the episode: the unhealthy step too
    action = rng.normal(0, 3.0, 8)
    a = ours.step(action)
    b = AntEnv.step(theirs, np.clip(action, -1, 1))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == pytest.approx(b[1], abs=1e-12) and a[2:4] == b[2:4]
    assert a[4].keys() == b[4].keys()
    for k in a[4]:
      assert a[4][k] == pytest.approx(b[4][k], abs=1e-12), k
    steps += 1
    if a[2]:
      break
  assert a[2] and a[4]["reward_survive"] == 0 and steps > 20


def test_ant_steps_at_the_papers_dt():
  """0.02 s per action (rllab's ant.xml); a random policy mostly survives."""
  env = envs.AntDirEnv()
  assert env.dt == pytest.approx(0.02)
  rng = np.random.default_rng(0)
  lengths = []
  for seed in range(10):
    env.reset(seed=seed)
    for t in range(200):
      *_, term, _, _ = env.step(rng.normal(size=8))
      if term:
        break
    lengths.append(t + 1)
  assert np.mean(lengths) > 120   # at Ant-v5's 0.05 s it is about 55


@pytest.mark.parametrize("workers", [0, 2])
def test_vector_sampler_matches_single_env(workers):
  """Sync and async vector samplers reproduce single-env rollouts per task."""
  sampler = VectorEnvSampler("maml_tf/HalfCheetahDir-v0", num_workers=workers,
                             horizon=5, oracle=True)
  tasks = [{"direction": 1.0}, {"direction": -1.0}]
  policy = lambda obs: (np.full(obs.shape[:2] + (6,), 0.5),
                        np.zeros(obs.shape[:2] + (6,)))
  try:
    batch = sampler.sample(tasks, 2, policy, np.random.default_rng(0), seed=3)
  finally:
    sampler.close()
  assert batch.obs.shape == (2, 2, 5, 18) and batch.mask.all()
  np.testing.assert_allclose(batch.obs[0, :, :, -1], 1.0)   # oracle feature
  np.testing.assert_allclose(batch.obs[1, :, :, -1], -1.0)
  env = gymnasium.make("maml_tf/HalfCheetahDir-v0")
  k = 4 if workers == 0 else 2    # episodes per worker process
  for j in range(4):
    i, n = divmod(j, 2)
    env.unwrapped.set_task(tasks[i])
    env.reset(seed=3 + (j % k) + (j // k) * k)
    for t in range(5):
      _, r, _, _, _ = env.step(batch.actions[i, n, t])
      assert r == pytest.approx(batch.rewards[i, n, t], rel=1e-5, abs=1e-5)


def test_a_batch_of_env_copies_prints_mujocos_warnings_once(capfd):
  from maml_tf.rl.sampler import TaskEnvBatch  # pylint: disable=g-import-not-at-top
  batch = TaskEnvBatch("maml_tf/HalfCheetahDir-v0", 3)
  assert len(batch.envs) == 3
  TaskEnvBatch("maml_tf/HalfCheetahDir-v0", 2)
  out = capfd.readouterr()
  # gymnasium's half_cheetah.xml uses a deprecated compiler attribute: the
  # warning of five compilations is shown at most once per process.
  assert (out.out + out.err).count("settotalmass") <= 1


def test_making_a_cheetah_prints_no_deprecation_of_gymnasiums_asset(capfd):
  # Every process that loaded half_cheetah.xml printed MuJoCo's warning
  # about its deprecated settotalmass: three lines per RL start.
  import mujoco  # pylint: disable=g-import-not-at-top
  mujoco.set_mju_user_warning(None)          # as in a fresh process
  env = gymnasium.make("maml_tf/HalfCheetahVel-v0")
  env.reset(seed=0)
  captured = capfd.readouterr()
  assert "settotalmass" not in captured.out + captured.err
  env.close()
