"""Few-shot classification (paper section 5.2): Omniglot and MiniImagenet.

``train_and_evaluate(make_config("omniglot_5w1s"), workdir)`` meta-trains the
paper's network with MAML on N-way K-shot episodes, checks validation accuracy
periodically, then evaluates as the paper's Table 1: 600 fresh test tasks,
mean accuracy and 95% confidence interval after each of 0..eval_inner_steps
inner steps. It writes to ``workdir``:

  ``checkpoints/``, ``tensorboard/``, ``train_log.jsonl``  (see training.loop)
  ``results.json``       config, wall times, test accuracy per step, ...
  ``accuracy_vs_steps.png``  test accuracy (95% CI) against inner steps.
  ``training_curve.png``     train / validation accuracy against iteration.
  ``adapted_savedmodel/``    one test task's adapted network as a SavedModel
                             (``export=False`` disables), with the task's
                             support and query sets in ``adapted_task.npz``.

Hyper-parameters (Finn et al. 2017, appendix A.1 and github.com/cbfinn/maml):

======================  ===  =====  ========  =====  ==========  ==========
preset                  way  shot   inner_lr  steps  eval steps  meta_batch
======================  ===  =====  ========  =====  ==========  ==========
omniglot_5w1s / 5w5s    5    1 / 5  0.4       1      3           32
omniglot_20w1s / 20w5s  20   1 / 5  0.1       5      5           16
miniimagenet_5w1s       5    1      0.01      5      10          4
miniimagenet_5w5s       5    5      0.01      5      10          2
======================  ===  =====  ========  =====  ==========  ==========

All use Adam(1e-3) for the meta-update and 60,000 meta-iterations. The
``omniglot_mlp_*`` presets use the paper's fully connected network ("MAML,
no conv") with the 5-way settings.

Query sets. Following Ravi & Larochelle (2017), as the paper does for
MiniImagenet, test tasks are scored on ``query=15`` examples per class. For
meta-training Finn's code uses as many query examples as support examples on
Omniglot (``update_batch_size``); here every preset uses ``train_query=15``
per class, as most later work does (a less noisy meta-gradient; Omniglot's 20
drawings per character allow 5 + 15). Set ``train_query=shot`` for Finn's.

BatchNorm. Like the paper, MAML runs the network in training mode everywhere,
so query predictions use the query batch's statistics (transductive; the
reported test accuracies are this). ``MAML.adapt`` instead returns a network
whose moving statistics are the support set's, which predicts example by
example in inference mode, as the exported SavedModel does. ``results.json``
compares both on a few test tasks (``adapted_inference``); with 1-shot
support sets the support statistics come from only ``way`` examples, so the
inference-mode accuracy can be lower.

Data. Omniglot is read from ``data_dir`` or ``$MAML_TF_OMNIGLOT_DIR`` (the two
official zips) and split as in :func:`maml_tf.tasks.omniglot.omniglot_splits`
(1100 train / 100 val / 423 test characters, x4 rotations; ``train_on_val``
trains on all 1200 as the paper did). MiniImagenet is read from ``data_dir``
or ``$MAML_TF_MINIIMAGENET_DIR`` (Ravi & Larochelle's CSV layout or
split/class folders).

Resuming. Meta-batch ``i`` is a pure function of ``(seed, i)``, so a run
killed and resumed (``resume=True``, the default) sees the same tasks as an
uninterrupted one.

Example:
  >>> from maml_tf.training import classification
  >>> config = classification.make_config("omniglot_5w1s", iterations=2000)
  >>> out = classification.train_and_evaluate(config, "runs/omniglot_5w1s")
  >>> out["test"]["accuracy"]["mean"][-1]      # after eval_inner_steps steps
"""

import dataclasses
import functools
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf

from maml_tf.core import distribute
from maml_tf.core import family
from maml_tf.core.learner import MAML
from maml_tf.core.task_batch import TaskBatch
from maml_tf.export import export_adapted
from maml_tf.models import paper_nets
from maml_tf.tasks import episodes
from maml_tf.tasks import miniimagenet
from maml_tf.tasks import omniglot
from maml_tf.training import config as config_lib
from maml_tf.common import results, run_config, stats
from maml_tf.common.interrupts import UserFacingError
from maml_tf.training import loop

DATASETS = ("omniglot", "miniimagenet")
NETWORKS = ("conv", "mlp")


@dataclasses.dataclass
class ClassificationConfig:
  """Everything a few-shot classification run needs.

  The defaults are the paper's Omniglot 5-way 1-shot convolutional setting
  (preset ``omniglot_5w1s``); see the module docstring for the others.

  Arguments:
    dataset: ``'omniglot'`` or ``'miniimagenet'``.
    data_dir: data folder; default the dataset's environment variable
      (``MAML_TF_OMNIGLOT_DIR`` / ``MAML_TF_MINIIMAGENET_DIR``).
    way: classes per task (N).
    shot: support examples per class (K).
    query: query examples per class of validation and test tasks.
    train_query: query examples per class of meta-training tasks.
    network: ``'conv'`` (the paper's 4-block CNN) or ``'mlp'`` (Omniglot's
      fully connected network).
    inner_lr: inner step size alpha.
    inner_steps: inner steps during meta-training.
    eval_inner_steps: inner steps at validation / test time; accuracy is
      reported after each of ``0..eval_inner_steps``.
    meta_batch: tasks per meta-update.
    meta_lr: Adam step size of the meta-update.
    meta_lr_schedule: ``'constant'``, ``'cosine'`` (``meta_lr`` decayed to
      ``meta_lr / 100`` over ``iterations``) or ``'auto'`` (cosine for
      ``algorithm='mamlpp'`` only).
    iterations: meta-iterations (a resumed run continues up to it).
    first_order: first-order MAML (no second derivatives).
    seed: seeds the initial weights and the meta-training task stream.
    eval_seed: seeds the validation and test tasks (fixed by default, so runs
      with different ``seed`` are scored on the same tasks).
    eval_tasks: test tasks (the paper: 600).
    val_tasks: validation tasks per periodic evaluation.
    eval_every: iterations between validation evaluations (0: never).
    eval_batch: tasks evaluated together (memory vs speed).
    log_every: iterations between progress lines.
    checkpoint_every: iterations between checkpoints.
    resume: continue from the newest checkpoint in the workdir.
    eval_only: skip training; evaluate the newest checkpoint.
    pretrained: start from the shipped meta-initialisation of the preset
      (:mod:`maml_tf.models.pretrained`): with ``eval_only``, evaluate it;
      otherwise continue meta-training from it, counting iterations from
      the card's (fresh meta-optimizer state; a workdir that already holds
      a checkpoint resumes from that instead).
    train_on_val: Omniglot: meta-train on the validation characters too
      (the paper's 1200); validation accuracy is then not held out.
    image_size: MiniImagenet side length (84 in the paper; >= 16).
    images_per_class: MiniImagenet: use the first N images of each class.
    cache_dir: MiniImagenet: keep decoded splits as ``.npy`` here.
    omniglot_source: ``'zip'`` (decode the zips, nothing written) or
      ``'tfds'`` (prepare a TFDS cache once, see ``load_omniglot``).
    adapted_check_tasks: test tasks on which ``MAML.adapt`` + inference mode
      is compared with the transductive accuracy (0: skip).
    export: write one adapted model as a SavedModel.
    plot: write the PNG figures.
    distribute: split each meta-batch across replicas: ``'none'``,
      ``'mirrored'`` (the local devices) or ``'multi_worker'``
      (the cluster in ``TF_CONFIG``; non-chief workers write to
      ``workdir/workers/worker_<i>``). ``meta_batch`` must be a multiple of
      the replica count. Evaluation runs on one device. See
      :mod:`maml_tf.core.distribute`.
  """
  dataset: str = "omniglot"
  data_dir: Optional[str] = None
  way: int = 5
  shot: int = 1
  query: int = 15
  train_query: int = 15
  network: str = "conv"
  inner_lr: float = 0.4
  inner_steps: int = 1
  eval_inner_steps: int = 3
  meta_batch: int = 32
  meta_lr: float = 1e-3
  iterations: int = 60000
  first_order: bool = False
  seed: int = 0
  eval_seed: int = 0
  eval_tasks: int = 600
  val_tasks: int = 100
  eval_every: int = 1000
  eval_batch: int = 25
  log_every: int = 100
  checkpoint_every: int = 1000
  resume: bool = True
  eval_only: bool = False
  pretrained: bool = False
  train_on_val: bool = False
  image_size: int = 84
  images_per_class: Optional[int] = None
  cache_dir: Optional[str] = None
  omniglot_source: str = "zip"
  adapted_check_tasks: int = 20
  export: bool = True
  plot: bool = True
  distribute: str = "none"
  algorithm: str = "maml"           # maml_tf.core.family.ALGORITHMS
  meta_lr_schedule: str = "auto"    # constant | cosine | auto
  recompute: bool = False           # gradient checkpointing of the inner loop

  def validate(self) -> "ClassificationConfig":
    """Raises ``ValueError`` naming the first bad field; returns ``self``.

    Example:
      >>> ClassificationConfig(way=0).validate()
      Traceback (most recent call last):
      ValueError: way must be an integer >= 1, got 0
    """
    if self.dataset not in DATASETS:
      raise ValueError(f"dataset must be one of {list(DATASETS)}, got "
                       f"{self.dataset!r}")
    if self.network not in NETWORKS:
      raise ValueError(f"network must be one of {list(NETWORKS)}, got "
                       f"{self.network!r}")
    if self.network == "mlp" and self.dataset != "omniglot":
      raise ValueError("network='mlp' is the paper's Omniglot network; use "
                       "network='conv' for miniimagenet")
    config_lib.check_learner_fields(self)
    if self.omniglot_source not in ("zip", "tfds"):
      raise ValueError(f"omniglot_source must be 'zip' or 'tfds', got "
                       f"{self.omniglot_source!r}")
    # A classification task needs at least two classes.
    at_least = {"way": 2, "shot": 1, "query": 1, "train_query": 1,
                "inner_steps": 1, "eval_inner_steps": 1, "meta_batch": 1,
                "eval_tasks": 1, "val_tasks": 1, "eval_batch": 1,
                "log_every": 1, "checkpoint_every": 1, "iterations": 0,
                "eval_every": 0, "adapted_check_tasks": 0, "image_size": 16}
    for name, low in at_least.items():
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
          or value < low):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if self.pretrained and not (self.eval_only or self.resume):
      raise ValueError("pretrained=True without eval_only continues "
                       "meta-training from the shipped weights through a "
                       "checkpoint: it needs resume=True")
    if self.images_per_class is not None and self.images_per_class < 1:
      raise ValueError(f"images_per_class must be >= 1, got "
                       f"{self.images_per_class}")
    for name in ("inner_lr", "meta_lr"):
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, (int, float))
          or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    for name in ("seed", "eval_seed"):
      if not isinstance(getattr(self, name), (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got "
                         f"{getattr(self, name)!r}")
    if self.dataset == "omniglot":
      for name in ("query", "train_query"):
        if self.shot + getattr(self, name) > omniglot.NUM_DRAWINGS:
          raise ValueError(
              f"shot + {name} = {self.shot} + {getattr(self, name)} exceeds "
              f"the {omniglot.NUM_DRAWINGS} drawings of an Omniglot character")
    return self


_OMNIGLOT_5WAY = {"dataset": "omniglot", "way": 5, "inner_lr": 0.4,
                  "inner_steps": 1, "eval_inner_steps": 3, "meta_batch": 32}
_OMNIGLOT_20WAY = {"dataset": "omniglot", "way": 20, "inner_lr": 0.1,
                   "inner_steps": 5, "eval_inner_steps": 5, "meta_batch": 16}
_MINIIMAGENET = {"dataset": "miniimagenet", "way": 5, "inner_lr": 0.01,
                 "inner_steps": 5, "eval_inner_steps": 10, "eval_batch": 5}

PRESETS: Dict[str, Dict] = {
    # The paper's six convolutional settings (Table 1, appendix A.1).
    "omniglot_5w1s": {**_OMNIGLOT_5WAY, "shot": 1},
    "omniglot_5w5s": {**_OMNIGLOT_5WAY, "shot": 5},
    "omniglot_20w1s": {**_OMNIGLOT_20WAY, "shot": 1},
    "omniglot_20w5s": {**_OMNIGLOT_20WAY, "shot": 5},
    "miniimagenet_5w1s": {**_MINIIMAGENET, "shot": 1, "meta_batch": 4},
    "miniimagenet_5w5s": {**_MINIIMAGENET, "shot": 5, "meta_batch": 2},
    # "MAML (no conv)": the fully connected network, 5-way settings.
    "omniglot_mlp_5w1s": {**_OMNIGLOT_5WAY, "shot": 1, "network": "mlp"},
    "omniglot_mlp_5w5s": {**_OMNIGLOT_5WAY, "shot": 5, "network": "mlp"},
    # A tiny run for tests and smoke checks (the MLP is vectorised).
    "smoke": {**_OMNIGLOT_5WAY, "network": "mlp", "shot": 1,
              "meta_batch": 4, "train_query": 5, "iterations": 40,
              "eval_tasks": 20, "val_tasks": 10, "eval_every": 20,
              "log_every": 10, "checkpoint_every": 20,
              "adapted_check_tasks": 2},
}


def make_config(preset: str = "omniglot_5w1s",
                **overrides) -> ClassificationConfig:
  """A validated config from a preset name plus field overrides.

  Arguments:
    preset: a key of :data:`PRESETS`.
    **overrides: config fields; ``None`` keeps the preset's value.

  Raises:
    ValueError: unknown preset or field, or a bad value (named).

  Example:
    >>> make_config("omniglot_20w1s", iterations=100).meta_batch
    16
  """
  return config_lib.from_preset(ClassificationConfig, PRESETS, preset,
                                "classification", **overrides)


# ---------------------------------------------------------------------- data
def _omniglot_images(data_dir: Optional[str], source: str) -> np.ndarray:
  # (Cached per folder: $MAML_TF_OMNIGLOT_DIR is part of the key.)
  return _cached_omniglot_images(data_dir, source,
                                 os.environ.get(omniglot.ENV_VAR))


@functools.lru_cache(maxsize=2)
def _cached_omniglot_images(data_dir: Optional[str], source: str,
                            unused_env: Optional[str]) -> np.ndarray:
  images = omniglot.load_omniglot(data_dir, source=source, dtype=np.uint8)
  images.setflags(write=False)
  return images


def load_splits(config: ClassificationConfig) -> Dict[str, np.ndarray]:
  """The ``train``/``val``/``test`` class arrays ``[classes, n, H, W, C]``.

  uint8 (the episode pipeline scales sampled images to ``[0, 1]``). Checks
  that every split has at least ``way`` classes and ``shot + query``
  examples per class.

  Arguments:
    config: a :class:`ClassificationConfig`.

  Example:
    >>> splits = load_splits(make_config("omniglot_5w1s"))
    >>> {k: v.shape[0] for k, v in splits.items()}
    {'train': 4400, 'val': 400, 'test': 1692}
  """
  if config.dataset == "omniglot":
    # (load_omniglot resolves $MAML_TF_OMNIGLOT_DIR, and names it.)
    images = _omniglot_images(config.data_dir, config.omniglot_source)
    splits = omniglot.omniglot_splits(images, train_on_val=config.train_on_val)
  else:
    if config.train_on_val:
      raise ValueError("train_on_val is only implemented for omniglot")
    splits = miniimagenet.load_miniimagenet(
        config.data_dir, image_size=config.image_size,
        images_per_class=config.images_per_class, cache_dir=config.cache_dir)
  for name, array in splits.items():
    query = config.train_query if name == "train" else config.query
    if array.shape[0] < config.way:
      raise DataMismatchError(
          f"way={config.way} but the {config.dataset} {name} split has only "
          f"{array.shape[0]} classes")
    if config.shot + query > array.shape[1]:
      raise DataMismatchError(
          f"shot + {'train_query' if name == 'train' else 'query'} = "
          f"{config.shot} + {query} exceeds the {array.shape[1]} examples per "
          f"class of the {config.dataset} {name} split")
  return splits


class DataMismatchError(UserFacingError, ValueError):
  """The data set has fewer classes or examples per class than the config
  asks for."""


def to_cpu_variables(splits: Dict[str, np.ndarray]) -> Dict[str, tf.Variable]:
  """Puts each split in memory once, as a non-trainable CPU variable.

  The episode pipelines then capture the variable instead of copying the
  array into every new ``tf.data`` pipeline (every validation, every
  restart), which matters for MiniImagenet (0.8 GB of uint8 training images).

  Arguments:
    splits: from :func:`load_splits`.

  Example:
    >>> data = to_cpu_variables(load_splits(config))
  """
  with tf.device("/CPU:0"):
    return {name: tf.Variable(array, trainable=False, name=f"{name}_images")
            for name, array in splits.items()}


class EpisodeStream:
  """``batch_for_step(i)``: meta-batch ``i`` of the training task stream.

  Meta-batch ``i`` is a pure function of ``(seed, i)``
  (:func:`maml_tf.tasks.episodes.episode_dataset` with ``start_batch=i``), so
  a resumed run sees the same tasks as an uninterrupted one. The tf.data
  iterator is created at the first index asked for and then followed while
  indices are consecutive (prefetching ahead); any other index restarts it.

  Arguments:
    class_images: ``[classes, n, H, W, C]`` training classes; pass a tensor
      or variable (see :func:`to_cpu_variables`) to share one copy between
      restarts.
    way, shot, query, meta_batch, seed: as in ``episode_dataset``.

  Example:
    >>> stream = EpisodeStream(splits["train"], 5, 1, 15, 32, seed=0)
    >>> batch = stream(0); same = EpisodeStream(...)(0)   # identical tasks
  """

  def __init__(self, class_images, way: int, shot: int, query: int,
               meta_batch: int, seed: int):
    self._args = dict(class_images=class_images, way=way, shot=shot,
                      query=query, meta_batch=meta_batch, seed=seed)
    self._iterator = None
    self._next_index = None

  def close(self):
    """Drops the iterator (and its prefetch threads); a later call restarts."""
    self._iterator = None
    self._next_index = None

  def __call__(self, index: int) -> TaskBatch:
    if self._iterator is None or index != self._next_index:
      self._iterator = None     # let the old pipeline go first
      self._iterator = iter(episodes.episode_dataset(
          start_batch=int(index), **self._args))
    self._next_index = index + 1
    return next(self._iterator)


# ---------------------------------------------------------------- the model
def build_network(config: ClassificationConfig) -> keras.Model:
  """The paper's network for ``config`` (built, ``config.way`` logits).

  Example:
    >>> build_network(make_config("miniimagenet_5w1s")).input_shape
    (None, 84, 84, 3)
  """
  if config.dataset == "omniglot":
    if config.network == "mlp":
      return paper_nets.omniglot_mlp(config.way)
    return paper_nets.omniglot_conv(config.way)
  if config.image_size == 84:
    return paper_nets.miniimagenet_conv(config.way)
  return paper_nets.conv4(config.way, (config.image_size, config.image_size, 3),
                          filters=32, pooling="max", name="miniimagenet_conv")


def build_learner(config: ClassificationConfig,
                  optimizer_steps: Optional[int] = None) -> MAML:
  """A fresh MAML learner (seeded weights, Adam meta-optimizer).

  ``optimizer_steps`` (default ``config.iterations``) is the number of
  meta-updates the learner's schedules span (``meta_lr_schedule``, MAML++'s
  annealing): fewer when training continues from shipped weights with a
  fresh optimizer.

  Example:
    >>> learner = build_learner(make_config("smoke"))
    >>> learner.inner_lr
    0.4
  """
  keras.utils.set_random_seed(config.seed)
  return family.make_learner(
      config.algorithm, build_network(config),
      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      inner_lr=config.inner_lr, inner_steps=config.inner_steps,
      meta_lr=config.meta_lr,
      iterations=config.iterations if optimizer_steps is None
      else optimizer_steps,
      meta_lr_schedule=config.meta_lr_schedule,
      first_order=config.first_order, recompute=config.recompute)


# ---------------------------------------------------------------- evaluation
def _eval_batches(config: ClassificationConfig, class_images, num_tasks: int):
  return episodes.evaluation_batches(
      class_images, config.way, config.shot, config.query,
      num_tasks=num_tasks, meta_batch=min(config.eval_batch, num_tasks),
      seed=config.eval_seed)


def evaluate_tasks(learner: MAML, config: ClassificationConfig, class_images,
                   num_tasks: int, steps, log=None,
                   what: str = "evaluation") -> Dict[str, np.ndarray]:
  """Per-task query accuracy and loss after each step count in ``steps``.

  Arguments:
    learner: the (meta-trained) MAML learner.
    config: the run's config (way, shot, query, eval_batch, eval_seed).
    class_images: the split's ``[classes, n, H, W, C]`` array.
    num_tasks: tasks (fixed ones: task ``i`` depends only on ``eval_seed``).
    steps: inner step counts.
    log: where progress lines go (every 8 batches and at the end; None:
      silent).
    what: the name progress lines give the evaluation.

  Returns:
    ``{"steps": [S], "accuracy": [S, num_tasks], "loss": [S, num_tasks]}``.

  Example:
    >>> out = evaluate_tasks(learner, config, splits["test"], 600, (0, 1, 3))
    >>> out["accuracy"].mean(axis=1)
  """
  parts, done, t0 = [], 0, time.perf_counter()
  for batch in _eval_batches(config, class_images, num_tasks):
    parts.append(learner.evaluate(batch, steps=steps, per_task=True))
    done += parts[-1]["loss"].shape[1]
    if log is not None and (done == num_tasks or len(parts) % 8 == 0):
      log(f"  {what}: {done}/{num_tasks} tasks evaluated "
          f"({time.perf_counter() - t0:.0f}s)")
  return {"steps": np.asarray(steps),
          "accuracy": np.concatenate([p["accuracy"] for p in parts], axis=1),
          "loss": np.concatenate([p["loss"] for p in parts], axis=1)}


def _summary(per_task: np.ndarray, steps) -> Dict:
  rows = [stats.mean_ci95(v) for v in per_task]
  return {"mean": [r["mean"] for r in rows], "ci95": [r["ci95"] for r in rows],
          "by_step": {f"steps={s}": r for s, r in zip(steps, rows)}}


def adapted_inference_check(learner: MAML, config: ClassificationConfig,
                            class_images, transductive: np.ndarray,
                            export_path: Optional[str] = None,
                            log=print) -> Dict:
  """Compares ``MAML.adapt`` + inference mode with the transductive accuracy.

  For the first ``config.adapted_check_tasks`` test tasks: adapts with
  ``eval_inner_steps`` steps (BatchNorm moving statistics set from the support
  set) and scores ``adapted(query_x, training=False)`` example by example.
  Optionally exports the first task's adapted model as a SavedModel at
  ``export_path`` (checked against the Keras model on the query set) and
  saves that task beside it as ``adapted_task.npz``.

  Arguments:
    learner: the meta-trained learner.
    config: the run's config.
    class_images: the test split.
    transductive: per-task accuracy after ``eval_inner_steps`` steps of the
      same tasks from :func:`evaluate_tasks` (at least as many tasks).
    export_path: SavedModel folder, or ``None``.
    log: where progress lines go.

  Returns:
    dict with both accuracies (mean, 95% CI) and the export details.

  Example:
    >>> adapted_inference_check(learner, config, splits["test"],
    ...                         test["accuracy"][-1], "/tmp/adapted")
  """
  n = config.adapted_check_tasks
  steps = config.eval_inner_steps
  inference, exported = [], None
  done = 0
  for batch in _eval_batches(config, class_images, n):
    for t in range(batch.num_tasks):
      sx, sy, qx, qy = (np.asarray(f[t]) for f in batch)
      adapted = learner.adapt(sx, sy, steps=steps)
      pred = np.asarray(adapted(qx, training=False)).argmax(-1)
      inference.append(float(np.mean(pred == qy)))
      if done == 0 and export_path is not None:
        export_adapted(adapted, export_path, verify_with=qx, atol=1e-4)
        loaded = tf.saved_model.load(export_path)
        saved_pred = np.asarray(loaded.serve(tf.constant(qx))).argmax(-1)
        task_path = os.path.join(os.path.dirname(os.path.abspath(export_path)),
                                 "adapted_task.npz")
        np.savez_compressed(task_path, support_x=sx, support_y=sy,
                            query_x=qx, query_y=qy)
        exported = {"path": export_path, "task_file": task_path,
                    "savedmodel_query_accuracy": float(
                        np.mean(saved_pred == qy)),
                    "keras_query_accuracy": inference[-1]}
        log(f"exported an adapted model to {export_path}")
      done += 1
  out = {
      "tasks": n, "steps": steps,
      "inference_mode_accuracy": stats.mean_ci95(inference),
      "transductive_accuracy": stats.mean_ci95(transductive[:n]),
      "note": ("inference_mode_accuracy: MAML.adapt (BatchNorm moving "
               "statistics from the support set) then model(query, "
               "training=False), each example predicted independently, as "
               "the exported SavedModel does; transductive_accuracy: "
               "MAML.evaluate on the same tasks, BatchNorm on query-batch "
               "statistics as in the paper."),
  }
  if exported is not None:
    out["export"] = exported
  return out


# -------------------------------------------------------------------- plots
def _read_log(path: str) -> List[Dict]:
  """train_log.jsonl records, the last one per (kind, step) (resumes repeat)."""
  if not os.path.exists(path):
    return []
  records = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        r = json.loads(line)
        records[(r.get("kind"), r.get("step"))] = r
  return sorted(records.values(), key=lambda r: r["step"])


def training_curve_figure(log_records: List[Dict], path: str,
                          title: str = "") -> str:
  """Train and validation accuracy (before / after adaptation) vs iteration.

  Arguments:
    log_records: records of ``train_log.jsonl``.
    path: PNG to write.
    title: figure title.

  Example:
    >>> training_curve_figure(_read_log("run/train_log.jsonl"), "curve.png")
  """
  from maml_tf.training import plots  # pylint: disable=g-import-not-at-top
  plt = plots.plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  series = [("train", "accuracy_before", "train, pre-update", "tab:blue", ":"),
            ("train", "accuracy_after", "train, post-update", "tab:blue", "-"),
            ("eval", "val_accuracy_before", "validation, pre-update",
             "tab:orange", ":"),
            ("eval", "val_accuracy", "validation, post-update", "tab:orange",
             "-")]
  for kind, key, label, color, style in series:
    points = [(r["step"], r[key]) for r in log_records
              if r.get("kind") == kind and key in r]
    if points:
      x, y = zip(*points)
      # A series of one point is drawn as a marker (a line would not show).
      ax.plot(x, y, ls=style, color=color, label=label,
              marker="o" if kind == "eval" or len(x) == 1 else None, ms=3)
  ax.set_ylim(0, 1)
  return plots.save_figure(fig, ax, path, "meta-iteration", "query accuracy",
                           title, legend_size=8)


def _checkpoint_step(workdir: str) -> int:
  """The step of the newest checkpoint in ``workdir`` (0 if none)."""
  latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  if not latest:
    return 0
  try:
    return int(tf.train.load_variable(
        latest, "step/.ATTRIBUTES/VARIABLE_VALUE"))
  except (tf.errors.OpError, ValueError):
    return 0


def _name_of_preset(config: ClassificationConfig) -> str:
  """The shipped setting whose configuration is ``config``'s."""
  from maml_tf.models import pretrained  # pylint: disable=g-import-not-at-top
  for name in pretrained.available("classification"):
    want = pretrained.config(name)
    fields = ("dataset", "network", "way", "shot", "inner_lr", "inner_steps")
    if all(getattr(want, f) == getattr(config, f) for f in fields):
      return name
  raise pretrained.ShippedWeightsMismatchError(
      f"no shipped weights for {_name(config)} with inner_lr="
      f"{config.inner_lr}, inner_steps={config.inner_steps}; shipped: "
      f"{pretrained.available('classification') or 'none'}")


def _shipped_iterations(config: ClassificationConfig) -> int:
  from maml_tf.models import pretrained  # pylint: disable=g-import-not-at-top
  return int(pretrained.card(_name_of_preset(config))["iterations"])


def _start_from_shipped(learner, config: ClassificationConfig, workdir: str,
                        shipped_iterations: int, log) -> None:
  """Seeds ``workdir`` with the shipped weights of ``config``'s setting, as
  the checkpoint of their iteration count, unless it holds a checkpoint."""
  from maml_tf.models import pretrained  # pylint: disable=g-import-not-at-top
  if _checkpoint_step(workdir):
    return
  pretrained.load_into(learner, _name_of_preset(config))
  loop.seed_checkpoint(learner, workdir, shipped_iterations, log)


def _check_finite_loss(loss: np.ndarray, config: ClassificationConfig,
                       when: str, what: str) -> None:
  """``FloatingPointError`` when an evaluation's loss ``[steps, tasks]`` is
  not finite: the (adapted) weights diverged, and nothing after (results,
  export) would mean anything."""
  bad = [s for s in range(loss.shape[0]) if not np.isfinite(loss[s]).all()]
  if bad:
    raise FloatingPointError(
        f"the {what} loss {when} is not finite after {bad[0]} inner steps: "
        f"the weights diverged (inner_lr={config.inner_lr}, meta_lr="
        f"{config.meta_lr}); smaller step sizes usually cure this")


def _name(config: ClassificationConfig) -> str:
  net = "" if config.network == "conv" else f" {config.network}"
  return f"{config.dataset}{net} {config.way}-way {config.shot}-shot"


# -------------------------------------------------------------- experiment
def train_and_evaluate(config: ClassificationConfig, workdir: str,
                       log: Callable[[str], None] = print) -> Dict:
  """Meta-trains (unless ``eval_only``), evaluates, writes results and plots.

  Arguments:
    config: a :class:`ClassificationConfig` (see :func:`make_config`).
    workdir: output folder (checkpoints, TensorBoard, train_log.jsonl,
      results.json, PNGs, adapted_savedmodel/).
    log: where progress lines go.

  Returns:
    The results dictionary also written to ``workdir/results.json``:
    ``config``, ``data`` (shape of each split), ``iterations`` (meta-steps
    of the evaluated weights), ``train_seconds``, ``seconds_per_iteration``
    (wall time per meta-iteration run by this call, without compilation
    and validation; ``None`` if none ran), ``test`` (``tasks``,
    ``steps``, and ``accuracy`` / ``loss`` each with per-step ``mean``,
    ``ci95`` and ``by_step``), ``eval_seconds``, ``final_val`` (the last
    validation record), ``adapted_inference``, ``plots``, ``total_seconds``.

  Raises:
    ValueError: a bad config or data that do not fit it (named).
    FileNotFoundError: missing data, or ``eval_only`` without a checkpoint.

  Example:
    >>> out = train_and_evaluate(make_config("smoke"), "/tmp/cls")
    >>> out["test"]["accuracy"]["mean"]      # after 0, 1, 2, 3 steps
  """
  config.validate()
  strategy = distribute.make_strategy(config.distribute)   # before any TF op
  workdir = distribute.worker_workdir(workdir, strategy)
  results.check_writable(workdir, ("results.json", "accuracy_vs_steps.png",
                                   "training_curve.png", "config.json",
                                   "train_log.jsonl"),
                         ("checkpoints", "tensorboard", "adapted_savedmodel"))
  changes = run_config.check_resume(config, workdir, log,
                                     config_lib.fixed_on_resume(config))
  if config.pretrained:   # before the data: a shipped setting must match
    _name_of_preset(config)
  t0 = time.perf_counter()
  log(f"loading {config.dataset} ...")
  splits = to_cpu_variables(load_splits(config))
  log(f"{_name(config)}: classes train/val/test = "
      + "/".join(str(splits[k].shape[0]) for k in ("train", "val", "test"))
      + f" (loaded in {time.perf_counter() - t0:.1f}s)")
  continues_shipped = config.pretrained and not config.eval_only
  shipped = _shipped_iterations(config) if continues_shipped else 0
  optimizer_steps = config.iterations - shipped   # a fresh optimizer there
  with strategy.scope():
    learner = build_learner(config, max(1, optimizer_steps))
  # Validation records the same step counts as the test (one compiled
  # evaluation serves both) and logs the first and the last.
  steps = tuple(range(config.eval_inner_steps + 1))

  def validation(step):
    out = evaluate_tasks(learner, config, splits["val"], config.val_tasks,
                         steps, log, "validation")
    _check_finite_loss(out["loss"], config, f"at iteration {step}",
                       "validation")
    acc = out["accuracy"].mean(axis=1)
    return {"val_accuracy_before": float(acc[0]),
            "val_accuracy": float(acc[-1]),
            "val_loss": float(out["loss"][-1].mean())}

  t_train = time.perf_counter()
  timing = {}
  if continues_shipped:
    _start_from_shipped(learner, config, workdir, shipped, log)
  if config.pretrained and config.eval_only:
    from maml_tf.models import pretrained  # pylint: disable=g-import-not-at-top
    name = _name_of_preset(config)
    pretrained.load_into(learner, name)
    start = done = int(pretrained.card(name)["iterations"])
    log(f"evaluating the shipped weights {name!r} "
        f"({done} meta-iterations)")
  elif config.eval_only:
    ckpt, manager, step = loop.make_checkpoint(learner, workdir)
    if not loop.restore_latest(ckpt, manager, log):
      raise FileNotFoundError(
          f"eval_only: no checkpoint under {workdir}/checkpoints; train first")
    start = done = int(step.numpy())
  else:
    start = _checkpoint_step(workdir) if config.resume else 0
    stream = EpisodeStream(splits["train"], config.way, config.shot,
                           config.train_query, config.meta_batch, config.seed)
    try:
      done = loop.meta_train(
          distribute.distributed_learner(learner, strategy), stream,
          config.iterations, workdir,
          log_every=config.log_every, checkpoint_every=config.checkpoint_every,
          resume=config.resume, eval_fn=validation,
          eval_every=config.eval_every, log=log, timing=timing)
    finally:
      stream.close()   # stops the prefetching pipeline
  train_seconds = time.perf_counter() - t_train
  out = {"config": dataclasses.asdict(config), "config_changes": changes,
         "data": {k: v.shape.as_list() for k, v in splits.items()},
         "iterations": done,
         "train_seconds": train_seconds,
         # Without compilation and validation (training.loop.meta_train).
         "timing": timing,
         "seconds_per_iteration": (
             timing["train_seconds"] / timing["timed_steps"]
             if timing.get("timed_steps") else None)}
  if config.eval_only and not config.pretrained:   # how the run trained
    out.update(results.previous_training(os.path.join(workdir,
                                                      "results.json")))

  t_eval = time.perf_counter()
  log(f"testing on {config.eval_tasks} tasks ...")
  test = evaluate_tasks(learner, config, splits["test"], config.eval_tasks,
                        steps, log, "test")
  _check_finite_loss(test["loss"], config, f"after {done} iterations", "test")
  out["test"] = {"tasks": config.eval_tasks, "steps": list(steps),
                 "accuracy": _summary(test["accuracy"], steps),
                 "loss": _summary(test["loss"], steps)}
  out["eval_seconds"] = time.perf_counter() - t_eval
  log(f"test evaluation took {out['eval_seconds']:.1f}s")
  acc = out["test"]["accuracy"]
  log(f"test accuracy over {config.eval_tasks} tasks (mean ± 95% CI): "
      + "  ".join(f"{s}: {m:.4f}±{c:.4f}"
                  for s, m, c in zip(steps, acc["mean"], acc["ci95"])))
  log(f"pre-update accuracy {acc['mean'][0]:.4f}  post-update "
      f"({config.eval_inner_steps} step"
      f"{'s' if config.eval_inner_steps != 1 else ''}) {acc['mean'][-1]:.4f}")
  records = _read_log(os.path.join(workdir, "train_log.jsonl"))
  evals = [r for r in records if r.get("kind") == "eval"]
  if evals:
    out["final_val"] = evals[-1]

  n_check = min(config.adapted_check_tasks, config.eval_tasks)
  if n_check or config.export:
    check_config = dataclasses.replace(config,
                                       adapted_check_tasks=max(n_check, 1))
    export_path = (os.path.join(workdir, "adapted_savedmodel")
                   if config.export else None)
    out["adapted_inference"] = adapted_inference_check(
        learner, check_config, splits["test"], test["accuracy"][-1],
        export_path, log)
    a = out["adapted_inference"]
    log(f"adapted model, inference mode: "
        f"{a['inference_mode_accuracy']['mean']:.4f} vs transductive "
        f"{a['transductive_accuracy']['mean']:.4f} on {a['tasks']} test tasks")

  if config.plot:
    from maml_tf.training import plots  # pylint: disable=g-import-not-at-top
    out["plots"] = {
        "accuracy_vs_steps": results.try_figure(
            plots.curves_figure, log,
            list(steps), {f"MAML, {config.eval_tasks} test tasks":
                          (acc["mean"], acc["ci95"])},
            os.path.join(workdir, "accuracy_vs_steps.png"),
            "inner gradient steps", "query accuracy (95% CI)",
            title=f"{_name(config)}, {done} meta-iterations",
            chance=1.0 / config.way),
    }
    if any(r.get("kind") in ("train", "eval") for r in records):
      # A shipped initialisation evaluated in a fresh logdir has no curve.
      out["plots"]["training_curve"] = results.try_figure(
          training_curve_figure, log,
          records, os.path.join(workdir, "training_curve.png"),
          title=_name(config))
    written = [p for p in out["plots"].values() if p]
    if written:
      log(f"wrote {' and '.join(written)}")
  out["total_seconds"] = time.perf_counter() - t0
  loop.write_run_summary(
      workdir, config,
      {f"accuracy_after_{s}_steps": float(m)
       for s, m in zip(steps, acc["mean"])}, done)
  out["environment"] = results.environment()
  path = results.write_json(os.path.join(workdir, "results.json"), out)
  log(f"wrote {path}")
  return out
