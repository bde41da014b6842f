"""Flags shared by the sinusoid and classification launchers.

Which learner of the family, recomputation, and tf.distribute. Only the
launchers define flags; they pass the values into the config dataclasses.
"""

from absl import flags

from maml_tf.core import distribute
from maml_tf.core import family

ALGORITHM = flags.DEFINE_enum(
    "algorithm", None, list(family.ALGORITHMS),
    "Learner of the family: maml, fomaml, metasgd, anil, mamlpp, reptile.")
META_LR_SCHEDULE = flags.DEFINE_enum(
    "meta_lr_schedule", None, list(family.META_LR_SCHEDULES),
    "Outer step size over --iterations: constant, cosine (meta_lr decayed to "
    "meta_lr/100) or auto (cosine for mamlpp only). Default auto.")
RECOMPUTE = flags.DEFINE_bool(
    "recompute", None, "Gradient checkpointing through the inner loop "
    "(less memory for many inner steps).")
DISTRIBUTE = flags.DEFINE_enum(
    "distribute", None, list(distribute.STRATEGIES),
    "Split each meta-batch across replicas: none (one device), mirrored (the "
    "local GPUs) or multi_worker (the cluster in TF_CONFIG; start "
    "the same command on every worker). Default none.")


def overrides() -> dict:
  """The config fields these flags set (``None``: keep the preset's)."""
  return {"algorithm": ALGORITHM.value,
          "meta_lr_schedule": META_LR_SCHEDULE.value,
          "recompute": RECOMPUTE.value,
          "distribute": DISTRIBUTE.value}
