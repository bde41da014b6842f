"""Sinusoid regression (paper section 5.1): meta-train, baseline, evaluate.

``train_and_evaluate(SinusoidConfig(), workdir)`` meta-trains the 1-40-40-1
MLP with MAML, trains the paper's "pretrained" baseline (one network regressed
on all tasks), evaluates both as the paper's Table 2 (fine-tuning on K = 5, 10,
20 points; MSE after 0, 1, 5, 10 steps over >= 600 fresh tasks; mean and 95%
confidence interval), and writes ``results.json`` and ``sinusoid.png``.
"""

import dataclasses
import os
import time
from typing import Dict, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from maml_tf.core import distribute
from maml_tf.core import family
from maml_tf.core.learner import MAML
from maml_tf.models.mlp import mlp
from maml_tf.tasks import sinusoid as tasks
from maml_tf.training import config as config_lib
from maml_tf.common import results, run_config, stats
from maml_tf.training import loop


@dataclasses.dataclass
class SinusoidConfig:
  """Everything a sinusoid run needs; defaults are the paper's.

  Attributes:
    iterations: meta-iterations.
    meta_batch: tasks per meta-batch.
    k_shot: support points per task (K) during meta-training.
    k_query: query points per task during meta-training.
    inner_lr: inner step size alpha.
    inner_steps: inner gradient steps during meta-training.
    meta_lr: Adam step size beta of the outer loop.
    first_order: first-order MAML (no second derivatives).
    hidden: hidden layer widths of the MLP.
    init: weight initialisation: "glorot" (Keras) or "finn" (the paper
      code's truncated N(0, 0.01)).
    seed: seeds the weights and the task streams.
    eval_tasks: fresh test tasks per K of the final evaluation.
    eval_shots: the Ks of the final evaluation.
    eval_steps: inner step counts reported by the final evaluation.
    eval_query: query points per test task.
    eval_every: iterations between quick evaluations (0: none).
    baseline: also train and evaluate the "pretrained" baseline.
    baseline_iterations: its iterations (default: iterations).
    log_every: iterations between progress lines.
    checkpoint_every: iterations between checkpoints.
    resume: continue from the newest checkpoint of the run directory.
    eval_only: skip training; evaluate the newest checkpoint.
    pretrained: with eval_only, evaluate the shipped weights instead.
    plot: write sinusoid.png.
    distribute: "none", "mirrored" (the local devices) or "multi_worker"
      (the cluster in TF_CONFIG).
    algorithm: the learner of the family (maml, fomaml, metasgd, anil,
      mamlpp, reptile).
    meta_lr_schedule: "constant", "cosine" (meta_lr decayed to meta_lr/100
      over ``iterations``) or "auto" (cosine for mamlpp only).
    recompute: gradient checkpointing of the inner loop.
    steps_per_call: meta-steps per compiled call, tasks sampled in the
      graph (1: one call per step with numpy batches, another task stream).
    xla: XLA for the in-graph steps: "auto" (when the closed-form
      meta-gradient runs), "on" or "off".
  """
  iterations: int = 70000
  meta_batch: int = 25
  k_shot: int = 10
  k_query: int = 10
  inner_lr: float = 0.01
  inner_steps: int = 1
  meta_lr: float = 1e-3
  first_order: bool = False
  hidden: Tuple[int, ...] = (40, 40)
  init: str = "glorot"              # or "finn": N(0, 0.01) truncated, as his code
  seed: int = 0
  # Evaluation (Table 2): fresh tasks, shots, step counts, query points.
  eval_tasks: int = 600
  eval_shots: Tuple[int, ...] = (5, 10, 20)
  eval_steps: Tuple[int, ...] = (0, 1, 5, 10)
  eval_query: int = 100
  eval_every: int = 0               # iterations between quick evaluations
  baseline: bool = True             # also train and evaluate "pretrained"
  baseline_iterations: Optional[int] = None   # default: = iterations
  log_every: int = 1000
  checkpoint_every: int = 5000
  resume: bool = True
  eval_only: bool = False
  pretrained: bool = False          # with eval_only: the shipped weights
  plot: bool = True
  # Meta-batch split across replicas: "none", "mirrored" (the local
  # devices) or "multi_worker" (the cluster in TF_CONFIG); see
  # maml_tf.core.distribute. Evaluation and the baseline run on one device.
  distribute: str = "none"
  # Which learner of the family (maml_tf.core.family.ALGORITHMS).
  algorithm: str = "maml"
  meta_lr_schedule: str = "auto"    # constant | cosine | auto
  recompute: bool = False           # gradient checkpointing of the inner loop
  # Meta-steps per compiled call (MAML.train_steps), the tasks sampled in
  # the graph by tasks.batch_sampler; 1: one call per step with numpy
  # batches (tasks.sample_batch's stream, which differs from the in-graph
  # one).
  steps_per_call: int = 100
  # XLA for the in-graph steps (MAML's jit_compile): "auto" (when the
  # closed-form meta-gradient runs: the paper's MLP), "on" or "off". XLA
  # draws other tasks from the same seed than the graph executor.
  xla: str = "auto"

  def validate(self) -> "SinusoidConfig":
    positive = ("meta_batch", "k_shot", "k_query", "inner_steps", "eval_tasks",
                "eval_query", "log_every", "checkpoint_every", "steps_per_call")
    for name in positive:
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("iterations", "baseline_iterations"):
      if getattr(self, name) is not None and getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if not self.hidden or min(self.hidden) < 1:
      raise ValueError(f"hidden must list one or more layer widths >= 1, got "
                       f"{list(self.hidden)}")
    if self.pretrained and not self.eval_only:
      raise ValueError("pretrained=True evaluates shipped weights: it needs "
                       "eval_only=True (--pretrained --eval_only)")
    for name in ("inner_lr", "meta_lr"):
      if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got "
                         f"{getattr(self, name)}")
    if self.init not in ("glorot", "finn"):
      raise ValueError(f"init must be 'glorot' or 'finn', got {self.init!r}")
    if self.xla not in _XLA:
      raise ValueError(f"xla must be one of {sorted(_XLA)}, got {self.xla!r}")
    if not self.eval_shots or min(self.eval_shots) < 1:
      raise ValueError(f"eval_shots must be >= 1, got {self.eval_shots}")
    if not self.eval_steps or min(self.eval_steps) < 0:
      raise ValueError(f"eval_steps must be >= 0, got {self.eval_steps}")
    config_lib.check_learner_fields(self)
    return self


PRESETS: Dict[str, Dict] = {
    # The paper's configuration (section 5.1, appendix A.1).
    "paper": {},
    # `make demo`: a shortened end-to-end run (meta-training, baseline,
    # evaluation, plot).
    "demo": {"iterations": 20000, "log_every": 2000, "eval_tasks": 600},
    # A tiny run for tests and smoke checks.
    "smoke": {"iterations": 300, "log_every": 100, "checkpoint_every": 100,
              "eval_tasks": 50},
}


def make_config(preset: str = "paper", **overrides) -> SinusoidConfig:
  """A config from a preset name plus field overrides (``None`` = keep)."""
  return config_lib.from_preset(SinusoidConfig, PRESETS, preset, "sinusoid",
                                **overrides)


def _rng(seed: int, *stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, *stream])


_XLA = {"auto": None, "on": True, "off": False}


def build_maml(config: SinusoidConfig) -> MAML:
  keras.utils.set_random_seed(config.seed)
  model = mlp(1, 1, hidden=config.hidden, name="sinusoid_maml",
              init=config.init)
  return family.make_learner(
      config.algorithm, model, keras.losses.MeanSquaredError(),
      inner_lr=config.inner_lr, inner_steps=config.inner_steps,
      meta_lr=config.meta_lr, iterations=config.iterations,
      meta_lr_schedule=config.meta_lr_schedule,
      first_order=config.first_order, recompute=config.recompute,
      jit_compile=_XLA[config.xla])


def pretrain_baseline(config: SinusoidConfig, workdir: str,
                      log=print) -> MAML:
  """The paper's 'pretrained' baseline: one net regressed on all tasks.

  Each iteration regresses on ``meta_batch`` tasks x ``k_shot`` points with
  Adam. Returned wrapped in a :class:`MAML` (never meta-trained) so that it is
  fine-tuned and evaluated by exactly the same code as MAML.
  """
  keras.utils.set_random_seed(config.seed + 1)
  model = mlp(1, 1, hidden=config.hidden, name="sinusoid_pretrained",
              init=config.init)
  learner = MAML(model, keras.losses.MeanSquaredError(),
                 inner_lr=config.inner_lr,
                 meta_optimizer=keras.optimizers.Adam(config.meta_lr))
  iterations = (config.iterations if config.baseline_iterations is None
                else config.baseline_iterations)
  opt = learner.meta_optimizer
  variables = model.trainable_variables

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = learner.loss_fn(y, model(x, training=True))
    opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return {"loss": loss}      # the same names as MAML's (loss_*) runs

  class _Supervised:   # adapts the plain step to meta_train's interface
    def __init__(self):
      self.model, self.meta_optimizer = model, opt

    def train_step_tensors(self, xy):
      return step(*xy)

  n = config.meta_batch * config.k_shot
  loop.meta_train(
      _Supervised(),
      lambda i: tasks.sample_pooled(n, _rng(config.seed, 2, i),
                                    points_per_task=config.k_shot),
      iterations, os.path.join(workdir, "pretrained"),
      log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      resume=config.resume, log=lambda s: log("[pretrained] " + s))
  return learner


def evaluate_table(learner: MAML, config: SinusoidConfig,
                   seed_stream: int = 3) -> Dict[str, Dict]:
  """Table 2: MSE after each step count, per K, over fresh tasks (mean, CI)."""
  table = {}
  for k in config.eval_shots:
    batch, _ = tasks.sample_batch(config.eval_tasks, k, config.eval_query,
                                  _rng(config.seed, seed_stream, k))
    out = learner.evaluate(batch, steps=config.eval_steps, per_task=True)
    table[f"K={k}"] = {f"steps={s}": stats.mean_ci95(out["loss"][i])
                       for i, s in enumerate(config.eval_steps)}
  return table


def format_table(name: str, table: Dict) -> str:
  lines = []
  for k, row in table.items():
    # A mean far above the median means a few tasks diverged: say so.
    cells = "  ".join(
        f"{s}: {v['mean']:.3f}±{v['ci95']:.3f}" + (
            f" (median {v['median']:.3f})" if v["mean"] > 2 * v["median"]
            else "") for s, v in row.items())
    lines.append(f"{name:>10} {k:>5}  {cells}")
  return "\n".join(lines)


def train_and_evaluate(config: SinusoidConfig, workdir: str,
                       log=print) -> Dict:
  """Meta-trains (unless ``eval_only``), evaluates, writes results and plot.

  Arguments:
    config: a :class:`SinusoidConfig`.
    workdir: output folder (checkpoints, TensorBoard, results.json, PNG).
    log: where progress lines go.

  Returns:
    The results dictionary also written to ``workdir/results.json``.

  Example:
    >>> results = train_and_evaluate(make_config("smoke"), "/tmp/sin")
    >>> results["maml"]["K=5"]["steps=1"]["mean"]
  """
  config.validate()
  strategy = distribute.make_strategy(config.distribute)   # before any TF op
  workdir = distribute.worker_workdir(workdir, strategy)
  runs = ("maml", "pretrained")     # each network's own outputs
  results.check_writable(
      workdir, ("results.json", "sinusoid.png", "config.json") + tuple(
          f"{r}/train_log.jsonl" for r in runs),
      runs + tuple(f"{r}/{d}" for r in runs
                   for d in ("checkpoints", "tensorboard")))
  changes = run_config.check_resume(config, workdir, log,
                                     config_lib.fixed_on_resume(config))
  t0 = time.perf_counter()
  with strategy.scope():
    learner = build_maml(config)
  maml_dir = os.path.join(workdir, "maml")
  fixed_eval, _ = tasks.sample_batch(100, config.k_shot, config.eval_query,
                                     _rng(config.seed, 4))

  def quick_eval(step):
    out = learner.evaluate(fixed_eval, steps=(0, config.inner_steps))
    return {"val_loss_before": float(out["loss"][0]),
            "val_loss": float(out["loss"][1])}

  timing = {}
  if config.pretrained:
    from maml_tf.models import pretrained  # pylint: disable=g-import-not-at-top
    pretrained.load_into(learner, "sinusoid")
    done = int(pretrained.card("sinusoid")["iterations"])
    log(f"evaluating the shipped weights 'sinusoid' ({done} "
        "meta-iterations)")
  elif config.eval_only:
    ckpt, manager, step = loop.make_checkpoint(learner, maml_dir)
    if not loop.restore_latest(ckpt, manager, log):
      raise FileNotFoundError(
          f"eval_only: no checkpoint under {maml_dir}/checkpoints; train first")
    done = int(step.numpy())
  else:
    done = loop.meta_train(
        distribute.distributed_learner(learner, strategy),
        lambda i: tasks.sample_batch(config.meta_batch, config.k_shot,
                                     config.k_query, _rng(config.seed, 1, i))[0],
        config.iterations, maml_dir, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, resume=config.resume,
        eval_fn=quick_eval, eval_every=config.eval_every, log=log,
        graph_sampler=tasks.batch_sampler(config.meta_batch, config.k_shot,
                                          config.k_query, seed=config.seed),
        steps_per_call=config.steps_per_call, timing=timing)
  train_seconds = time.perf_counter() - t0
  out = {"config": dataclasses.asdict(config), "config_changes": changes,
         "iterations": done,     # of the weights evaluated
         "train_seconds": train_seconds,
         # Without compilation and evaluation (training.loop.meta_train).
         "timing": timing,
         "seconds_per_iteration": (
             timing["train_seconds"] / timing["timed_steps"]
             if timing.get("timed_steps") else None),
         "maml": evaluate_table(learner, config)}
  if config.eval_only and not config.pretrained:   # how the run trained
    out.update(results.previous_training(os.path.join(workdir,
                                                      "results.json")))
  log("MSE on fresh tasks (mean ± 95% CI; the median too where a few tasks "
      "diverge):")
  log(format_table(config.algorithm.upper(), out["maml"]))
  baseline = None
  if config.baseline and not config.pretrained:
    if config.eval_only:
      baseline = MAML(mlp(1, 1, hidden=config.hidden, init=config.init), "mse",
                      inner_lr=config.inner_lr)
      bckpt, bmanager, _ = loop.make_checkpoint(
          baseline, os.path.join(workdir, "pretrained"))
      if not loop.restore_latest(bckpt, bmanager, log):
        baseline = None
    else:
      baseline = pretrain_baseline(config, workdir, log)
    if baseline is not None:
      out["pretrained"] = evaluate_table(baseline, config)
      log(format_table("pretrained", out["pretrained"]))
  k = min(config.eval_shots)
  s1 = 1 if 1 in config.eval_steps else max(config.eval_steps)
  log(f"pre-update MSE (K={k}): {out['maml'][f'K={k}']['steps=0']['mean']:.3f}"
      f"  post-update ({s1} step): "
      f"{out['maml'][f'K={k}'][f'steps={s1}']['mean']:.3f}")
  if config.plot:
    from maml_tf.training import plots  # pylint: disable=g-import-not-at-top
    path = results.try_figure(plots.sinusoid_figure, log, learner, baseline,
                              config, os.path.join(workdir, "sinusoid.png"))
    out["plot"] = path
    if path:
      log(f"wrote {path}")
  out["total_seconds"] = time.perf_counter() - t0
  loop.write_run_summary(
      maml_dir, config,
      {f"loss_{k.replace('=', '')}_after_{st.split('=')[1]}_steps":
       float(v["mean"])
       for k, row in out["maml"].items() for st, v in row.items()},
      done)
  out["environment"] = results.environment()
  results.write_json(os.path.join(workdir, "results.json"), out)
  log(f"wrote {os.path.join(workdir, 'results.json')}")
  return out
