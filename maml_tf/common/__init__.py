"""Utilities shared by the training families and meta-RL: results files,
statistics and run configs (no TensorFlow model code)."""

from maml_tf.common import lazy

__getattr__ = lazy.submodules(__name__)
