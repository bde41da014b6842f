"""Compatibility name: moved to :mod:`maml_tf.common.results`."""

from maml_tf.common.results import write_json  # pylint: disable=unused-import
