"""Shipping adapted models."""

from maml_tf.export.adaptable import export_adaptable
from maml_tf.export.saved_model import export_adapted
