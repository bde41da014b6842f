"""maml_tf: Model-Agnostic Meta-Learning for TensorFlow 2 / Keras 3.

The public names load on first use, so that ``import maml_tf.launch.*``
can set up logging before TensorFlow is imported.
"""

import importlib

__version__ = "0.2.0"

_PUBLIC = {
    "TaskBatch": "maml_tf.core.task_batch",
    "adapt_params": "maml_tf.core.inner_loop",
    "inner_update": "maml_tf.core.inner_loop",
    "MAML": "maml_tf.core.learner",
    "ExecutionPlan": "maml_tf.core.plan",
    "PlanWarning": "maml_tf.core.plan",
    "Reptile": "maml_tf.core.reptile",
    "MetaModel": "maml_tf.core.meta_model",
}
__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
  if name in _PUBLIC:
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
  # Subpackages load on first use too: maml_tf.tasks.sinusoid after a bare
  # ``import maml_tf``.
  from maml_tf.common import lazy  # pylint: disable=g-import-not-at-top
  return lazy.submodules(__name__)(name)


def __dir__():
  return __all__
