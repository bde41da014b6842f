"""`python launch/sinusoid.py`: the launcher maml_tf/launch/sinusoid.py.

Also installed as the console script `maml-tf-sinusoid`; see its module
docstring (`--help`) for the flags.
"""

from maml_tf.launch import sinusoid

if __name__ == "__main__":
  sinusoid.run()
