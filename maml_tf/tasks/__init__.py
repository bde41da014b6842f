"""Task distributions: sinusoid, Omniglot, MiniImagenet, episodes."""

from maml_tf.common import lazy

__getattr__ = lazy.submodules(__name__)
