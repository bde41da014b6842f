"""MetaModel: MAML as a keras.Model; fit gives MAML.train_step's numbers."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import MAML, MetaModel, TaskBatch
from maml_tf.models.mlp import mlp
from maml_tf.tasks import sinusoid


def _batches(seed, n, tasks=6):
  return [tuple(np.asarray(t, np.float32) for t in sinusoid.sample_batch(
      tasks, 10, 10, np.random.default_rng([seed, i]))[0]) for i in range(n)]


def _dataset(batches):
  return tf.data.Dataset.from_tensor_slices(
      tuple(np.stack([b[i] for b in batches]) for i in range(4)))


def _net():
  keras.utils.set_random_seed(0)
  return mlp(1, 1, hidden=(16, 16))


@pytest.mark.parametrize("algorithm, options", [
    ("maml", {}), ("metasgd", {}), ("fomaml", {"inner_steps": 2}),
    ("mamlpp", {"inner_steps": 2})])   # first order for its first 2 steps
def test_fit_takes_the_steps_of_train_step(algorithm, options, tmp_path):
  from maml_tf.core import family  # pylint: disable=g-import-not-at-top
  batches = _batches(1, 6)
  learner = family.make_learner(
      algorithm, _net(), "mse", inner_lr=0.02, meta_lr=3e-3, iterations=6,
      inner_steps=options.get("inner_steps", 1),
      meta_optimizer=keras.optimizers.Adam(3e-3))
  start = [w.copy() for w in learner.model.get_weights()]
  for b in batches:
    learner.train_step(TaskBatch(*b))
  meta = MetaModel(_net(), "mse", algorithm=algorithm, iterations=6,
                   inner_lr=0.02, **options)
  meta.compile(optimizer=keras.optimizers.Adam(3e-3))
  path = str(tmp_path / "meta.weights.h5")
  history = meta.fit(_dataset(batches), epochs=1, verbose=0, callbacks=[
      keras.callbacks.ModelCheckpoint(path, save_weights_only=True)])
  assert np.isfinite(history.history["loss"][0])
  for a, b, s in zip(learner.model.get_weights(), meta.net.get_weights(),
                     start):
    assert np.abs(a - s).max() > 1e-4                # it trained
    np.testing.assert_allclose(a, b, atol=1e-6)
  for a, b in zip(learner.inner_lr_variables, meta.inner_lrs):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
  # evaluate scores what MAML.evaluate scores (MAML++ too: its annealed
  # derivative order is not asked for in Keras' compiled test step).
  scores = meta.evaluate(_dataset(batches[:1]), verbose=0, return_dict=True)
  want = learner.evaluate(TaskBatch(*batches[0]),
                          steps=(learner.inner_steps,))["loss"][0]
  np.testing.assert_allclose(scores["loss"], want, rtol=1e-5)
  # The weights file holds the learned step sizes too.
  other = MetaModel(_net(), "mse", algorithm=algorithm, iterations=6,
                    inner_lr=0.02, **options)
  other.compile(optimizer="adam")
  other.load_weights(path)
  for a, b in zip(meta.weights, other.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


class _Batches(keras.utils.PyDataset):
  """A user's PyDataset of TaskBatches (Keras itself refuses 4-tuples)."""

  def __init__(self, batches):
    super().__init__()
    self.batches = batches

  def __len__(self):
    return len(self.batches)

  def __getitem__(self, index):
    return TaskBatch(*self.batches[index])


def test_fit_and_evaluate_take_a_py_dataset():
  batches, held_out = _batches(2, 4), _batches(3, 2)
  metas = []
  for data in (_dataset(batches), _Batches(batches)):
    meta = MetaModel(_net(), "mse", inner_lr=0.02)
    meta.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = meta.fit(data, epochs=1, verbose=0,
                       validation_data=_Batches(held_out))
    assert np.isfinite(history.history["val_loss"][0])
    metas.append(meta)
  for a, b in zip(metas[0].net.get_weights(), metas[1].net.get_weights()):
    np.testing.assert_allclose(a, b, atol=1e-6)   # the same steps, in order
  scores = [m.evaluate(d, return_dict=True, verbose=0)["loss"] for m, d in
            zip(metas, (_dataset(held_out), _Batches(held_out)))]
  assert scores[0] == pytest.approx(scores[1], rel=1e-6)


def test_evaluate_callbacks_and_classification_metrics(tmp_path):
  rng = np.random.default_rng(0)
  def batches(n, tasks=4):
    """Each task: its own random class prototypes (adaptation is needed)."""
    out = []
    for _ in range(n):
      protos = 2 * rng.normal(size=(tasks, 5, 3)).astype("f4")
      def draw(per_class):
        y = np.tile(np.arange(5, dtype="i4"), (tasks, per_class))
        x = np.take_along_axis(protos, y[..., None], axis=1)
        return x + 0.3 * rng.normal(size=x.shape).astype("f4"), y
      out.append(draw(1) + draw(4))
    return out
  keras.utils.set_random_seed(0)
  net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(16, "tanh"),
                          keras.layers.Dense(5)])
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  meta = MetaModel(net, loss, inner_lr=0.5, inner_steps=2,
                   pre_update_metrics=True)
  with pytest.raises((RuntimeError, ValueError), match="compile"):
    meta.fit(_dataset(batches(1)), verbose=0)
  with pytest.raises(ValueError, match="no loss"):
    meta.compile(optimizer="adam", loss="mse")
  meta.compile(optimizer=keras.optimizers.Adam(1e-2))
  train, test = batches(8), batches(2)
  history = meta.fit(
      _dataset(train).repeat(), epochs=4, steps_per_epoch=8, verbose=0,
      validation_data=_dataset(test), callbacks=[
          keras.callbacks.TensorBoard(str(tmp_path / "tb")),
          keras.callbacks.EarlyStopping(monitor="val_loss", patience=10),
          keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
  h = history.history
  assert set(h) >= {"loss", "accuracy", "loss_before", "accuracy_before",
                    "val_loss", "val_accuracy"}
  assert h["accuracy"][-1] > h["accuracy_before"][-1] + 0.1
  assert os.listdir(tmp_path / "tb")
  # evaluate: the post-adaptation metrics of MAML.evaluate.
  got = meta.evaluate(_dataset(test), verbose=0, return_dict=True)
  want = [meta.learner.evaluate(TaskBatch(*b), steps=(2,)) for b in test]
  assert got["loss"] == pytest.approx(
      np.mean([w["loss"][0] for w in want]), rel=1e-5)
  assert got["accuracy"] == pytest.approx(
      np.mean([w["accuracy"][0] for w in want]), rel=1e-5)
  # And the metrics before adaptation (before: reported as 0.0).
  before = [meta.learner.evaluate(TaskBatch(*b), steps=(0,)) for b in test]
  assert got["loss_before"] == pytest.approx(
      np.mean([w["loss"][0] for w in before]), rel=1e-5)
  assert got["accuracy_before"] == pytest.approx(
      np.mean([w["accuracy"][0] for w in before]), rel=1e-5)
  assert h["val_loss_before"][-1] > h["val_loss"][-1] > 0
  adapted = meta.adapt(test[0][0][0], test[0][1][0])
  assert adapted(test[0][2][0]).shape == (20, 5)


def test_fit_on_the_sinusoid_dataset_with_tensorboard_and_checkpoints(
    tmp_path):
  meta = MetaModel(_net(), "mse", inner_lr=0.01)
  meta.compile(optimizer=keras.optimizers.Adam(3e-3))
  history = meta.fit(
      sinusoid.dataset(10, 10, 10, seed=3), epochs=3, steps_per_epoch=300,
      verbose=0, callbacks=[
          keras.callbacks.TensorBoard(str(tmp_path / "tb")),
          keras.callbacks.ModelCheckpoint(
              str(tmp_path / "ckpt-{epoch}.weights.h5"),
              save_weights_only=True)])
  losses = history.history["loss"]
  assert losses[-1] < 0.85 * losses[0], losses
  assert sorted(os.listdir(tmp_path)) == [
      "ckpt-1.weights.h5", "ckpt-2.weights.h5", "ckpt-3.weights.h5", "tb"]
  events = [f for _, _, files in os.walk(tmp_path / "tb") for f in files]
  assert any(f.startswith("events.out.tfevents") for f in events)
  # The dataset is train_steps' in-graph stream.
  first = next(iter(sinusoid.dataset(10, 10, 10, seed=3)))
  want = sinusoid.batch_sampler(10, 10, 10, seed=3)(tf.constant(0))
  np.testing.assert_array_equal(first.support_x.numpy(),
                                want.support_x.numpy())


def test_fit_on_omniglot_shaped_batches_equals_train_step():
  from maml_tf.models import paper_nets  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  batches = [(rng.random((2, 5, 28, 28, 1), dtype=np.float32),
              np.tile(np.arange(5, dtype=np.int32), (2, 1)),
              rng.random((2, 5, 28, 28, 1), dtype=np.float32),
              np.tile(np.arange(5, dtype=np.int32), (2, 1)))
             for _ in range(3)]
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  def net():
    keras.utils.set_random_seed(1)
    return paper_nets.omniglot_conv(5)
  # A small SGD step: Adam would turn the float noise of the zero gradients
  # of the convolution biases before BatchNorm into full-size steps, and
  # large steps on random images are chaotic (1e-7 grows 600x per step).
  maml = MAML(net(), loss, inner_lr=0.4,
              meta_optimizer=keras.optimizers.SGD(0.01))
  plan = maml.plan(TaskBatch(*batches[0]))
  start = [w.copy() for w in maml.model.get_weights()]
  for b in batches:
    maml.train_step(TaskBatch(*b))
  meta = MetaModel(net(), loss, inner_lr=0.4)
  meta.compile(optimizer=keras.optimizers.SGD(0.01))
  assert meta.learner.plan(TaskBatch(*batches[0])) == plan
  history = meta.fit(_dataset(batches), epochs=1, verbose=0)
  assert set(history.history) == {"loss", "accuracy"}
  assert max(np.abs(a - s).max() for a, s in
             zip(maml.model.get_weights(), start)) > 1e-5
  for a, b in zip(maml.model.get_weights(), meta.net.get_weights()):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("jit", [True, False])
def test_a_non_finite_step_changes_nothing(jit):
  """Under XLA (which compiles check_numerics to nothing) the step is
  skipped and logs NaN; without it, the graph's check stops fit."""
  batches = _batches(2, 2)
  bad = list(batches[1])
  bad[3] = np.full_like(bad[3], np.nan)         # NaN query targets
  meta = MetaModel(_net(), "mse", inner_lr=0.02)
  meta.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=jit)
  meta.fit(_dataset(batches[:1]), epochs=1, verbose=0)
  before = [v.numpy().copy() for v in meta.weights]
  assert int(meta.optimizer.iterations) == 1
  if jit:
    history = meta.fit(_dataset([tuple(bad)]), epochs=1, verbose=0)
    assert np.isnan(history.history["loss"][0])
  else:
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="meta-loss .* is NaN or Inf"):
      meta.fit(_dataset([tuple(bad)]), epochs=1, verbose=0)
  for a, b in zip(before, meta.weights):
    np.testing.assert_array_equal(a, b.numpy())
  assert int(meta.optimizer.iterations) == 1


def test_a_saved_meta_model_loads_compiled_and_fits_on_identically(tmp_path):
  """``save("x.keras")`` keeps the architecture, loss, algorithm, options,
  learned step sizes and optimizer state; ``load_model`` gives a MetaModel
  whose next steps are the saved one's."""
  meta = MetaModel(_net(), keras.losses.MeanSquaredError(),
                   algorithm="metasgd", inner_lr=0.02, inner_steps=2)
  meta.compile(optimizer=keras.optimizers.Adam(3e-3))
  meta.fit(_dataset(_batches(5, 4)), verbose=0)
  path = str(tmp_path / "meta.keras")
  meta.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded, MetaModel)
  assert loaded.learner.inner_steps == 2
  assert int(loaded.optimizer.iterations.numpy()) == 4
  assert len(loaded.variables) == len(meta.variables) == 6 + 6  # + step sizes
  for a, b in zip(meta.variables + meta.optimizer.variables,
                  loaded.variables + loaded.optimizer.variables):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  more = _dataset(_batches(6, 3))
  want = meta.fit(more, verbose=0).history["loss"]
  got = loaded.fit(more, verbose=0).history["loss"]
  assert got == want and np.isfinite(want).all()
  for a, b in zip(meta.variables, loaded.variables):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Shifted(keras.Model):
  """Subclassed, built from an object Keras cannot serialise."""

  def __init__(self, table):
    super().__init__()
    self.table = table
    self.dense = keras.layers.Dense(1)

  def call(self, x):
    return self.dense(x) + self.table["shift"]


class _Unregistered(keras.Model):

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.dense = keras.layers.Dense(1)

  def call(self, x):
    return self.dense(x)


def test_a_meta_model_keras_cannot_save_whole_says_which_part(tmp_path):
  net = _Shifted(type("Table", (dict,), {})(shift=1.0))
  net(np.zeros((1, 1), np.float32))
  meta = MetaModel(net, "mse", inner_lr=0.01)
  meta.compile(optimizer="adam")
  with pytest.raises(ValueError, match=r"cannot be saved whole: its model .*"
                     r"save_weights"):
    meta.save(str(tmp_path / "meta.keras"))
  meta.save_weights(str(tmp_path / "meta.weights.h5"))   # still possible
  # A subclassed model of an unregistered class: Keras writes it but could
  # not load it back.
  net = _Unregistered()
  net(np.zeros((1, 1), np.float32))
  meta = MetaModel(net, "mse", inner_lr=0.01)
  meta.compile(optimizer="adam")
  with pytest.raises(ValueError, match=r"cannot be saved whole: its model"
                     r".*register_keras_serializable"):
    meta.save(str(tmp_path / "meta.keras"))
  # A plain function loss Keras would write but could not read back.
  def squared(y, p):
    return tf.reduce_mean((y - p) ** 2)
  meta = MetaModel(_net(), squared, inner_lr=0.01)
  meta.compile(optimizer="adam")
  with pytest.raises(ValueError, match=r"its loss .*registered with"):
    meta.save(str(tmp_path / "meta.keras"))


def test_arrays_and_single_batches_as_keras_takes_them():
  """fit/evaluate on NumPy arrays of tasks (batch_size: the meta-batch) and
  train_on_batch/test_on_batch on one meta-batch take the dataset's steps;
  a y, sample_weight or class_weight is refused, naming it."""
  batches = _batches(7, 3, tasks=4)
  metas = [MetaModel(_net(), "mse", inner_lr=0.02) for _ in range(4)]
  for meta in metas:
    meta.compile(optimizer=keras.optimizers.Adam(3e-3))
  arrays = tuple(np.concatenate([b[i] for b in batches]) for i in range(4))
  assert arrays[0].shape == (12, 10, 1)
  metas[0].fit(_dataset(batches), verbose=0)
  # Keras' positions: y, batch_size, epochs, verbose, callbacks,
  # validation_split, validation_data, shuffle.
  history = metas[1].fit(arrays, None, 4, 1, 0, None, 0.0,
                         tuple(a[:4] for a in arrays), False)
  metas[3].fit(arrays, batch_size=4, verbose=0)    # shuffled, as Keras does
  trained = [metas[2].train_on_batch(TaskBatch(*b), return_dict=True)
             for b in batches]
  assert np.isfinite([t["loss"] for t in trained]).all()
  for meta in metas[1:3]:
    assert int(meta.optimizer.iterations.numpy()) == 3
    for a, b in zip(metas[0].net.get_weights(), meta.net.get_weights()):
      np.testing.assert_allclose(a, b, atol=1e-6)
  assert int(metas[3].optimizer.iterations.numpy()) == 3
  assert not np.allclose(metas[3].net.get_weights()[0],
                         metas[0].net.get_weights()[0], atol=1e-6)
  want = metas[0].evaluate(_dataset(batches[:1]), verbose=0)
  assert metas[1].evaluate(tuple(a[:4] for a in arrays), batch_size=4,
                           verbose=0) == pytest.approx(want, rel=1e-6)
  assert metas[2].test_on_batch(batches[0]) == pytest.approx(want, rel=1e-6)
  assert history.history["val_loss"][0] == pytest.approx(want, rel=1e-6)
  meta = metas[0]
  with pytest.raises(ValueError, match="fit takes no class_weight"):
    meta.fit(_dataset(batches), class_weight={0: 1.0}, verbose=0)
  with pytest.raises(ValueError, match="fit takes no y"):
    meta.fit(arrays, np.zeros(12), verbose=0)
  with pytest.raises(ValueError, match="evaluate takes no sample_weight"):
    meta.evaluate(arrays, sample_weight=np.ones(12), verbose=0)
  with pytest.raises(ValueError, match="train_on_batch takes no y"):
    meta.train_on_batch(batches[0], np.zeros(4))
  assert int(meta.optimizer.iterations.numpy()) == 3   # nothing ran


def test_a_second_compile_keeps_the_learned_step_sizes():
  # Before, compile made a new learner whose step sizes were the initial
  # inner_lr again (Keras keeps the weights when a model is recompiled).
  meta = MetaModel(_net(), "mse", algorithm="metasgd", inner_lr=0.1)
  meta.compile(optimizer=keras.optimizers.Adam(0.05))
  meta.fit(_dataset(_batches(1, 3)), epochs=1, verbose=0)
  learned = [v.numpy().copy() for v in meta.inner_lrs]
  assert max(np.abs(l - 0.1).max() for l in learned) > 1e-3
  meta.compile(optimizer=keras.optimizers.Adam(1e-3))
  for a, b in zip(learned, meta.inner_lrs):
    np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize("args, kwargs, match", [
    (("mse",), {"algorithm": "metasgd", "learn_inner_lr": "scalar"},
     r"'metasgd' sets \['learn_inner_lr'\] itself"),
    (("mse",), {"algorithm": "anil", "adapt": ["dense"]},
     r"'anil' sets \['adapt'\] itself"),
    (("nope",), {}, "nope"),
    (("mse",), {"algorithm": "maml2"}, "unknown algorithm"),
])
def test_bad_meta_model_arguments_are_refused_when_it_is_made(args, kwargs,
                                                              match):
  # Before: a TypeError of duplicate keyword arguments, or any error only at
  # compile.
  with pytest.raises(ValueError, match=match):
    MetaModel(_net(), *args, **kwargs)


def _classes_dataset(num_classes, tasks=4, shots=6, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2 * tasks, shots, 3)).astype(np.float32)
  y = rng.integers(0, num_classes, size=(2 * tasks, shots)).astype(np.int32)
  return tf.data.Dataset.from_tensor_slices((x, y, x, y)).batch(tasks)


def _classifier(units):
  keras.utils.set_random_seed(0)
  return keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, "tanh"),
                           keras.layers.Dense(units)])


def test_logs_hold_the_metrics_the_learner_scores():
  # The trackers followed "is the loss Keras' sparse cross-entropy", not the
  # learner's accuracy rule: a custom sparse loss function logged no
  # accuracy, though the learner scored it.
  def sparse_ce(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits,
                                                        from_logits=True)
  meta = MetaModel(_classifier(3), sparse_ce, inner_lr=0.1)
  meta.compile(optimizer=keras.optimizers.Adam(1e-3))
  history = meta.fit(_classes_dataset(3), epochs=1, verbose=0)
  assert set(history.history) == {"loss", "accuracy"}
  assert 0.0 < history.history["accuracy"][0] < 1.0
  scores = meta.evaluate(_classes_dataset(3, seed=1), verbose=0,
                         return_dict=True)
  assert set(scores) == {"loss", "accuracy"}
  # A regressor's trackers are its steps' metrics: Keras reads epoch logs
  # and evaluate's results from the trackers only when the names match.
  regressor = MetaModel(_net(), "mse", inner_lr=0.02)
  regressor.compile(optimizer=keras.optimizers.Adam(1e-3))
  regressor.fit(_dataset(_batches(3, 2)), epochs=1, verbose=0)
  assert set(regressor.get_metrics_result()) == {"loss"}
  off = MetaModel(_classifier(3), sparse_ce, inner_lr=0.1, accuracy=False)
  off.compile(optimizer=keras.optimizers.Adam(1e-3))
  assert set(off.fit(_classes_dataset(3), epochs=1, verbose=0).history) == {
      "loss"}
