"""Compatibility name: moved to :mod:`maml_tf.common.stats`."""

from maml_tf.common.stats import mean_ci95, paired_difference  # pylint: disable=unused-import
