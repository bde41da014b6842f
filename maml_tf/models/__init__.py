"""Networks of the paper and the shipped meta-initialisations."""

from maml_tf.common import lazy

__getattr__ = lazy.submodules(__name__)
