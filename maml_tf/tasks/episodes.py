"""N-way K-shot episode sampling as a ``tf.data`` pipeline.

A task ("episode") draws ``way`` distinct classes, assigns them the labels
``0..way-1`` in random order, and draws ``shot + query`` distinct examples of
each class: the first ``shot`` go to the support set, the other ``query`` to
the query set, so no example is in both. Within each set the examples are
shuffled (``shuffle_examples=True``). Tasks are stacked into
``maml_tf.TaskBatch``es with a leading task axis ``[T, ...]``.

Everything runs in-graph from one in-memory copy of ``[n_classes,
n_per_class, H, W, C]`` (held as a non-trainable CPU ``tf.Variable``; uint8 is
kept as uint8, a quarter of the memory, and only the sampled images are
converted to float32 in ``[0, 1]``). Sampling uses
stateless random ops keyed by ``(seed, task index)``, so a task depends only
on the seed and its index, never on ``meta_batch``, the map parallelism or the
machine: the pipeline is deterministic given ``seed``, while
``map(num_parallel_calls=AUTOTUNE)`` and ``prefetch(AUTOTUNE)`` keep it ahead
of training.

``python -m benchmarks.episodes`` measures the pipeline's meta-batches per
second (figures in BENCHMARKS.md).

Example:
  >>> import numpy as np
  >>> from maml_tf.tasks import episodes
  >>> classes = np.random.rand(50, 20, 28, 28, 1).astype(np.float32)
  >>> ds = episodes.episode_dataset(classes, way=5, shot=1, query=15,
  ...                               meta_batch=4, seed=0)
  >>> batch = next(iter(ds))
  >>> batch.support_x.shape, batch.support_y.shape, batch.query_x.shape
  (TensorShape([4, 5, 28, 28, 1]), TensorShape([4, 5]), TensorShape([4, 75, 28, 28, 1]))
"""

import numbers
from typing import Optional

import numpy as np
import tensorflow as tf

from maml_tf.core.task_batch import TaskBatch

AUTOTUNE = tf.data.AUTOTUNE

# Salts keep the training and evaluation task streams apart for equal seeds.
_TRAIN_SALT = 0x5EED0
_EVAL_SALT = 0xE7A1


def _check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value}")
  return int(value)


def _check_args(class_images, way, shot, query):
  """Validates the episode shape; returns (images tensor, way, shot, query)."""
  way = _check_positive_int("way", way)
  shot = _check_positive_int("shot", shot)
  query = _check_positive_int("query", query)
  shape = tuple(class_images.shape)
  if len(shape) < 3:
    raise ValueError(
        f"class_images must be [n_classes, examples_per_class, *example_shape] "
        f"(e.g. [n, 20, 28, 28, 1]), got shape {shape}")
  n_classes, n_per_class = int(shape[0]), int(shape[1])
  if way > n_classes:
    raise ValueError(
        f"way={way} is larger than the number of classes in class_images "
        f"({n_classes})")
  if shot + query > n_per_class:
    raise ValueError(
        f"shot + query = {shot} + {query} = {shot + query} is larger than the "
        f"number of examples per class in class_images ({n_per_class}); "
        f"support and query examples must be distinct")
  dtype = tf.as_dtype(class_images.dtype)
  if not (dtype == tf.uint8 or dtype.is_floating):
    raise ValueError(
        f"class_images must be uint8 (converted to [0, 1]) or floating point, "
        f"got {dtype.name}")
  return way, shot, query


def _to_tensor(class_images):
  """Puts the data set on the CPU once, as a non-trainable variable.

  A variable holds one copy (``tf.convert_to_tensor`` of a large numpy array
  keeps a second one alive) and the tf.data functions capture only its handle,
  so nothing is serialized into the dataset graph. It is pinned to the CPU
  because tf.data runs there; under a ``tf.distribute`` strategy (whose scope
  would mirror a variable onto every accelerator) a plain CPU tensor is used.
  """
  with tf.device("/CPU:0"):
    if isinstance(class_images, (tf.Tensor, tf.Variable)):
      return class_images
    array = np.asarray(class_images)
    if tf.distribute.has_strategy():
      return tf.convert_to_tensor(array)
    return tf.Variable(array, trainable=False, name="episode_class_images")


def _resolve_seed(seed: Optional[int]) -> int:
  if seed is None:
    return int(np.random.default_rng().integers(0, 2**31 - 1))
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise ValueError(f"seed must be an integer or None, got {seed!r}")
  return int(seed)


def _make_sampler(images: tf.Tensor, way: int, shot: int, query: int,
                  seed: int, salt: int, shuffle_examples: bool,
                  dtype: tf.DType):
  """Returns ``f(task_index) -> TaskBatch`` of one task (no task axis)."""
  n_classes = int(images.shape[0])
  n_per_class = int(images.shape[1])
  example_shape = images.shape[2:]
  n_draw = shot + query
  base_key = tf.constant([seed, salt], tf.int64)
  scale = 1.0 / 255.0 if images.dtype == tf.uint8 else None

  def sample(task_index):
    key = tf.random.experimental.stateless_fold_in(base_key, task_index)
    keys = tf.random.experimental.stateless_split(key, 4)
    # Top-k of i.i.d. uniforms: `way` distinct classes in random order, so
    # the class-to-label assignment is itself a random permutation.
    class_scores = tf.random.stateless_uniform([n_classes], seed=keys[0])
    classes = tf.math.top_k(class_scores, k=way, sorted=True).indices
    draw_scores = tf.random.stateless_uniform([way, n_per_class], seed=keys[1])
    draws = tf.math.top_k(draw_scores, k=n_draw, sorted=True).indices
    idx = tf.stack(
        [tf.broadcast_to(classes[:, None], [way, n_draw]), draws], axis=-1)
    x = tf.gather_nd(images, idx)  # [way, shot + query, *example_shape]
    x = tf.cast(x, dtype)
    if scale is not None:
      x = x * tf.constant(scale, dtype)
    labels = tf.broadcast_to(tf.range(way, dtype=tf.int32)[:, None],
                             [way, n_draw])
    sx = tf.reshape(x[:, :shot], [way * shot, *example_shape])
    sy = tf.reshape(labels[:, :shot], [way * shot])
    qx = tf.reshape(x[:, shot:], [way * query, *example_shape])
    qy = tf.reshape(labels[:, shot:], [way * query])
    if shuffle_examples:
      sp = tf.argsort(tf.random.stateless_uniform([way * shot], seed=keys[2]))
      qp = tf.argsort(tf.random.stateless_uniform([way * query], seed=keys[3]))
      sx, sy = tf.gather(sx, sp), tf.gather(sy, sp)
      qx, qy = tf.gather(qx, qp), tf.gather(qy, qp)
    return TaskBatch(sx, sy, qx, qy)

  return sample


def episode_dataset(class_images,
                    way: int,
                    shot: int,
                    query: int,
                    meta_batch: int,
                    seed: Optional[int] = None,
                    *,
                    start_batch: int = 0,
                    num_batches: Optional[int] = None,
                    shuffle_examples: bool = True,
                    dtype=tf.float32,
                    num_parallel_calls=AUTOTUNE) -> tf.data.Dataset:
  """An endless stream of meta-batches of N-way K-shot tasks.

  Meta-batch ``b`` holds tasks ``b * meta_batch ... (b + 1) * meta_batch - 1``;
  task ``i`` is a pure function of ``(seed, i)``. Iterating the returned
  dataset again starts again at ``start_batch``.

  Arguments:
    class_images: ``[n_classes, n_per_class, *example_shape]`` numpy array or
      tensor; uint8 (scaled to ``[0, 1]`` per episode) or float (kept).
    way: classes per task (N).
    shot: support examples per class (K).
    query: query examples per class.
    meta_batch: tasks per meta-batch (T).
    seed: integer seed; ``None`` draws one at random (still fixed for the
      lifetime of the returned dataset).
    start_batch: index of the first meta-batch, to resume a run mid-way.
    num_batches: stop after this many meta-batches (default: endless).
    shuffle_examples: shuffle the order of examples within support and query
      sets (otherwise they come grouped by label).
    dtype: floating dtype of ``support_x``/``query_x`` (e.g. ``tf.float64``).
    num_parallel_calls: parallelism of the sampling ``map``.

  Returns:
    ``tf.data.Dataset`` of ``TaskBatch(support_x [T, way*shot, *shape] dtype,
    support_y [T, way*shot] int32, query_x [T, way*query, *shape],
    query_y [T, way*query] int32)``, labels in ``0..way-1``.

  Raises:
    ValueError: naming the argument, for non-positive sizes, ``way`` above the
      number of classes or ``shot + query`` above the examples per class.

  Example:
    >>> ds = episode_dataset(splits["train"], way=5, shot=1, query=15,
    ...                      meta_batch=32, seed=0)  # doctest: +SKIP
    >>> for step, batch in enumerate(ds.take(1000)):  # doctest: +SKIP
    ...   learner.meta_step(batch)
  """
  way, shot, query = _check_args(class_images, way, shot, query)
  meta_batch = _check_positive_int("meta_batch", meta_batch)
  if isinstance(start_batch, bool) or not isinstance(
      start_batch, numbers.Integral) or start_batch < 0:
    raise ValueError(f"start_batch must be a non-negative integer, "
                     f"got {start_batch!r}")
  if num_batches is not None:
    num_batches = _check_positive_int("num_batches", num_batches)
  dtype = tf.as_dtype(dtype)
  if not dtype.is_floating:
    raise ValueError(f"dtype must be a floating dtype, got {dtype.name}")
  seed = _resolve_seed(seed)
  images = _to_tensor(class_images)
  sample = _make_sampler(images, way, shot, query, seed, _TRAIN_SALT,
                         shuffle_examples, dtype)
  first = int(start_batch) * meta_batch
  if num_batches is None:
    tasks = tf.data.Dataset.counter(start=first, dtype=tf.int64)
  else:
    tasks = tf.data.Dataset.range(first, first + num_batches * meta_batch)
  ds = tasks.map(sample, num_parallel_calls=num_parallel_calls,
                 deterministic=True)
  ds = ds.batch(meta_batch, drop_remainder=True)
  return ds.prefetch(AUTOTUNE)


def evaluation_batches(class_images,
                       way: int,
                       shot: int,
                       query: int,
                       num_tasks: int = 600,
                       meta_batch: int = 20,
                       seed: int = 0,
                       *,
                       shuffle_examples: bool = True,
                       dtype=tf.float32,
                       num_parallel_calls=AUTOTUNE) -> tf.data.Dataset:
  """A fixed, finite set of evaluation tasks (the same ones on every call).

  Task ``i`` (``0 <= i < num_tasks``) depends only on ``seed`` and ``i``, so
  the tasks do not change with ``meta_batch``, between calls, or between
  iterations; the stream differs from :func:`episode_dataset`'s for the same
  seed. The paper reports the mean accuracy over 600 such tasks with a 95%
  confidence interval.

  Arguments:
    class_images: ``[n_classes, n_per_class, *example_shape]``, usually the
      ``val`` or ``test`` split.
    way, shot, query: as in :func:`episode_dataset`.
    num_tasks: number of tasks.
    meta_batch: tasks per batch; the last batch is smaller when
      ``num_tasks % meta_batch != 0``.
    seed: integer seed (fixed default, so evaluations are comparable).
    shuffle_examples, dtype, num_parallel_calls: as in
      :func:`episode_dataset`.

  Returns:
    finite ``tf.data.Dataset`` of ``TaskBatch``.

  Example:
    >>> accs = [learner.evaluate(b) for b in evaluation_batches(
    ...     splits["test"], way=5, shot=1, query=15)]  # doctest: +SKIP
  """
  way, shot, query = _check_args(class_images, way, shot, query)
  num_tasks = _check_positive_int("num_tasks", num_tasks)
  meta_batch = _check_positive_int("meta_batch", meta_batch)
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise ValueError(f"seed must be an integer, got {seed!r}")
  dtype = tf.as_dtype(dtype)
  if not dtype.is_floating:
    raise ValueError(f"dtype must be a floating dtype, got {dtype.name}")
  images = _to_tensor(class_images)
  sample = _make_sampler(images, way, shot, query, int(seed), _EVAL_SALT,
                         shuffle_examples, dtype)
  ds = tf.data.Dataset.range(num_tasks).map(
      sample, num_parallel_calls=num_parallel_calls, deterministic=True)
  return ds.batch(meta_batch).prefetch(AUTOTUNE)

