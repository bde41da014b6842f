"""Meta-training and evaluation of the paper's RL comparisons (§5.3, Fig. 5).

``train_and_evaluate(config, workdir)`` runs one method:

* ``maml``: MAML-TRPO (one REINFORCE inner step, TRPO meta-step);
* ``pretrained``: one policy trained with TRPO on the mixture of tasks
  (no inner step during training), then fine-tuned at test time;
* ``random``: no training, fine-tuning from a random initialisation;
* ``oracle``: TRPO with the task parameters appended to the observation.

Evaluation: ``eval_tasks`` (40) fixed test tasks, ``eval_batch_size``
(default ``fast_batch_size``) episodes per task, mean undiscounted return
after 0, 1, 2, 3 REINFORCE steps (step size ``fast_lr`` for the first,
``fast_lr / 2`` after, as the paper; the oracle is evaluated without
fine-tuning, a constant line as in Fig. 5). The paper's navigation scripts
used ``fast_lr=0.5`` and 40 episodes (its text says 0.1; see the README).

Outputs in ``workdir``: ``results.json``, TensorBoard summaries
(``tf.summary``), checkpoints (``ckpt/``, resumed when ``resume=True``),
``train_history.json`` (per iteration: returns, TRPO statistics, seconds of
sampling and of the meta-step, periodic test returns), ``returns.png``:
return vs number of gradient steps for this run and every sibling run
(``workdir/../*/results.json`` of the same environment), like the paper's
Figure 5, and ``training_curve.png`` (:func:`plot_training_curve`) when the
run has a training history.

Example:
  >>> config = RLConfig(env="navigation", algorithm="maml", iterations=100)
  >>> results = train_and_evaluate(config, "runs/rl/navigation/maml")
  >>> results["eval"]["returns"]          # [R_0, R_1, R_2, R_3]
"""

import dataclasses
import glob
import json
import math
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from maml_tf.rl import envs
from maml_tf.rl.baseline import process_trajectories
from maml_tf.rl.maml_trpo import MAMLTRPO, check_settings
from maml_tf.rl.policy import build_gaussian_mlp_policy
from maml_tf.rl.sampler import make_sampler
from maml_tf.common import interrupts
from maml_tf.common import run_config
from maml_tf.training import loop
from maml_tf.common.progress import format_speed
from maml_tf.common.results import (check_writable, environment, try_figure,
                                    write_json)

ALGORITHMS = ("maml", "pretrained", "random", "oracle")


@dataclasses.dataclass
class RLConfig:
  """Hyper-parameters of a meta-RL run (defaults: the paper's).

  Attributes:
    env: short name (``navigation``, ``cheetah_vel``, ``cheetah_dir``,
      ``ant_vel``, ``ant_dir``) or registered id.
    algorithm: one of ``maml``, ``pretrained``, ``random``, ``oracle``.
    iterations: meta-iterations (TRPO steps).
    meta_batch: tasks per iteration (None: 20 for navigation, 40 otherwise).
    fast_batch_size: episodes per task per sampling round.
    fast_lr: inner step size alpha.
    max_kl: TRPO trust region.
    horizon: episode length (None: 100 navigation, 200 locomotion).
    gamma: discount factor of the advantages, in (0, 1].
    gae_lambda: GAE's lambda, in [0, 1] (1: Monte-Carlo returns minus the
      linear baseline, as the paper).
    first_order: first-order MAML.
    hvp_method: ``gauss_newton`` or ``exact`` (see ``MAMLTRPO``).
    cg_iters: TRPO's conjugate-gradient iterations (>= 1).
    cg_damping: TRPO's damping added to each Fisher-vector product (>= 0).
    ls_max_steps: TRPO's backtracking line-search steps (>= 1).
    ls_backtrack_ratio: TRPO's line-search shrink factor, in (0, 1).
    hidden_sizes: units of the policy MLP's hidden layers (each >= 1).
    num_workers: sampler processes for MuJoCo (0: in-process).
    eval_tasks: number of test tasks.
    eval_batch_size: episodes per test task per step (None: the training
      ``fast_batch_size``; the paper's test scripts sampled 40).
    eval_grad_steps: evaluate after 0..eval_grad_steps steps.
    eval_every: also evaluate every this many iterations (0: only at end).
    checkpoint_every: save a checkpoint every this many iterations.
    checkpoint_seconds: also save one when this many seconds passed since
      the last (long MuJoCo iterations).
    resume: restore the latest checkpoint of ``workdir``.
    eval_only: skip training; evaluate the newest checkpoint of ``workdir``
      (or, with ``pretrained``, the shipped meta-policy).
    pretrained: start from the shipped meta-policy of ``env``
      (:mod:`maml_tf.models.pretrained`, named by the environment's short
      name): with ``eval_only``, evaluate it with this config's step sizes
      and test batch (:func:`shipped_config` gives the ones it was trained
      and scored with); otherwise continue meta-training from it up to
      ``iterations``, counting from the card's (a workdir that already
      holds a checkpoint resumes from that instead). Needs
      ``algorithm="maml"``.
    seed: seeds the policy, task and noise generators.
  """
  env: str = "navigation"
  algorithm: str = "maml"
  iterations: int = 100
  meta_batch: Optional[int] = None
  fast_batch_size: int = 20
  fast_lr: float = 0.1
  max_kl: float = 0.01
  horizon: Optional[int] = None
  gamma: float = 0.99
  gae_lambda: float = 1.0
  first_order: bool = False
  hvp_method: str = "gauss_newton"
  cg_iters: int = 10
  cg_damping: float = 1e-5
  ls_max_steps: int = 15
  ls_backtrack_ratio: float = 0.8
  hidden_sizes: Tuple[int, ...] = (100, 100)
  num_workers: int = 2
  eval_tasks: int = 40
  eval_batch_size: Optional[int] = None
  eval_grad_steps: int = 3
  eval_every: int = 0
  checkpoint_every: int = 10
  checkpoint_seconds: float = 600.0
  resume: bool = True
  eval_only: bool = False
  pretrained: bool = False
  seed: int = 0

  def __post_init__(self):
    self.env = envs.resolve_env_id(self.env)
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"algorithm must be one of {ALGORITHMS}; got "
                       f"{self.algorithm!r}")
    if self.meta_batch is None:
      self.meta_batch = 20 if self.env == "maml_tf/Navigation2D-v0" else 40
    if self.horizon is None:
      self.horizon = envs.default_horizon(self.env)
    if self.eval_batch_size is None:
      self.eval_batch_size = self.fast_batch_size
    self.hidden_sizes = tuple(int(h) for h in self.hidden_sizes)
    for name in ("iterations", "eval_grad_steps", "eval_every",
                 "checkpoint_every", "num_workers"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
    for name in ("meta_batch", "fast_batch_size", "horizon", "eval_tasks",
                 "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
    if any(h < 1 for h in self.hidden_sizes):
      raise ValueError(f"hidden_sizes must be positive layer widths; got "
                       f"{list(self.hidden_sizes)}")
    for name, lo, hi, closed_lo in (("gamma", 0.0, 1.0, False),
                                    ("gae_lambda", 0.0, 1.0, True)):
      value = float(getattr(self, name))
      if not (value <= hi and (value >= lo if closed_lo else value > lo)):
        raise ValueError(f"{name} must be in {'[' if closed_lo else '('}"
                         f"{lo:g}, {hi:g}]; got {value}")
    if not (math.isfinite(float(self.checkpoint_seconds))
            and self.checkpoint_seconds > 0):
      raise ValueError(f"checkpoint_seconds must be a finite number > 0; got "
                       f"{self.checkpoint_seconds}")
    check_settings(self.fast_lr, self.max_kl, self.cg_iters, self.cg_damping,
                   self.ls_max_steps, self.ls_backtrack_ratio,
                   self.hvp_method)
    if self.pretrained and not (self.eval_only or self.resume):
      raise ValueError("pretrained=True without eval_only continues "
                       "meta-training from the shipped meta-policy through a "
                       "checkpoint: it needs resume=True")
    if self.pretrained and self.algorithm != "maml":
      raise ValueError("the shipped policies are MAML's: pretrained=True "
                       f"needs algorithm='maml', not {self.algorithm!r} (the "
                       "'pretrained' algorithm is the paper's baseline, "
                       "trained here)")

  @property
  def eval_lrs(self) -> List[float]:
    """Step sizes of the evaluation's gradient steps (alpha, alpha/2, ...).

    The oracle is not fine-tuned (step size 0: the paper plots it as a
    constant); REINFORCE steps on its near-deterministic policy diverge.
    """
    if self.algorithm == "oracle":
      return [0.0] * self.eval_grad_steps
    return ([self.fast_lr] + [self.fast_lr / 2] * (self.eval_grad_steps - 1)
            )[:self.eval_grad_steps]


def make_config(preset: str, **overrides) -> RLConfig:
  """The config of a shipped setting: ``preset`` is the environment's
  short name, ``overrides`` the card's fields (see
  :mod:`maml_tf.models.pretrained`)."""
  return RLConfig(**{"env": preset, **overrides})


def shipped_config(env: str, **given) -> RLConfig:
  """The config that evaluates the meta-policy shipped for ``env``.

  The settings it was trained and scored with (its card's overrides: step
  size, test batch, ...), then ``given`` on top (what a user set), with
  ``pretrained`` and ``eval_only`` on unless ``given`` says otherwise.

  Raises:
    ValueError: no meta-policy is shipped for ``env`` (names those that are).

  Example:
    >>> shipped_config("navigation").fast_lr          # the card's 0.5
    >>> shipped_config("navigation", eval_tasks=10)
  """
  from maml_tf.models import pretrained  # pylint: disable=g-import-not-at-top
  name = envs.short_name(env)
  if name not in pretrained.available("rl"):
    raise ValueError(f"no meta-policy is shipped for env={name!r}; shipped: "
                     f"{pretrained.available('rl') or 'none'}")
  return make_config(name, **{**pretrained.card(name)["overrides"],
                              "pretrained": True, "eval_only": True, **given})


def build_learner(config: RLConfig, obs_dim: Optional[int] = None,
                  act_dim: Optional[int] = None) -> MAMLTRPO:
  """A fresh policy and its :class:`MAMLTRPO` learner for ``config``.

  ``obs_dim`` and ``act_dim`` default to the environment's
  (:func:`maml_tf.rl.envs.policy_dims`).
  """
  if obs_dim is None or act_dim is None:
    obs_dim, act_dim = envs.policy_dims(config.env,
                                        config.algorithm == "oracle")
  policy = build_gaussian_mlp_policy(obs_dim, act_dim, config.hidden_sizes,
                                     seed=config.seed)
  return MAMLTRPO(policy, fast_lr=config.fast_lr, max_kl=config.max_kl,
                  cg_iters=config.cg_iters, cg_damping=config.cg_damping,
                  ls_max_steps=config.ls_max_steps,
                  ls_backtrack_ratio=config.ls_backtrack_ratio,
                  first_order=config.first_order,
                  hvp_method=config.hvp_method)


def evaluate_adaptation(learner: MAMLTRPO, sampler, tasks: Sequence[Dict],
                        episodes: int, lrs: Sequence[float],
                        rng: np.random.Generator, gamma: float = 0.99,
                        gae_lambda: float = 1.0) -> Dict:
  """Mean return on ``tasks`` after 0, 1, ..., ``len(lrs)`` REINFORCE steps.

  Arguments:
    learner: holds the policy's current (meta-)weights.
    sampler: a sampler (see ``maml_tf.rl.sampler``).
    tasks: test tasks.
    episodes: episodes per task per step.
    lrs: one step size per gradient step.
    rng: noise generator.

  Returns:
    ``{"returns": [...], "stderr": [...], "per_task": [[...], ...]}``: mean
    over tasks and episodes, standard error over tasks (NaN for one task),
    per-task means. A step of size 0 leaves the policy unchanged and repeats
    the previous measurement.

  Example:
    >>> evaluate_adaptation(learner, sampler, tasks, 20, [0.1, 0.05, 0.05], rng)
  """
  stacked = learner.stacked_params(len(tasks))
  returns, stderr, per_task = [], [], []
  for step in range(len(lrs) + 1):
    if step and lrs[step - 1] == 0:
      # A zero step leaves the policy as it was: its measurement stands
      # (the oracle's constant line), no fresh sample.
      returns.append(returns[-1])
      stderr.append(stderr[-1])
      per_task.append(per_task[-1])
    else:
      batch = sampler.sample(tasks, episodes, learner.policy_fn(stacked), rng)
      task_returns = batch.returns.mean(axis=1)
      returns.append(float(task_returns.mean()))
      stderr.append(float(task_returns.std() / np.sqrt(len(tasks)))
                    if len(tasks) > 1 else float("nan"))
      per_task.append(task_returns.tolist())
    if step < len(lrs) and lrs[step] != 0:
      data = learner.make_data(batch, process_trajectories(batch, gamma,
                                                           gae_lambda))
      stacked = learner.adapt(stacked, data, lrs[step])
  return {"returns": returns, "stderr": stderr, "per_task": per_task}


def plot_returns(results: Dict[str, Dict], path: str, title: str = "") -> str:
  """Return vs number of gradient steps per method (like the paper's Fig. 5).

  Arguments:
    results: ``{method: {"returns": [...], "stderr": [...]}}``.
    path: output PNG.
    title: plot title.

  Example:
    >>> plot_returns({"maml": {"returns": [-40, -12, -4, -3]}}, "fig5.png")
  """
  from maml_tf.training import plots  # pylint: disable=g-import-not-at-top
  plt = plots.plt
  styles = {"maml": ("MAML (ours)", "tab:red"),
            "pretrained": ("pretrained", "tab:blue"),
            "random": ("random", "tab:green"),
            "oracle": ("oracle", "gray")}
  fig, ax = plt.subplots(figsize=(4.5, 3.5))
  for method, res in sorted(results.items()):
    label, color = styles.get(method, (method, None))
    y = np.asarray(res["returns"])
    x = np.arange(len(y))
    style = "--" if method == "oracle" else "-"
    ax.plot(x, y, style, marker="o", label=label, color=color)
    if res.get("stderr"):
      se = np.asarray(res["stderr"], dtype=float)   # null (one task): NaN
      ax.fill_between(x, y - se, y + se, alpha=0.2, color=color)
  ax.set_xticks(range(max(len(r["returns"]) for r in results.values())))
  return plots.save_figure(fig, ax, path, "number of gradient steps",
                           "average return", title, dpi=120)


def plot_training_curve(history: Sequence[Dict], path: str, title: str = "",
                        window: int = 20) -> str:
  """Training returns against meta-iteration, with the periodic test returns.

  Draws each iteration's pre- and post-update training return (faint) and
  their moving averages over ``window`` iterations, and, where the history
  holds them (``eval_every``), the test returns after 0 and 1 steps as
  markers.

  Arguments:
    history: ``train_history.json`` records (``iteration``, ``pre_return``,
      optional ``post_return`` and ``eval_returns``).
    path: output PNG.
    title: plot title.
    window: moving-average length (shorter histories use their length).

  Example:
    >>> plot_training_curve(json.load(open("run/train_history.json")), "c.png")
  """
  from maml_tf.training import plots  # pylint: disable=g-import-not-at-top
  plt = plots.plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  x = np.asarray([h["iteration"] + 1 for h in history])
  for key, label, color in (("pre_return", "training, before the step",
                             "tab:blue"),
                            ("post_return", "training, after 1 step",
                             "tab:red")):
    y = np.asarray([h.get(key, np.nan) for h in history], dtype=float)
    if np.all(np.isnan(y)):
      continue
    ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
    w = max(1, min(window, len(y)))
    smooth = np.convolve(y, np.ones(w) / w, mode="valid")
    ax.plot(x[w - 1:], smooth, color=color, lw=1.8,
            label=f"{label} ({w}-iteration mean)")
  evals = [(h["iteration"] + 1, h["eval_returns"]) for h in history
           if h.get("eval_returns")]
  if evals:
    ex = [e[0] for e in evals]
    ax.plot(ex, [e[1][0] for e in evals], "o", mfc="white", color="tab:blue",
            label="test, before the step")
    if len(evals[0][1]) > 1:
      ax.plot(ex, [e[1][1] for e in evals], "o", color="tab:red",
              label="test, after 1 step")
  return plots.save_figure(fig, ax, path, "meta-iteration", "average return",
                           title, legend_size=8)


def sibling_results(workdir: str, config: RLConfig) -> Dict[str, Dict]:
  """The evaluations to plot beside this run: one per method, comparable.

  Looks at the ``results.json`` of ``workdir``'s sibling directories and
  keeps runs of the same environment and seed. When several runs share a
  method (``maml/`` and ``maml_300/``), this run wins for its own method and
  otherwise the closest to this run's protocol: the same step size
  ``fast_lr`` first, then the same test batch, then the same number of
  iterations.
  """
  runs = []
  parent = os.path.dirname(os.path.abspath(workdir))
  for path in sorted(glob.glob(os.path.join(parent, "*", "results.json"))):
    if ".replaced-" in os.path.basename(os.path.dirname(path)):
      continue   # a run that --noresume moved aside
    try:
      with open(path) as f:
        res = json.load(f)
    except (OSError, ValueError):
      continue
    cfg = res.get("config", {})
    if (cfg.get("env") == config.env and cfg.get("seed") == config.seed
        and "eval" in res):
      own = os.path.abspath(os.path.dirname(path)) == os.path.abspath(workdir)
      rank = (not own, cfg.get("fast_lr") != config.fast_lr,
              cfg.get("eval_batch_size", cfg.get("fast_batch_size"))
              != config.eval_batch_size,
              cfg.get("iterations") != config.iterations)
      runs.append((rank, cfg.get("algorithm"), res["eval"]))
  out = {}
  for _, algorithm, ev in sorted(runs, key=lambda r: r[0]):
    out.setdefault(algorithm, ev)
  return out


def train_and_evaluate(config: RLConfig, workdir: str) -> Dict:
  """Trains ``config.algorithm`` and evaluates fast adaptation.

  Arguments:
    config: an :class:`RLConfig`.
    workdir: output directory (created); checkpoints resume from it.

  Returns:
    the contents of ``workdir/results.json``: ``config``, ``eval``
    (``returns`` after 0..3 steps, ``stderr``), ``train`` (per-iteration
    pre/post-update returns), ``iterations_per_second``, ``seconds``.

  Example:
    >>> train_and_evaluate(RLConfig(env="navigation", iterations=5), "/tmp/nav")
  """
  check_writable(workdir, ("results.json", "returns.png",
                           "training_curve.png", "train_history.json",
                           "config.json"), ("ckpt", "tb"))
  changes = run_config.check_resume(config, workdir, print)
  shipped = (_shipped_iterations(config)
             if config.pretrained and not config.eval_only else None)
  start_time = time.time()
  tf.random.set_seed(config.seed)
  oracle = config.algorithm == "oracle"
  sampler = make_sampler(config.env, horizon=config.horizon, oracle=oracle,
                         num_workers=config.num_workers)
  try:
    learner = build_learner(config, sampler.obs_dim, sampler.act_dim)
    step = tf.Variable(0, dtype=tf.int64, name="step")
    ckpt = tf.train.Checkpoint(step=step, policy=learner.policy)
    manager = tf.train.CheckpointManager(
        ckpt, os.path.join(workdir, "ckpt"), max_to_keep=2, step_counter=step)
    history = []
    history_path = os.path.join(workdir, "train_history.json")
    if shipped is not None and not manager.latest_checkpoint:
      _start_from_shipped(config, learner, manager, step, shipped)
    if config.pretrained and config.eval_only:
      from maml_tf.models import pretrained  # pylint: disable=g-import-not-at-top
      name = envs.short_name(config.env)
      pretrained.load_into(learner, name)
      step.assign(int(pretrained.card(name)["iterations"]))
      print(f"[rl] evaluating the shipped meta-policy {name!r} "
            f"({int(step)} meta-iterations)", flush=True)
    elif (config.resume or config.eval_only) and manager.latest_checkpoint:
      loop.restore_latest(   # a checkpoint of another policy: one clear line
          ckpt, manager,
          lambda m: None if m.startswith("resumed") else print(f"[rl] {m}"))
      if os.path.exists(history_path):
        with open(history_path) as f:
          history = [h for h in json.load(f) if h["iteration"] < int(step)]
      print(f"[rl] {'evaluating' if config.eval_only else 'resumed'} "
            f"{config.algorithm} from {manager.latest_checkpoint} "
            f"at iteration {int(step)}", flush=True)
    elif config.eval_only:
      raise FileNotFoundError(
          f"eval_only: no checkpoint under {workdir}/ckpt; train first (or "
          "pass pretrained=True / --pretrained for the shipped meta-policy)")
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tb"))
    eval_tasks = sampler.sample_tasks(
        config.eval_tasks, np.random.default_rng([config.seed, 999_999]))
    iterations = (0 if config.algorithm == "random" or config.eval_only
                  else config.iterations)
    train_start, first = time.perf_counter(), int(step)
    rejected = 0   # consecutive iterations whose line search took no step
    first_done = train_start
    last_save = time.time()

    def save(force: bool = False):
      """At multiples of checkpoint_every, every checkpoint_seconds, or
      when forced."""
      nonlocal last_save
      due = (time.time() - last_save >= config.checkpoint_seconds
             or int(step) % max(config.checkpoint_every, 1) == 0)
      if force or due:
        manager.save(checkpoint_number=step, check_interval=False)
        write_json(history_path, history)
        last_save = time.time()

    # SIGTERM and the first Ctrl-C stop after the iteration in progress,
    # with a checkpoint; a second Ctrl-C stops at once, with the checkpoint
    # of the last finished iteration.
    if int(step) < iterations:
      print("[rl] the first iteration traces the adaptation and the "
            "meta-step (compilation) ...", flush=True)
    with interrupts.StopRequest(sigint=True) as stop:
      try:
        while int(step) < iterations:
          it = int(step)
          rng = np.random.default_rng([config.seed, it])
          stats = _train_iteration(config, learner, sampler, rng)
          _check_finite(stats, learner, config, it)
          rejected = 0 if stats.get("accepted", 1.0) else rejected + 1
          if rejected == _REJECTED_WARNING:
            print(f"[rl] warning: TRPO's line search has accepted no step "
                  f"for {rejected} iterations, so the policy is not "
                  f"changing (max_kl={config.max_kl}, cg_iters="
                  f"{config.cg_iters}, ls_max_steps={config.ls_max_steps}, "
                  f"ls_backtrack_ratio={config.ls_backtrack_ratio})",
                  flush=True)
          step.assign_add(1)
          done, now = int(step) - first, time.perf_counter()
          if done == 1:         # this process's first: it traced the steps
            rate, first_done = 1 / max(now - train_start, 1e-9), now
          else:
            rate = (done - 1) / max(now - first_done, 1e-9)
          stats.update(iteration=it, iterations_per_second=rate)
          history.append(stats)
          with writer.as_default(step=it):
            for key, value in stats.items():
              if key != "iteration":
                tf.summary.scalar(f"train/{key}", value)
          post = stats.get("post_return")
          print(f"[rl] {config.algorithm} {it + 1}/{iterations} "
                f"pre {stats['pre_return']:.2f}"
                + (f" post {post:.2f}" if post is not None else "")
                + f" kl {stats['kl']:.4f} ls {int(stats['ls_steps'])} "
                + format_speed(rate, time.perf_counter() - train_start,
                               iterations - int(step))
                + (" (the first iteration traces the steps: later ones "
                   "are faster)" if done == 1 and iterations - int(step)
                   else ""), flush=True)
          if config.eval_every and int(step) % config.eval_every == 0:
            ev = evaluate_adaptation(
                learner, sampler, eval_tasks, config.eval_batch_size,
                config.eval_lrs,
                np.random.default_rng([config.seed, 10 ** 6, it]),
                config.gamma, config.gae_lambda)
            with writer.as_default(step=it):
              for k, r in enumerate(ev["returns"]):
                tf.summary.scalar(f"eval/return_after_{k}_steps", r)
            stats["eval_returns"] = ev["returns"]   # kept in the history
            print(f"[rl] test returns after 0..{config.eval_grad_steps} "
                  f"steps at iteration {int(step)}: "
                  + " / ".join(f"{r:.2f}" for r in ev["returns"]), flush=True)
          save()
          if stop.requested:
            save(force=True)
            print(f"[rl] stopped: saved a checkpoint at iteration "
                  f"{int(step)}", flush=True)
            raise interrupts.Interrupted(int(step))
      except interrupts.Interrupted:
        raise
      except KeyboardInterrupt:
        if manager.latest_checkpoint is None:
          raise   # nothing saved yet: the launcher says so in one line
        saved = int(manager.latest_checkpoint.rsplit("-", 1)[-1])
        print(f"[rl] interrupted: the checkpoint of iteration {saved} is "
              "kept", flush=True)
        raise interrupts.Interrupted(saved) from None
    if not config.eval_only:
      manager.save(checkpoint_number=step, check_interval=False)
      write_json(history_path, history)
    ev = evaluate_adaptation(learner, sampler, eval_tasks,
                             config.eval_batch_size, config.eval_lrs,
                             np.random.default_rng([config.seed, 10 ** 6]),
                             config.gamma, config.gae_lambda)
    with writer.as_default(step=int(step)):
      for k, r in enumerate(ev["returns"]):
        tf.summary.scalar(f"eval/return_after_{k}_steps", r)
    writer.flush()
    rates = [h["iterations_per_second"] for h in history[-1:]]
    results = {
        "config": dataclasses.asdict(config), "config_changes": changes,
        "iterations": int(step),
        # per_task[k][i]: test task i's mean return after k steps; the test
        # tasks depend on the seed only, so methods pair up task by task.
        "eval": {"returns": ev["returns"], "stderr": ev["stderr"],
                 "lrs": config.eval_lrs, "per_task": ev["per_task"]},
        "train": [{k: h[k] for k in ("iteration", "pre_return", "post_return")
                   if k in h} for h in history],
        "iterations_per_second": rates[0] if rates else None,
        "seconds": time.time() - start_time,
        "tracing_counts": learner.tracing_counts(),
    }
    results["environment"] = environment()
    write_json(os.path.join(workdir, "results.json"), results)
    tasks = (f"{config.eval_tasks} test tasks, 95% intervals"
             if config.eval_tasks > 1 else "1 test task, no interval")
    print(f"[rl] {config.algorithm} eval returns after 0..{config.eval_grad_steps}"
          f" steps ({tasks}): "
          + " / ".join(f"{r:.2f}" + (f" ± {1.96 * e:.2f}"
                                     if math.isfinite(e) else "")
                       for r, e in zip(ev["returns"], ev["stderr"])),
          flush=True)
    log = lambda m: print(f"[rl] {m}", flush=True)
    try_figure(plot_returns, log, sibling_results(workdir, config),
               os.path.join(workdir, "returns.png"),
               title=config.env.split("/")[-1])
    if history:
      try_figure(plot_training_curve, log, history,
                 os.path.join(workdir, "training_curve.png"),
                 title=f"{envs.short_name(config.env)}, {config.algorithm}")
    return results
  finally:
    sampler.close()


_REJECTED_WARNING = 10   # consecutive rejected TRPO steps before a warning


class NothingToTrainError(interrupts.UserFacingError, ValueError):
  """A continuation of a shipped meta-policy asked for no more iterations
  than it has."""


def _shipped_iterations(config: RLConfig) -> int:
  """The iterations of the meta-policy shipped for ``config.env``, which a
  continuation (``pretrained`` without ``eval_only``) must exceed."""
  from maml_tf.models import pretrained  # pylint: disable=g-import-not-at-top
  name = envs.short_name(config.env)
  shipped = int(pretrained.card(name)["iterations"])
  if config.iterations <= shipped:
    raise NothingToTrainError(
        f"pretrained=True continues meta-training from the shipped "
        f"{name!r} policy's {shipped} iterations: iterations must be above "
        f"that, got {config.iterations} (eval_only=True evaluates it as "
        "shipped)")
  return shipped


def _start_from_shipped(config: RLConfig, learner: MAMLTRPO, manager,
                        step: tf.Variable, shipped: int) -> None:
  """Seeds the run's checkpoints with the shipped meta-policy of
  ``config.env`` as the checkpoint of its ``shipped`` iterations.

  TRPO keeps no state beyond the policy and each iteration draws its tasks
  and noise from ``(seed, iteration)``, so the continuation is the run the
  card describes, carried on.
  """
  from maml_tf.models import pretrained  # pylint: disable=g-import-not-at-top
  name = envs.short_name(config.env)
  pretrained.load_into(learner, name)
  step.assign(shipped)
  path = manager.save(checkpoint_number=step, check_interval=False)
  print(f"[rl] starting from the shipped meta-policy {name!r} at iteration "
        f"{shipped} ({path})", flush=True)


class NonFiniteError(interrupts.UserFacingError, FloatingPointError):
  """A meta-iteration produced NaN or infinite returns or weights."""


def _check_finite(stats: Dict[str, float], learner: MAMLTRPO,
                  config: RLConfig, iteration: int) -> None:
  """Stops the run before a non-finite iteration is checkpointed."""
  bad = [k for k in ("pre_return", "post_return") if k in stats
         and not math.isfinite(stats[k])]
  if not all(np.isfinite(v.numpy()).all()
             for v in learner.policy.trainable_variables):
    bad.append("the policy's weights")
  if bad:
    cause = ("the adapted policy's return" if bad == ["post_return"] else
             " and ".join(bad))
    raise NonFiniteError(
        f"meta-iteration {iteration} produced non-finite values in {cause} "
        f"(fast_lr={config.fast_lr}, max_kl={config.max_kl}): a smaller "
        "step size usually cures this; the last checkpoint (if any) is kept")


def _train_iteration(config: RLConfig, learner: MAMLTRPO, sampler,
                     rng: np.random.Generator) -> Dict[str, float]:
  """Samples a meta-batch and takes one TRPO (meta-)step."""
  tasks = sampler.sample_tasks(config.meta_batch, rng)
  stacked = learner.stacked_params(config.meta_batch)
  t0 = time.perf_counter()
  pre = sampler.sample(tasks, config.fast_batch_size,
                       learner.policy_fn(stacked), rng)
  sampling = time.perf_counter() - t0
  pre_data = learner.make_data(
      pre, process_trajectories(pre, config.gamma, config.gae_lambda))
  out = {"pre_return": float(pre.returns.mean())}
  if config.algorithm == "maml":
    adapted = learner.adapt(stacked, pre_data)
    t0 = time.perf_counter()
    post = sampler.sample(tasks, config.fast_batch_size,
                          learner.policy_fn(adapted), rng)
    sampling += time.perf_counter() - t0
    post_data = learner.make_data(
        post, process_trajectories(post, config.gamma, config.gae_lambda))
    out["post_return"] = float(post.returns.mean())
    t0 = time.perf_counter()
    stats = learner.meta_step([pre_data], post_data)
  else:
    t0 = time.perf_counter()
    stats = learner.meta_step([], pre_data)
  out.update(stats)
  out["sampling_seconds"] = sampling
  out["meta_step_seconds"] = time.perf_counter() - t0
  return out
