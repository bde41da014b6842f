"""Benchmarks of maml_tf (see BENCHMARKS.md). Importing the package asks
TensorFlow for oneDNN's CPU kernels, as the launchers do
(:func:`maml_tf.common.cpu.prefer_onednn`), so that timings compare like
with like on every x86-64 CPU."""

from maml_tf.common import cpu as _cpu

_cpu.prefer_onednn()
