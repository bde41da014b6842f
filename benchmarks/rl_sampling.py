"""Environment steps/second: bare single-env loop vs the batched samplers.

Prints one JSON line per environment, e.g.::

  python benchmarks/rl_sampling.py --envs=navigation,cheetah_dir --tasks=40 \
      --per_task=20 --workers=2

Measured on the 2-core development machine (shared with other jobs, so
+-50%), 40 tasks x 20 episodes, a numpy Gaussian policy, 2026-12-01::

  {"env": "maml_tf/Navigation2D-v0", "bare_steps_per_s": 35505,
   "numpy_batched_steps_per_s": 2377685}
  {"env": "maml_tf/HalfCheetahDir-v0", "bare_steps_per_s": 9421,
   "sync_steps_per_s": 4765, "async2_steps_per_s": 6447}

(a quieter repeat: bare 11.0k, sync 7.5k steps/s). MuJoCo's ``mj_step``
dominates both loops on 2 cores; the batched samplers' gain is one policy
call per time step for all episodes (see ``maml_tf/rl/sampler.py``).
"""

import argparse
import json
import time

import gymnasium
import numpy as np

from maml_tf.common import cpu

cpu.prefer_onednn()   # as benchmarks/__init__.py, for a run as a script

import maml_tf.rl  # noqa: F401  pylint: disable=unused-import
from maml_tf.rl import envs
from maml_tf.rl.sampler import NavigationSampler, VectorEnvSampler


def bare_loop(env_id: str, steps: int) -> float:
  """Steps/s of one gymnasium env with random actions (resets on the horizon)."""
  env = gymnasium.make(env_id)
  env.reset(seed=0)
  rng = np.random.default_rng(0)
  shape = env.action_space.shape
  start = time.perf_counter()
  for _ in range(steps):
    _, _, term, trunc, _ = env.step(rng.uniform(-1, 1, shape).astype(np.float32))
    if term or trunc:
      env.reset()
  return steps / (time.perf_counter() - start)


def batched(sampler, tasks: int, per_task: int) -> float:
  """Steps/s of ``sampler.sample`` with a numpy Gaussian policy (warm)."""
  rng = np.random.default_rng(0)
  task_list = sampler.sample_tasks(tasks, rng)
  act_dim = sampler.act_dim
  policy = lambda obs: (np.zeros(obs.shape[:2] + (act_dim,)),
                        np.zeros(obs.shape[:2] + (act_dim,)))
  sampler.sample(task_list, per_task, policy, rng)   # start the workers
  start = time.perf_counter()
  batch = sampler.sample(task_list, per_task, policy, rng)
  return batch.num_steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--envs", default="navigation,cheetah_dir")
  parser.add_argument("--tasks", type=int, default=40)
  parser.add_argument("--per_task", type=int, default=20)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--bare_steps", type=int, default=20000)
  args = parser.parse_args()
  for name in args.envs.split(","):
    env_id = envs.resolve_env_id(name)
    out = {"env": env_id, "tasks": args.tasks, "per_task": args.per_task,
           "bare_steps_per_s": round(bare_loop(env_id, args.bare_steps))}
    if envs.env_class(env_id) is envs.Navigation2DEnv:
      out["numpy_batched_steps_per_s"] = round(
          batched(NavigationSampler(), args.tasks, args.per_task))
    else:
      for workers in (0, args.workers):
        sampler = VectorEnvSampler(env_id, num_workers=workers)
        try:
          key = "sync_steps_per_s" if workers == 0 else f"async{workers}_steps_per_s"
          out[key] = round(batched(sampler, args.tasks, args.per_task))
        finally:
          sampler.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
