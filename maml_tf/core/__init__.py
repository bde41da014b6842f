"""The learner and its mechanism: MAML, plans, inner loops, fast weights."""

from maml_tf.common import lazy

__getattr__ = lazy.submodules(__name__)
