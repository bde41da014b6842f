"""maml_tf: Model-Agnostic Meta-Learning for TensorFlow 2 / Keras 3."""

from maml_tf.core.task_batch import TaskBatch
from maml_tf.core.maml import MAML, adapt_params, inner_update
from maml_tf.core.reptile import Reptile
