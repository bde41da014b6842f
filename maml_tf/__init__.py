"""maml_tf: Model-Agnostic Meta-Learning for TensorFlow 2 / Keras 3."""

__version__ = "0.2.0"

from maml_tf.core.task_batch import TaskBatch
from maml_tf.core.inner_loop import adapt_params, inner_update
from maml_tf.core.learner import MAML
from maml_tf.core.plan import ExecutionPlan, PlanWarning
from maml_tf.core.reptile import Reptile
from maml_tf.core.meta_model import MetaModel
