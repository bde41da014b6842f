"""Experiment runners of the launchers: configs, training loops, results."""

from maml_tf.common import lazy

__getattr__ = lazy.submodules(__name__)
