"""The launchers: absl flags parsed into config dataclasses, then the library.

Each module (``sinusoid``, ``classification``, ``rl``, ``rl_compare``) is a
command: ``python -m maml_tf.launch.sinusoid``, the console script
``maml-tf-sinusoid`` or ``python launch/sinusoid.py``. Only these modules
read flags. Every one imports :mod:`maml_tf.launch.quiet` before
TensorFlow.
"""
