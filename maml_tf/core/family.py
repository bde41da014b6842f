"""The gradient-based meta-learning family by name, for launchers and configs.

=========  ==============================================================
name       what it is (all share :class:`maml_tf.MAML`'s inner loop)
=========  ==============================================================
maml       Finn et al. 2017: second-order meta-gradient through the inner
           steps.
fomaml     first-order MAML: the inner gradients are treated as constants;
           the meta-gradient is the query gradient at the adapted weights.
metasgd    Meta-SGD (Li et al. 2017): an inner step size per weight,
           meta-learned with the initialisation.
anil       ANIL (Raghu et al. 2020): the inner loop adapts only the head
           (last layer with weights); the body is meta-learned but shared by
           all tasks, so the inner loop is much cheaper.
mamlpp     MAML++ (Antoniou et al. 2019): per-layer per-step learned step
           sizes (LSLR), multi-step loss annealed over the first 10% of
           training, first-order for the first third then second order
           (derivative-order annealing), cosine-annealed meta learning rate.
           Per-step BatchNorm weights and statistics (BNWB/BNRS) are not
           implemented: they need one BatchNorm parameter set per inner step,
           which a plain Keras model does not have.
reptile    Reptile (Nichol et al. 2018): SGD on each task, then move theta
           toward the mean adapted weights (``meta_lr`` is Reptile's
           epsilon); no second derivatives and no query loss in the update.
=========  ==============================================================
"""

from typing import Optional

import keras

from maml_tf.core.learner import MAML
from maml_tf.core.reptile import Reptile

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "mamlpp", "reptile")
META_LR_SCHEDULES = ("auto", "constant", "cosine")


def resolve_meta_lr_schedule(schedule: str, algorithm: str) -> str:
  """``'auto'`` picks ``'cosine'`` for mamlpp and ``'constant'`` otherwise.

  ``ValueError`` names an unknown schedule, or ``'cosine'`` for reptile
  (whose outer step size is a plain float).
  """
  if schedule not in META_LR_SCHEDULES:
    raise ValueError(f"meta_lr_schedule must be one of "
                     f"{list(META_LR_SCHEDULES)}, got {schedule!r}")
  if schedule == "auto":
    return "cosine" if algorithm == "mamlpp" else "constant"
  if schedule == "cosine" and algorithm == "reptile":
    raise ValueError("meta_lr_schedule='cosine' is not available for reptile "
                     "(its outer step size is a constant epsilon)")
  return schedule


def uses_iterations(algorithm: str, meta_lr_schedule: str = "auto") -> bool:
  """Whether :func:`make_learner`'s training depends on ``iterations``
  itself, not only on how long it runs: a cosine meta step size decays over
  them, and MAML++ anneals its multi-step loss and derivative order over
  them. A resumed run of such a learner must keep its iteration count."""
  return (algorithm == "mamlpp"
          or resolve_meta_lr_schedule(meta_lr_schedule, algorithm)
          == "cosine")


# The learner options each algorithm sets itself.
_SETS = {"maml": (), "fomaml": ("first_order",),
         "metasgd": ("learn_inner_lr",), "anil": ("adapt",),
         "mamlpp": ("learn_inner_lr", "multi_step_loss_iterations",
                    "first_order_until"),
         "reptile": ()}


def check_options(algorithm: str, options: dict) -> None:
  """Raises ``ValueError`` for an unknown ``algorithm`` or learner options
  it sets itself (``first_order`` beyond maml/fomaml, ``learn_inner_lr``
  with metasgd, ``adapt`` with anil, ...)."""
  if algorithm not in ALGORITHMS:
    raise ValueError(f"unknown algorithm {algorithm!r}; choose one of "
                     f"{ALGORITHMS}")
  if options.get("first_order") and algorithm not in ("maml", "fomaml"):
    raise ValueError(f"first_order applies to maml/fomaml, not {algorithm}")
  clash = sorted(set(options) & set(_SETS[algorithm]) - {"first_order"})
  if clash:
    raise ValueError(
        f"algorithm {algorithm!r} sets {clash} itself; leave "
        f"{'it' if len(clash) == 1 else 'them'} out, or give "
        f"algorithm='maml' with {'it' if len(clash) == 1 else 'them'}")


def make_learner(algorithm: str, model: keras.Model, loss, *,
                 inner_lr: float, inner_steps: int, meta_lr: float,
                 iterations: int, first_order: bool = False,
                 meta_optimizer: Optional[keras.optimizers.Optimizer] = None,
                 meta_lr_schedule: str = "auto", **kwargs) -> MAML:
  """A learner of the family for ``model``.

  Arguments:
    algorithm: one of :data:`ALGORITHMS`.
    model: a built Keras model.
    loss: a Keras loss or ``(y_true, y_pred) -> scalar``.
    inner_lr: inner step size (the initial value where it is learned).
    inner_steps: inner steps during meta-training.
    meta_lr: the outer learning rate (Reptile: its step size epsilon).
    iterations: planned meta-iterations (the cosine schedule and MAML++'s
      annealing depend on it).
    first_order: for ``maml`` only (``fomaml`` is the same with True).
    meta_optimizer: overrides the default outer optimizer (Adam(meta_lr);
      MAML++: Adam with cosine decay; Reptile: SGD(meta_lr)).
    meta_lr_schedule: the default outer optimizer's step size over
      ``iterations``: ``'constant'``, ``'cosine'`` (from ``meta_lr`` down to
      ``meta_lr / 100`` at ``iterations``, then constant) or ``'auto'``
      (:func:`resolve_meta_lr_schedule`).
    **kwargs: passed to the learner (``vectorize``, ``recompute``, ...).

  Example:
    >>> learner = make_learner("anil", model, "mse", inner_lr=0.1,
    ...                        inner_steps=1, meta_lr=1e-3, iterations=1000)
  """
  check_options(algorithm, dict(kwargs, first_order=first_order))
  schedule = resolve_meta_lr_schedule(meta_lr_schedule, algorithm)
  common = dict(inner_lr=inner_lr, inner_steps=inner_steps, **kwargs)
  if algorithm == "reptile":
    return Reptile(model, loss, outer_step_size=meta_lr,
                   meta_optimizer=meta_optimizer, **common)
  options = {
      "maml": dict(first_order=first_order),
      "fomaml": dict(first_order=True),
      "metasgd": dict(learn_inner_lr="per_parameter"),
      "anil": dict(adapt="head"),
      "mamlpp": dict(learn_inner_lr="per_layer_per_step",
                     multi_step_loss_iterations=max(1, iterations // 10),
                     first_order_until=iterations // 3),
  }[algorithm]
  if meta_optimizer is None:
    rate = meta_lr
    if schedule == "cosine":
      rate = keras.optimizers.schedules.CosineDecay(
          meta_lr, decay_steps=max(1, iterations), alpha=0.01)
    meta_optimizer = keras.optimizers.Adam(rate)
  return MAML(model, loss, meta_optimizer=meta_optimizer, **options, **common)
