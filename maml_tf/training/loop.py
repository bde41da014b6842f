"""The meta-training loop: checkpoints that resume, progress, summaries.

Every experiment family calls :func:`meta_train` with a :class:`maml_tf.MAML`
(or any object with ``train_step_tensors``, ``model`` and ``meta_optimizer``)
and a function that returns the meta-batch for an iteration number. Batches
are drawn as a pure function of the iteration number, so a resumed run sees
the same tasks as an uninterrupted one and ends with identical weights.

Files under ``workdir``:
  ``checkpoints/``   tf.train checkpoints (model, meta-optimizer, step).
  ``tensorboard/``   scalar summaries.
  ``train_log.jsonl`` one JSON object per logged iteration / evaluation.
"""

import inspect
import json
import os
import sys
import time
from typing import Callable, Dict, Optional

import numpy as np
import tensorflow as tf

from maml_tf.common import interrupts
from maml_tf.core import keras_compat
from maml_tf.common.progress import format_duration, format_speed


Interrupted = interrupts.Interrupted
exit_if_interrupted = interrupts.exit_if_interrupted


class CheckpointError(interrupts.UserFacingError, RuntimeError):
  """A run directory's checkpoints cannot be restored into this learner
  (another model or configuration, or every checkpoint unreadable)."""


def make_checkpoint(learner, workdir: str, max_to_keep: int = 3,
                    **extra) -> tuple:
  """``(checkpoint, manager, step_variable)`` for a learner under workdir."""
  step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
  items = (learner.checkpoint_items() if hasattr(learner, "checkpoint_items")
           else {"model": learner.model,
                 "meta_optimizer": learner.meta_optimizer})
  ckpt = tf.train.Checkpoint(step=step, **items, **extra)
  manager = tf.train.CheckpointManager(
      ckpt, os.path.join(workdir, "checkpoints"), max_to_keep=max_to_keep)
  return ckpt, manager, step


def seed_checkpoint(learner, workdir: str, step: int, log=print,
                    **extra) -> bool:
  """Writes the learner's current state as the checkpoint of ``step``.

  A run that starts from given weights (e.g. shipped ones) instead of the
  random initialisation calls this before :func:`meta_train`, which then
  resumes from it and continues the iteration count at ``step``. Nothing is
  written (False) when ``workdir`` already holds a checkpoint: a restarted
  run resumes from its own newest one.
  """
  ckpt, manager, step_var = make_checkpoint(learner, workdir, **extra)
  if manager.latest_checkpoint:
    return False
  step_var.assign(int(step))
  path = manager.save(checkpoint_number=int(step))
  log(f"starting from the given weights at iteration {int(step)} ({path})")
  return True


def restore_latest(ckpt, manager, log=print) -> bool:
  """Restores the newest readable checkpoint; True when one was restored.

  An unreadable checkpoint (truncated or corrupt files) is reported and the
  next older one is tried. A readable checkpoint of another model or
  configuration is an error (nothing older is tried: it would be the same).

  Raises:
    CheckpointError: (a ``RuntimeError``) in both cases, naming the
      checkpoint and what to do (the first line of TensorFlow's reason).
  """
  if not manager.checkpoints:
    return False
  unreadable = []
  for path in reversed(manager.checkpoints):
    status = None
    try:
      status = ckpt.restore(path)
      status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
      if status is not None:
        status.expect_partial()   # no warnings about it at exit
      else:                       # restore() itself raised
        keras_compat.quiet_failed_restores()
      first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
      raise CheckpointError(
          f"could not restore checkpoint {path} ({first}); it belongs to a "
          "different model or configuration. Use another --logdir or start "
          "afresh (--noresume).") from e
    except (tf.errors.OpError, IndexError, OSError) as e:
      log(f"checkpoint {path} is unreadable ({type(e).__name__}: "
          f"{str(e).splitlines()[0][:200]}); trying an older one")
      unreadable.append(path)
      continue
    log(f"resumed from {path}")
    return True
  raise CheckpointError(
      f"no readable checkpoint under {manager.directory}: "
      f"{', '.join(unreadable)} are all unreadable. Use another --logdir or "
      "start afresh (--noresume).")


def _accepts(fn, name: str) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


_METRIC_ORDER = ("loss_after", "accuracy_after", "loss_before",
                 "accuracy_before", "meta_loss")


def _metric_key(name: str):
  """Progress lines list the metrics in :data:`_METRIC_ORDER`, then the
  others by name, whatever order a step returned them in."""
  known = name in _METRIC_ORDER
  return (0, _METRIC_ORDER.index(name), "") if known else (1, 0, name)


def _window_means(pending) -> Dict[str, float]:
  """Means of ``[(metrics, steps)]``, weighted by steps, per metric key
  (in the order of :func:`_metric_key`)."""
  sums, counts = {}, {}
  for metrics, n in pending:
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + float(v.numpy()) * n
      counts[k] = counts.get(k, 0) + n
  return {k: sums[k] / counts[k] for k in sorted(sums, key=_metric_key)}


class JsonlLog:
  """Appends one JSON object per line; readable with ``pandas.read_json(lines=True)``."""

  def __init__(self, path: str):
    self.path = path

  def write(self, record: Dict):
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def has(self, step: int, kind: str) -> bool:
    """Is there a record of ``kind`` at ``step``?"""
    if not os.path.exists(self.path):
      return False
    with open(self.path) as f:
      return any(r.get("step") == step and r.get("kind") == kind
                 for r in (json.loads(l) for l in f if l.strip()))

  def drop_after(self, step: int) -> int:
    """Removes the records of steps after ``step`` (written after the
    checkpoint a run resumes from, by the run that was killed); returns how
    many. The file is replaced atomically."""
    if not os.path.exists(self.path):
      return 0
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    keep = [l for l in lines if json.loads(l).get("step", 0) <= step]
    if len(keep) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)
    return len(lines) - len(keep)


def meta_train(learner, batch_for_step: Callable[[int], object],
               iterations: int, workdir: str, *, log_every: int = 100,
               checkpoint_every: int = 1000, resume: bool = True,
               eval_fn: Optional[Callable[[int], Dict[str, float]]] = None,
               eval_every: int = 0, log: Callable[[str], None] = print,
               extra_checkpoint: Optional[Dict] = None,
               graph_sampler: Optional[Callable] = None,
               steps_per_call: int = 1,
               timing: Optional[Dict[str, float]] = None) -> int:
  """Runs meta-training up to ``iterations`` meta-steps; returns the last step.

  Arguments:
    learner: a :class:`maml_tf.MAML`.
    batch_for_step: ``f(iteration) -> TaskBatch`` (pure in the iteration, so
      resuming reproduces the uninterrupted run).
    iterations: total meta-iterations (a resumed run continues up to it).
    workdir: where checkpoints, summaries and the log go.
    log_every: iterations between progress lines and summaries.
    checkpoint_every: iterations between checkpoints (and one at the end).
    resume: continue from the newest checkpoint in ``workdir`` if any.
    eval_fn: optional ``f(step) -> {name: float}`` run every ``eval_every``.
    eval_every: iterations between evaluations (0: never during training).
    log: where progress lines go.
    extra_checkpoint: more trackables to save (e.g. a learned step size).
    graph_sampler: optional in-graph ``iteration tensor -> TaskBatch`` (e.g.
      :func:`maml_tf.tasks.sinusoid.batch_sampler`); with
      ``steps_per_call > 1`` and a learner that has ``train_steps``, the
      meta-steps run ``steps_per_call`` at a time in one compiled call,
      sampling their batches in the graph (``batch_for_step`` is then
      unused). Calls end at every log, evaluation and checkpoint boundary.
    steps_per_call: meta-steps per compiled call (see ``graph_sampler``).
    timing: a dict this fills with ``compile_seconds`` (the first call),
      ``eval_seconds`` (the evaluations), ``train_seconds`` (the rest) and
      ``timed_steps`` (the steps after the first call); results files
      report ``train_seconds / timed_steps`` as seconds per iteration.

  The pre-update metrics (``loss_before``, ``accuracy_before``: one more
  query forward pass per task) are computed on the last step of each log
  window only, when the learner's ``train_step_tensors`` accepts
  ``pre_update_metrics``; with ``graph_sampler`` on every step, so that
  they are means over the same steps as the other metrics, which are means
  over the window.

  Example:
    >>> meta_train(maml, lambda i: sample(i), 1000, "/tmp/run")
  """
  if iterations < 0:
    raise ValueError(f"iterations must be >= 0, got {iterations}")
  if int(steps_per_call) < 1:
    raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
  in_graph = (graph_sampler is not None and steps_per_call > 1
              and hasattr(learner, "train_steps"))
  optional_before = _accepts(learner.train_step_tensors, "pre_update_metrics")
  boundaries = [b for b in (log_every, checkpoint_every, eval_every) if b]
  os.makedirs(workdir, exist_ok=True)
  ckpt, manager, step = make_checkpoint(learner, workdir,
                                        **(extra_checkpoint or {}))
  if resume:
    restore_latest(ckpt, manager, log)
  elif manager.latest_checkpoint:
    log(f"resume=False: ignoring and overwriting {manager.latest_checkpoint}")
  writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
  jsonl = JsonlLog(os.path.join(workdir, "train_log.jsonl"))
  start = int(step.numpy())
  jsonl.drop_after(start)          # what a killed run logged past its checkpoint
  optimizer = getattr(learner, "meta_optimizer", None)

  def optimizer_steps() -> int:
    counter = step if optimizer is None else optimizer.iterations
    return int(counter.numpy())
  optimizer_steps_at_start = optimizer_steps()
  timing = {} if timing is None else timing
  timing.update(compile_seconds=0.0, eval_seconds=0.0, train_seconds=0.0,
                timed_steps=0)

  def evaluate(at: int, timed: bool = True) -> None:
    t_eval = time.perf_counter()
    scores = eval_fn(at)
    eval_seconds = time.perf_counter() - t_eval
    if timed:
      timing["eval_seconds"] += eval_seconds
    log(f"eval @ {at}: "
        + " ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    with writer.as_default(step=at):
      for k, v in scores.items():
        tf.summary.scalar(f"eval/{k}", v)
    jsonl.write({"step": at, "kind": "eval", **scores,
                 "seconds": eval_seconds})

  due = (eval_fn is not None and eval_every and start and (
      start % eval_every == 0 or start == iterations)
      and not jsonl.has(start, "eval"))
  it = start           # meta-steps done
  t_timed = None                   # the clock of the steps after compiling
  with interrupts.StopRequest() as stop:
    try:
      if due:
        # An evaluation due at the checkpoint was interrupted (the interrupt
        # saved the checkpoint), or the run starts from given weights:
        # evaluate them before going on, outside the timing of the steps.
        log(f"evaluating the weights of step {start} first (the log has no "
            "evaluation of them)")
        evaluate(start, timed=False)
        if stop.requested:
          log(f"SIGTERM: stopped at step {start}, whose checkpoint is kept")
          raise Interrupted(start)
      if start >= iterations:
        log(f"already trained {start} >= {iterations} iterations: nothing "
            "to train (a larger --iterations goes on where the run's "
            "schedule allows it)")
        return start
      replicas = int(getattr(learner, "num_replicas", 1))
      log(f"meta-training iterations {start} -> {iterations}"
          + (f" on {replicas} replicas" if replicas > 1 else ""))
      pending = []
      t_window, done_window = time.perf_counter(), 0
      t_start = time.perf_counter()
      compiling = True
      log("compiling the meta-step (its first call traces it) ...")
      first_steps = 0
      traced = set()               # kinds of call made (each traces once)
      # MAML++'s derivative-order switch makes the steps after it another
      # kind of call (traced anew).
      inner = getattr(learner, "maml", learner)   # DistributedMAML's learner
      anneals_order = getattr(inner, "first_order_until", 0) > 0
      while it < iterations:
        t_call = time.perf_counter()
        order = inner.first_order_now() if anneals_order else None
        # Steps in this call: up to the next log/eval/checkpoint boundary.
        if in_graph:
          n = min([steps_per_call, iterations - it] +
                  [b - it % b for b in boundaries])
          pending.append((learner.train_steps(graph_sampler, n, True), n))
        else:
          n = 1
          log_step = (it + 1) % log_every == 0 or it + 1 == iterations
          kwargs = ({"pre_update_metrics": log_step} if optional_before
                    else {})
          pending.append((learner.train_step_tensors(batch_for_step(it),
                                                     **kwargs), 1))
        it += n
        step.assign(it)
        done_window += n
        last = it == iterations
        # A call of a kind not seen yet traces a function (the logged and
        # the plain meta-step, a shorter in-graph call, either derivative
        # order): rates, the ETA and the timing leave it out.
        variant = (n if in_graph else bool(kwargs.get("pre_update_metrics")),
                   order)
        if not compiling and variant not in traced:
          traced.add(variant)
          tf.nest.map_structure(lambda t: t.numpy(), pending[-1][0])
          spent = time.perf_counter() - t_call
          timing["compile_seconds"] += spent
          t_window += spent
          t_timed += spent
          done_window -= n
          first_steps += n
        if compiling:
          # Rates and the ETA leave the compilation out.
          tf.nest.map_structure(lambda t: t.numpy(), pending[-1][0])
          traced.add(variant)
          compiling = False
          t_window, done_window = time.perf_counter(), 0
          timing["compile_seconds"] = t_window - t_start
          t_timed, first_steps = t_window, it
          log(f"compiled in {format_duration(t_window - t_start)}; "
              f"training (progress every {log_every} steps)")
        if it % log_every == 0 or last:
          means = _window_means(pending)
          pending.clear()
          now = time.perf_counter()
          timed = done_window > 0      # the compiling call is not timed
          rate = done_window / max(now - t_window, 1e-9) if timed else None
          t_window, done_window = now, 0
          speed = (format_speed(rate, now - t_start, iterations - it)
                   if timed else f"elapsed {format_duration(now - t_start)} "
                   "(with compilation)")
          log(f"step {it}/{iterations} "
              + " ".join(f"{k} {v:.4g}" for k, v in means.items())
              + f" | {speed}")
          with writer.as_default(step=it):
            for k, v in means.items():
              tf.summary.scalar(f"train/{k}", v)
            if timed:
              tf.summary.scalar("train/iterations_per_second", rate)
          jsonl.write({"step": it, "kind": "train", **means,
                       **({"iterations_per_second": rate} if timed else {})})
        if eval_fn is not None and eval_every and (
            it % eval_every == 0 or last):
          evaluate(it)
          t_window = time.perf_counter()    # rates leave evaluation out
        if it % checkpoint_every == 0 or last:
          manager.save(checkpoint_number=it)
        if stop.requested:
          if it % checkpoint_every and not last:
            manager.save(checkpoint_number=it)
          log(f"SIGTERM: saved a checkpoint at step {it} and stopped")
          raise Interrupted(it)
    except Interrupted:
      raise
    except KeyboardInterrupt:
      # The interrupt may land after a compiled call updated the weights and
      # before the step counter was advanced: count the optimizer's steps.
      done = start + int(optimizer_steps() - optimizer_steps_at_start)
      step.assign(done)
      manager.save(checkpoint_number=done)
      log(f"interrupted: saved a checkpoint at step {done}")
      raise Interrupted(done) from None
    except FloatingPointError as e:
      writer.flush()   # one message (the launcher prints it), with the step
      raise FloatingPointError(f"stopped after iteration {it}: {e}") from e
    finally:
      writer.flush()
  sys.stdout.flush()
  if t_timed is not None:
    timing["train_seconds"] = (time.perf_counter() - t_timed
                               - timing["eval_seconds"])
    timing["timed_steps"] = it - first_steps
  return int(step.numpy())


def write_run_summary(workdir: str, config, metrics: Dict[str, float],
                      step: int) -> None:
  """TensorBoard's record of a finished run, beside its training curves.

  ``test/*`` scalars (``metrics``) at ``step``, the config as text, and the
  config's plain fields as HParams with the test metrics (the HParams
  dashboard compares runs under one parent folder).
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
  fields = dataclasses.asdict(config)
  hparams = {k: v for k, v in fields.items()
             if isinstance(v, (bool, int, float, str))}
  writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
  with writer.as_default(step=step):
    for key, value in metrics.items():
      tf.summary.scalar(f"test/{key}", value)
    tf.summary.text("config", "```\n" + json.dumps(fields, indent=1,
                                                   default=str) + "\n```")
    hp.hparams(hparams, trial_id=os.path.basename(os.path.abspath(workdir)))
  writer.flush()
  writer.close()
