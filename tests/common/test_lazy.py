"""Subpackages and their modules are attributes after a bare import."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_dotted_names_work_after_a_bare_import():
  # A fresh process: in this one, other tests have imported the modules.
  code = "\n".join([
      "import sys, maml_tf",
      "assert 'maml_tf.tasks.sinusoid' not in sys.modules",
      "print(maml_tf.tasks.sinusoid.batch_sampler.__name__)",
      "print(maml_tf.core.plan.resolve_plan.__name__)",
      "print(maml_tf.models.pretrained.available.__name__)",
      "for bad in ('maml_tf.tasks.nothere', 'maml_tf.nothere'):",
      "  try:",
      "    eval(bad)",
      "  except AttributeError as e:",
      "    print(e)",
  ])
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                       capture_output=True, text=True,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")).stdout
  assert out.splitlines() == [
      "batch_sampler", "resolve_plan", "available",
      "module 'maml_tf.tasks' has no attribute 'nothere'",
      "module 'maml_tf' has no attribute 'nothere'"]
